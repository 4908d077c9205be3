"""Low-precision weights: the container, the quantizers, and the pure-PyTorch twins of the kernels
in csrc/qgemv.cpp (wgemv_ref, dequant_ref).

Legend: R rows of x, K in_features, N out_features, G group size, E experts.

Formats (QuantWeight.bits):
- 8: int8 q (..., N, K), w = q * s[n, k // G], q in [-127, 127], symmetric;
- 4: uint8 (..., N, K / 2), two weights a byte, w = (u - 8) * s[n, k // G], u in [0, 15]. Each run of
  32 weights is 16 bytes, byte j holding weight j (low nibble) and j + 16 (high nibble): llama.cpp's
  Q4_0 order, the same on every machine.
Scales are fp16 (..., N, K / G). G = K is per-output-channel. The quantizer divides by the
fp16-rounded scale, so what is stored is exactly what was rounded against; an all-zero group gets
scale 0 and q 0. No calibration: round to nearest, symmetric, per group (Jamba-1.5's ExpertsInt8
and llama.cpp's Q8_0 / Q4_0 are of this kind).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from jambalab.errors import InputError

SCHEMES = {"int8": 8, "int4": 4}
_QMAX = {8: 127, 4: 7}  # symmetric range: int8 [-127, 127], 4-bit [-8, 7] (scale from 7, so -8 is unused)
_RUN = 32  # 4-bit packing run
_FP16_MAX = 65504.0


@dataclass(frozen=True)
class QuantWeight:
    """A quantized (..., N, K) weight: packed data, fp16 scales (..., N, K // group_size), bits 8 or 4."""

    data: Tensor
    scales: Tensor
    bits: int
    group_size: int

    @property
    def in_features(self) -> int:
        return self.data.shape[-1] * (2 if self.bits == 4 else 1)

    @property
    def out_features(self) -> int:
        return self.data.shape[-2]

    def __getitem__(self, e: int) -> QuantWeight:
        """Expert e of a stacked (E, N, K) weight."""
        return QuantWeight(self.data[e], self.scales[e], self.bits, self.group_size)

    def unbind(self) -> list[QuantWeight]:
        return [self[e] for e in range(self.data.shape[0])]


def check_group_size(bits: int, group_size: int, in_features: int, name: str = "weight") -> None:
    """InputError unless group_size fits this format and divides in_features."""
    if bits not in _QMAX:
        raise InputError(f"{name}: quantization bits must be 8 or 4, got {bits}")
    if group_size < 1 or in_features % group_size:
        raise InputError(f"{name}: group size {group_size} does not divide its in_features {in_features}")
    if bits == 4 and group_size % _RUN:
        raise InputError(f"{name}: a 4-bit group size must be a multiple of {_RUN}, got {group_size}")


@torch.no_grad()
def quantize_weight(w: Tensor, bits: int, group_size: int | None = None, name: str = "weight") -> QuantWeight:
    """w (..., N, K) float -> QuantWeight; group_size None = per output channel (G = K)."""
    K = w.shape[-1]
    G = K if group_size is None else group_size
    check_group_size(bits, G, K, name)
    groups = w.float().reshape(*w.shape[:-1], K // G, G)  # (..., N, K/G, G)
    amax = groups.abs().amax(dim=-1)  # (..., N, K/G)
    if not w.is_meta and not torch.isfinite(amax).all():  # (the meta device: shapes only, for memory plans)
        raise InputError(f"{name}: holds NaN or Inf; refusing to quantize it")
    scale = (amax / _QMAX[bits]).to(torch.float16)
    if not w.is_meta and torch.isinf(scale).any():
        raise InputError(f"{name}: a weight of magnitude {amax.max().item():.3g} overflows the fp16 scales")
    s = scale.float()
    q = torch.where(s[..., None] > 0, groups / s[..., None].clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    q = torch.round(q).clamp(-_QMAX[bits] - (bits == 4), _QMAX[bits]).reshape(w.shape)
    data = q.to(torch.int8) if bits == 8 else pack_int4(q.to(torch.int8))
    return QuantWeight(data.contiguous(), scale.contiguous(), bits, G)


def pack_int4(q: Tensor) -> Tensor:
    """int8 values in [-8, 7] (..., K), K a multiple of 32 -> uint8 (..., K / 2) in the run layout."""
    u = (q.to(torch.int16) + 8).to(torch.uint8).reshape(*q.shape[:-1], -1, 2, _RUN // 2)  # (..., runs, 2, 16)
    return (u[..., 0, :] | (u[..., 1, :] << 4)).reshape(*q.shape[:-1], q.shape[-1] // 2)


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 (..., K / 2) -> int8 values in [-8, 7] (..., K)."""
    b = packed.reshape(*packed.shape[:-1], -1, _RUN // 2)  # (..., runs, 16)
    u = torch.stack((b & 0xF, b >> 4), dim=-2)  # (..., runs, 2, 16): low nibbles first
    return (u.to(torch.int8) - 8).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequantize(qw: QuantWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    """The dense (..., N, K) weight that qw stands for."""
    q = qw.data if qw.bits == 8 else unpack_int4(qw.data)
    G = qw.group_size
    w = q.float().reshape(*q.shape[:-1], -1, G) * qw.scales.float()[..., None]  # (..., N, K/G, G)
    return w.reshape(q.shape).to(dtype)


def dequant_ref(weight: Tensor, scales: Tensor, group_size: int, lo: int, hi: int, dtype: torch.dtype) -> Tensor:
    """Twin of the C++ dequant: rows [lo, hi) of a (N, K) int8 / (N, K/2) uint8 weight as a dense tile."""
    bits = 8 if weight.dtype == torch.int8 else 4
    return dequantize(QuantWeight(weight[lo:hi], scales[lo:hi], bits, group_size), dtype)


def wgemv_ref(x: Tensor, weight: Tensor, scales: Tensor | None, group_size: int, bias: Tensor | None) -> Tensor:
    """Twin of the C++ wgemv: x (R, K) @ W^T + bias in fp32, returned in x's dtype; W bf16 / fp16, or
    int8 / packed 4-bit with scales."""
    if scales is None:
        w = weight.float()
    else:
        w = dequant_ref(weight, scales, group_size, 0, weight.shape[0], torch.float32)
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


def bf16_gemv_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Twin of the gemv op over a bf16 weight (weight-only bf16): fp32 x rounded to bf16, exact
    products, sums in fp32 (float64 here: the kernel's sums differ only in order)."""
    y = F.linear(x.to(torch.bfloat16).double(), weight.double(), None if bias is None else bias.double())
    return y.float()


ACT_BLOCK = 32  # activation values per int8 scale in wgemv_a8 (llama.cpp's Q8_0 block)

# What a product with int8 / 4-bit weights does with its activations, in every path (decode GEMV,
# prefill GEMM, these twins): "int8" rounds each row of x to int8 in blocks of 32 first (llama.cpp's
# Q8_0 activations; decode then multiplies integers, csrc/a8gemv.cpp), "float" uses x as given (the
# exact product with the dequantized weight). Set with set_activations.
ACTIVATION_MODES = ("int8", "float")
_act = {"mode": "int8"}


def set_activations(mode: str) -> None:
    """"int8" (the default) or "float": how products with int8 / 4-bit weights treat activations."""
    if mode not in ACTIVATION_MODES:
        raise InputError(f"activations must be one of {', '.join(ACTIVATION_MODES)}, got {mode!r}")
    _act["mode"] = mode


def activations() -> str:
    """The mode in force: "int8" or "float"."""
    return _act["mode"]


def int8_activations(qw: QuantWeight) -> bool:
    """Whether products with qw round activations to int8 (the mode, for K and G multiples of 32)."""
    return _act["mode"] == "int8" and qw.in_features % ACT_BLOCK == 0 and qw.group_size % ACT_BLOCK == 0


def quantize_act_ref(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (R, K), K a multiple of 32 -> int8 q (R, K) and fp32 block scales d (R, K / 32), symmetric per
    block of 32: d = max|x| / 127, q = round(x / d) (half to even), x ~ q * d. The twin of a8gemv.cpp's
    quantize_x: the same fp32 operations in the same order, so q and d are bitwise equal."""
    xb = x.float().reshape(x.shape[0], -1, ACT_BLOCK)  # (R, K/32, 32)
    d = xb.abs().amax(dim=-1) / 127.0  # (R, K/32)
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(x.shape), d


def fake_quant_act(x: Tensor) -> Tensor:
    """x (..., K) rounded as wgemv_a8 rounds it: q * d per block of 32, as fp32."""
    q, d = quantize_act_ref(x.reshape(-1, x.shape[-1]))  # (R, K), (R, K/32)
    xq = q.float().reshape(*d.shape, ACT_BLOCK) * d[..., None]  # (R, K/32, 32)
    return xq.reshape(x.shape)


def wgemv_a8_ref(x: Tensor, weight: Tensor, scales: Tensor, group_size: int, bias: Tensor | None) -> Tensor:
    """Twin of the C++ wgemv_a8: x (R, K) quantized by quantize_act_ref, times int8 / packed 4-bit weights,
    each block's integer dot product exact, scaled by d_x[block] * s[group]; returned in x's dtype."""
    qx, dx = quantize_act_ref(x)
    qw = weight if weight.dtype == torch.int8 else unpack_int4(weight)  # (N, K) int8
    R, K = qx.shape
    nb = K // ACT_BLOCK
    # Block dot products: integers below 32 * 127 * 127 < 2^24, so exact in fp32 in any order.
    isum = torch.einsum("rbk,nbk->rnb", qx.float().reshape(R, nb, ACT_BLOCK), qw.float().reshape(-1, nb, ACT_BLOCK))
    s = scales.float().repeat_interleave(group_size // ACT_BLOCK, dim=1)  # (N, K/32): each block's group scale
    y = (isum * (dx[:, None, :] * s[None])).sum(-1)  # (R, N)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def qlinear_ref(x: Tensor, qw: QuantWeight, bias: Tensor | None = None) -> Tensor:
    """x (..., K) @ dequantize(qw)^T + bias, in x's dtype (the reference for ops.qlinear); x rounded to
    int8 blocks first in the "int8" activation mode."""
    xf = fake_quant_act(x) if int8_activations(qw) else x.float()
    y = F.linear(xf, dequantize(qw), None if bias is None else bias.float())
    return y.to(x.dtype)


def linear_ref(x: Tensor, weight: Tensor | QuantWeight, bias: Tensor | None = None) -> Tensor:
    """The twin of ops.linear: F.linear, for a float weight or a QuantWeight."""
    if isinstance(weight, QuantWeight):
        return qlinear_ref(x, weight, bias)
    return F.linear(x, weight, bias)
