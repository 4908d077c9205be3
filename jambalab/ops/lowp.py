"""Linear layers over low-precision weights: bf16 / fp16 dense weights and int8 / 4-bit QuantWeights.

Legend: M rows of x (tokens), K in_features, N out_features.

Two regimes, chosen per call by M:
- decode (M <= 4; quantized weights up to M = 16, in blocks of 4; weight-only bf16, a bf16 weight
  under float32 x, up to 16 rows through gemv.cpp's gemv): the weights are read once, in their
  stored format: the step is bandwidth-bound, so bf16 reads half of fp32's bytes, int8 a
  quarter, 4-bit an eighth (plus scales). csrc/qgemv.cpp's wgemv converts them in registers
  (bf16 x bf16 with vdpbf16ps where the CPU has AVX512-BF16, else widened in registers); for int8 /
  4-bit weights, csrc/a8gemv.cpp's wgemv_a8 instead quantizes x to int8 in blocks of 32 and
  multiplies integers with vpdpbusd, as llama.cpp's Q8_0 / Q4_0 kernels do: 2-3x the weights per
  second of converting them. Which one runs is quant_ref.activations() (set_activations); in the "int8"
  mode the prefill GEMM rounds x the same way first, so decode and prefill compute the same thing.
- prefill (more rows): the weight is expanded a tile of output rows at a time (~_TILE_BYTES, so it
  stays in L3) into the GEMM dtype and multiplied with torch's GEMM; never a dense copy of
  the whole matrix. The GEMM dtype is chosen once per machine: bf16 activations use the native
  bf16 GEMM where the CPU has one (AVX512-BF16 or AMX: oneDNN), else fp32 (bf16 -> fp32 is exact,
  and torch's bf16 GEMM without hardware support ran 3-9x slower than its fp32 one). Over int8 /
  4-bit weights fp32 activations take that bf16 GEMM too (quant_gemm_dtype): the weights are
  already rounded far coarser than bf16, and the float32 model's prefill ran 2-2.7x slower in fp32
  (A and B of bench peers, 512 tokens); its decode (csrc/step.cpp) stays exact integer products.
  Where there is no native bf16 GEMM, the int8-activation mode's prefill skips the tiles:
  a8gemv.cpp's wgemm_a8 multiplies the int8 blocks with vpdpbusd (AVX512-VNNI: 16 outputs in the
  lanes, each tile of 32 outputs repacked on the fly), 1.5-2.3x the tiled fp32 GEMM on a Xeon without
  AVX512-BF16 (A and B of bench peers, 512 tokens); or, on AVX2, with vpmaddubsw over the same tiles,
  8 outputs a register: 1.2-1.4x there (the same Xeon held to AVX2: JAMBALAB_MARCH=x86-64-v3).

Twins: F.linear on the dense weight (quant_ref.qlinear_ref / wgemv_ref); tests compare them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from jambalab.ops import cpu, gemm
from jambalab.ops.quant_ref import (QuantWeight, activations, dequant_ref, int8_activations, qlinear_ref, set_activations,
                                    wgemv_a8_ref, wgemv_ref)

DECODE_ROWS = 4  # kMaxRows in qgemv.cpp
# A bf16 x (a bf16 model) over a bf16 weight: wgemv takes up to this many rows in one call, each weight
# row serving all of them from L1 (kBf16DotRows in kernels.h). Against the native bf16 GEMM, which a
# call of 5 rows sent through oneDNN: B's (d 1024, 16 experts) bf16 model decoded 5 rows in 44.5 ms a
# step, 4 rows in 20.3.
GEMV_ROWS_BF16 = 16
# Up to this many rows (a batched decode step of the serving engine), a quantized matmul runs the GEMV
# once per block of 4 rows: reading 0.5-1 byte a weight M/4 times costs less than writing and
# re-reading a dequantized tile of 2-4 bytes a weight.
GEMV_ROWS_QUANT = 16
# One dequantized tile of output rows: it stays in L3, and the GEMM on it is large enough to run at
# oneDNN's rate. 512-token prefill, 4-bit, 2 threads, 5 interleaved rounds: 8 MiB tiles against 1 MiB
# ran B (d 1024, 16 experts) at ~700 vs ~555 tokens/s, A (d 4096) at ~238 vs ~215; int8 on B ~760 vs ~695.
_TILE_BYTES = 8 << 20



def _detect_native_bf16(capability: str) -> bool:
    """AVX512-BF16 or AMX in the CPU, and ATen allowed its AVX-512 kernels (capability: what
    torch.backends.cpu.get_cpu_capability() says; ATEN_CPU_CAPABILITY=avx2 holds a run below it,
    and a bf16 GEMM there would be oneDNN's slow emulation)."""
    has = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return bool(has) and capability.upper().startswith("AVX512")


# Whether this CPU multiplies bf16 matrices in hardware: read once, at import (a plain constant, which
# torch.compile folds in; the cpuinfo queries themselves cannot be traced).
_NATIVE_BF16 = _detect_native_bf16(torch.backends.cpu.get_cpu_capability())


def native_bf16() -> bool:
    """Whether this CPU has a native bf16 GEMM (AVX512-BF16 or AMX, which oneDNN uses)."""
    return _NATIVE_BF16


def gemm_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """The dtype the prefill GEMM runs in for activations of x_dtype."""
    return torch.bfloat16 if x_dtype == torch.bfloat16 and native_bf16() else torch.float32


def quant_gemm_dtype() -> torch.dtype:
    """The prefill GEMM's dtype over dequantized int8 / 4-bit tiles, for activations of any dtype: bf16
    wherever the CPU has a native bf16 GEMM, else fp32."""
    return torch.bfloat16 if native_bf16() else torch.float32


def _decode_kernels(x: Tensor, *ts: Tensor | None, max_rows: int = DECODE_ROWS):
    """The compiled ops when this call is decode-sized (<= max_rows rows) and inference-only on the
    CPU, else None."""
    if x.dim() < 1 or x.numel() == 0 or x.numel() > max_rows * x.shape[-1]:
        return None
    if x.dtype not in (torch.float32, torch.bfloat16) or torch.is_grad_enabled() and x.requires_grad:
        return None
    if not all(t.is_cpu for t in (x, *ts) if t is not None):
        return None
    return cpu.kernels()


def _bias32(bias: Tensor | None) -> Tensor | None:
    return None if bias is None else bias.float().contiguous()


def dense_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear for a bf16 / fp16 weight (N, K), any x dtype.

    float32 x over a bf16 weight is weight-only bf16 (quant.quantize_model(model, "bf16")): x is rounded
    to bf16 and the exact products are summed in fp32, as llama.cpp's BF16 matmul does. Decode-sized
    calls (<= 16 rows) run gemv.cpp's gemv (vdpbf16ps; each row's result independent of the batch),
    prefill the native bf16 GEMM where the CPU has one (its output rounded to bf16), else fp32 tiles of
    the weight against the rounded x."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if x.dtype == torch.float32 and weight.dtype == torch.bfloat16 and not needs_grad:
        return _bf16_weight_linear(x, weight, bias)
    rows = GEMV_ROWS_BF16 if x.dtype == weight.dtype == torch.bfloat16 else DECODE_ROWS
    ops = None if needs_grad or not weight.is_contiguous() else _decode_kernels(x, weight, bias, max_rows=rows)
    if ops is not None:
        y = ops.wgemv(x.reshape(-1, x.shape[-1]).contiguous(), weight, None, 0, _bias32(bias))  # (M, N)
        return y.view(*x.shape[:-1], weight.shape[0])
    if needs_grad or not x.is_cpu or gemm_dtype(x.dtype) == weight.dtype == x.dtype:
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    # No native 16-bit GEMM here: fp32 tiles of the weight (an exact conversion), fp32 GEMM.
    return _fp32_tiles(x, weight, bias)


def _bf16_weight_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """float32 x (..., K) @ bf16 weight (N, K)^T + bias, in float32 (inference)."""
    ops = _decode_kernels(x, weight, bias, max_rows=GEMV_ROWS_QUANT) if weight.is_contiguous() else None
    if ops is not None:
        y = ops.gemv(x.reshape(-1, x.shape[-1]).contiguous(), weight, _bias32(bias))  # (M, N)
        return y.view(*x.shape[:-1], weight.shape[0])
    if not x.is_cpu or quant_gemm_dtype() == torch.bfloat16:
        y = F.linear(x.to(torch.bfloat16), weight).float()  # (..., N)
        return y if bias is None else y + bias.float()
    return _fp32_tiles(bf16_values(x), weight, bias)


def bf16_values(x: Tensor) -> Tensor:
    """float32 x rounded to bf16 (to nearest, ties to even), kept in float32: x.to(torch.bfloat16).float().
    Under torch.compile it is computed on the bits: inductor fuses that pair of casts into one kernel
    without the rounding (torch._inductor.config.emulate_precision_casts is off by default), so a compiled
    model skipped it and its weight-only bf16 prefill drifted from eager by up to 2e-4 on a CPU without a
    native bf16 GEMM. Eager keeps the two casts: the five integer ops cost ~8% of B's weight-only bf16
    prefill there (torch.profiler)."""
    if not torch.compiler.is_compiling():
        return x.to(torch.bfloat16).float()
    u = x.contiguous().view(torch.int32)
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) & -65536  # c10::BFloat16's round_to_nearest_even, kept in 32 bits
    return torch.where(torch.isnan(x), x, rounded.view(torch.float32))


def _fp32_tiles(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight^T + bias for a 16-bit weight, through fp32 tiles of it (an exact conversion)."""
    return _tiled(x, weight.shape[0], lambda lo, hi: weight[lo:hi].float(), weight.shape[1] * 4, bias)


def qlinear(x: Tensor, qw: QuantWeight, bias: Tensor | None = None) -> Tensor:
    """x (..., K) @ dequantize(qw)^T + bias, in x's dtype (inference only: no gradients)."""
    if x.shape[-1] != qw.in_features:
        raise ValueError(f"qlinear: x has {x.shape[-1]} features, the weight {qw.in_features}")
    if not x.is_cpu or cpu.kernels() is None:
        return qlinear_ref(x, qw, bias)
    ops = _decode_kernels(x, qw.data, bias, max_rows=GEMV_ROWS_QUANT)
    if ops is not None:  # blocks of <= 4 rows, each reading the weights once: below the cost of dequantizing
        x2, b = x.reshape(-1, x.shape[-1]).contiguous(), _bias32(bias)  # (M, K)
        gemv = ops.wgemv_a8 if int8_activations(qw) else ops.wgemv
        blocks = [gemv(xb, qw.data, qw.scales, qw.group_size, b) for xb in x2.split(DECODE_ROWS)]
        y = blocks[0] if len(blocks) == 1 else torch.cat(blocks)  # (M, N)
        return y.view(*x.shape[:-1], qw.out_features)
    dtype = quant_gemm_dtype()
    ops = cpu.kernels()
    if int8_activations(qw) and dtype == torch.float32 and cpu.has_wgemm_a8():
        # No native bf16 GEMM here: the int8 blocks multiply as integers (a8gemv.cpp's wgemm_a8); the module
        # docstring has what it gained over the dequantized fp32 tiles (docs/precision.md)
        y = ops.wgemm_a8(x.reshape(-1, x.shape[-1]), qw.data, qw.scales, qw.group_size, _bias32(bias))  # (M, N)
        return y.view(*x.shape[:-1], qw.out_features)

    def tile(lo: int, hi: int) -> Tensor:
        return ops.dequant(qw.data, qw.scales, qw.group_size, lo, hi, dtype)

    if int8_activations(qw):  # the activations decode's wgemv_a8 sees: rounded to int8 per block of 32
        xr = ops.act_round(x.reshape(-1, x.shape[-1]).contiguous(), dtype).view(x.shape)  # twin: fake_quant_act
        return _tiled(xr, qw.out_features, tile, qw.in_features * dtype.itemsize, bias).to(x.dtype)
    return _tiled(x, qw.out_features, tile, qw.in_features * dtype.itemsize, bias)


def _tiled(x: Tensor, n_out: int, tile, row_bytes: int, bias: Tensor | None) -> Tensor:
    """x (..., K) @ W^T with W produced a tile of rows at a time by tile(lo, hi) -> (hi - lo, K)."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    rows = max(16, _TILE_BYTES // max(1, row_bytes))
    first = tile(0, min(rows, n_out))
    xg = x2.to(first.dtype)
    parts = [gemm.linear(xg, first)]
    for lo in range(rows, n_out, rows):
        parts.append(gemm.linear(xg, tile(lo, min(lo + rows, n_out))))  # (M, rows)
    y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (M, N)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).view(*x.shape[:-1], n_out)


__all__ = ["dense_linear", "qlinear", "gemm_dtype", "quant_gemm_dtype", "native_bf16", "dequant_ref", "wgemv_ref", "wgemv_a8_ref",
           "set_activations", "activations", "bf16_values", "DECODE_ROWS", "GEMV_ROWS_BF16"]
