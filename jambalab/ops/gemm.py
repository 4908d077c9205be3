"""Prefill-sized float32 matmuls on the CPU: oneDNN's fp32 GEMM instead of the BLAS behind F.linear.

Legend: M rows of x (tokens), K in_features, N out_features.

torch's x86 wheels run a float32 F.linear through MKL's sgemm. The same wheels carry oneDNN, whose
fp32 matmul (torch.ops.mkldnn._linear_pointwise, the op torch.compile's CPU backend itself emits for
linear layers) reads the plain row-major weight as it is: no packed copy, no extra memory.
`python benchmarks/fp32_gemm.py` on this project's 2-core AMD EPYC (AVX-512), 2 threads, GFLOP/s (best of 3), F.linear / oneDNN:

    N x K of the weight          M=17       M=64       M=512      M=2048
    16384 x 4096 (A in_proj)     34 / 107   68 / 176   119 / 201  141 / 201
    4096 x 8192  (A out_proj)    59 / 108   110 / 176  151 / 197  170 / 191
    3328 x 1024  (B expert)      68 / 120   130 / 175  137 / 194  153 / 174
    4096 x 1024  (B in_proj)     40 / 77    64 / 145   126 / 184  124 / 164

A 512-token fp32 prefill (3 interleaved rounds, fresh processes; JAMBALAB_FP32_GEMM=blas for before)
went from 93 to 125 tokens/s on A (Falcon-Mamba-7B-shaped, 6 layers) and from 393 to 483 on B
(Jamba-shaped, d 1024), medians. Both are float32 throughout (torch.backends.mkldnn.matmul.fp32_precision
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

_BACKEND = "blas" if os.environ.get(GEMM_ENV, "").strip().lower() == "blas" else (
    "onednn" if torch.backends.mkldnn.is_available() else "blas")


def backend() -> str:
    """'onednn' or 'blas': what a prefill-sized float32 linear runs on in this process."""
    return _BACKEND


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x (..., K), weight (N, K), bias (N,)) -> (..., N); oneDNN's fp32 GEMM where it applies."""
    if _BACKEND == "onednn" and not torch.compiler.is_compiling() and _fits(x, weight, bias):
        return _onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


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
