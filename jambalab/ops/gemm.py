"""Prefill-sized float32 matmuls on the CPU: oneDNN's fp32 GEMM instead of the BLAS behind F.linear.

Legend: M rows of x (tokens), K in_features, N out_features.

torch's x86 wheels run a float32 F.linear through MKL's sgemm. The same wheels carry oneDNN, whose
fp32 matmul (torch.ops.mkldnn._linear_pointwise, the op torch.compile's CPU backend itself emits for
linear layers) reads the plain row-major weight as it is: no packed copy of it.
`python benchmarks/fp32_gemm.py` on this project's 2-core AMD EPYC (AVX-512), 2 threads, GFLOP/s (best of 3),
F.linear / oneDNN (as called here, in blocks of 256 rows; below 32 rows both are F.linear):

    N x K of the weight          M=64       M=100      M=512      M=2048
    16384 x 4096 (A in_proj)     89 / 186   101 / 160  143 / 195  148 / 189
    4096 x 8192  (A out_proj)    111 / 182  133 / 154  155 / 205  181 / 206
    8192 x 256   (A dt_proj)     130 / 154  115 / 136  165 / 175  115 / 102
    3328 x 1024  (B expert)      115 / 161  116 / 126  173 / 195  171 / 184
    4096 x 1024  (B in_proj)     108 / 152  113 / 138  156 / 173  155 / 158

(Rows that both run through F.linear differed by up to 12% in that run: the machine's noise.) A
512-token fp32 prefill, 3 interleaved rounds in fresh processes with JAMBALAB_FP32_GEMM=blas for
before, medians: A (Falcon-Mamba-7B-shaped, 6 layers) 97 -> 142 tokens/s, B (Jamba-shaped, d 1024)
328 -> 400. Both are float32 throughout (torch.backends.mkldnn.matmul.fp32_precision
left at its default, IEEE); their sums differ only in order (max |difference| ~5e-6 relative to the
output's scale on K 4096).

Chosen once, at import: oneDNN where torch was built with it, unless JAMBALAB_FP32_GEMM=blas (F.linear,
e.g. on a machine where MKL is the faster one; read when jambalab.ops.gemm is first imported).
Inference only: a call that needs gradients, a non-float32 or non-CPU tensor, or a weight that is not
contiguous takes F.linear (the twin, which tests compare it to); so does a call torch.compile traces
(inductor lowers F.linear to its own GEMM choice, and its lowering of this op wants a frozen weight).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

GEMM_ENV = "JAMBALAB_FP32_GEMM"

# oneDNN builds (JIT-compiles) one primitive per distinct shape and keeps it: ~0.3-0.6 MB of resident
# memory each, which ONEDNN_PRIMITIVE_CACHE_CAPACITY did not bound (1,000 distinct row counts against one
# 1024 x 256 weight grew the process by ~600 MB, and by ~370 MB with a capacity of 16). Prompt lengths and
# MoE experts' token counts vary without end, so the rows go through in blocks of BLOCK_ROWS, the last
# padded up to a multiple of PAD_ROWS, or under MIN_TAIL_ROWS rows left to F.linear: 8 shapes per weight
# shape at most. 256-row blocks ran A's and B's matrices about as fast as 512 or 2048 rows in one call
# (benchmarks/fp32_gemm.py).
BLOCK_ROWS = 256
PAD_ROWS = 32
MIN_TAIL_ROWS = 32

_BACKEND = "blas" if os.environ.get(GEMM_ENV, "").strip().lower() == "blas" else (
    "onednn" if torch.backends.mkldnn.is_available() else "blas")


def backend() -> str:
    """'onednn' or 'blas': what a prefill-sized float32 linear runs on in this process."""
    return _BACKEND


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x (..., K), weight (N, K), bias (N,)) -> (..., N); oneDNN's fp32 GEMM where it applies."""
    if _BACKEND == "onednn" and not torch.compiler.is_compiling() and _fits(x, weight, bias):
        return _onednn_blocks(x, weight, bias)
    return F.linear(x, weight, bias)


def _onednn_blocks(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x (..., K) @ weight^T + bias through oneDNN calls of BLOCK_ROWS rows each, the last one's rows
    padded with zeros up to a multiple of PAD_ROWS (and the padding's outputs dropped); a last block of
    fewer than MIN_TAIL_ROWS rows goes to F.linear, where padding would add up to the rows themselves."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    m = x2.shape[0]
    full = m - m % BLOCK_ROWS
    parts = [_onednn_linear(x2[lo:lo + BLOCK_ROWS], weight, bias) for lo in range(0, full, BLOCK_ROWS)]
    tail = x2[full:]  # (r, K), r < BLOCK_ROWS
    if 0 < tail.shape[0] < MIN_TAIL_ROWS:
        parts.append(F.linear(tail, weight, bias))
    elif tail.shape[0]:
        pad = -tail.shape[0] % PAD_ROWS
        if pad:
            tail = torch.cat([tail, tail.new_zeros(pad, tail.shape[1])])
        parts.append(_onednn_linear(tail, weight, bias)[:m - full])
    y = parts[0] if len(parts) == 1 else torch.cat(parts)  # (M, N)
    return y.view(*x.shape[:-1], weight.shape[0])


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")  # no post-op


def _fits(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (all(t.dtype == torch.float32 and t.is_cpu for t in tensors)
            and x.dim() >= 2 and weight.dim() == 2 and weight.is_contiguous() and x.shape[-1] == weight.shape[1]
            and x.numel() > 0 and weight.numel() > 0
            and (bias is None or (bias.dim() == 1 and bias.is_contiguous()))
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


__all__ = ["linear", "backend", "GEMM_ENV"]
