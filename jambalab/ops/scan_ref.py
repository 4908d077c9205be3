"""Pure-PyTorch reference selective scan (Mamba-1), chunked over time.

Legend: B batch, L length, D d_inner (channels), N d_state, T chunk length.

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t        (fp32 state, (B, D, N))
    y_t = h_t . C_t + D * x_t ;  y_t *= silu(z_t)

This is the numerical twin of the fused kernels in jambalab.ops: same
signature, same results. It walks the sequence in chunks of T steps, so the
largest temporary is (B, T, D, N), never (B, L, D, N) as in HF's slow path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_ref(
    x: torch.Tensor,  # (B, L, D)
    dt: torch.Tensor,  # (B, L, D), already softplus'd
    A: torch.Tensor,  # (D, N), negative
    B: torch.Tensor,  # (B, L, N)
    C: torch.Tensor,  # (B, L, N)
    D: torch.Tensor | None = None,  # (D,)
    z: torch.Tensor | None = None,  # (B, L, D)
    h0: torch.Tensor | None = None,  # (B, D, N) fp32
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y (B, L, D) in x.dtype, h_last (B, D, N) fp32)."""
    bsz, length, d_inner = x.shape
    d_state = A.shape[-1]
    h = (
        torch.zeros(bsz, d_inner, d_state, dtype=torch.float32, device=x.device)
        if h0 is None
        else h0.float()
    )
    A = A.float()
    ys = []
    for s in range(0, length, chunk_size):
        e = min(s + chunk_size, length)
        dt_c = dt[:, s:e].float()  # (B, T, D)
        x_c = x[:, s:e].float()
        dA = torch.exp(dt_c[..., None] * A)  # (B, T, D, N)
        dBx = (dt_c * x_c)[..., None] * B[:, s:e, None, :].float()  # (B, T, D, N)
        # unbind, not per-step indexing: indexing makes autograd's backward quadratic in L.
        y_steps = []
        for dA_t, dBx_t, C_t in zip(dA.unbind(1), dBx.unbind(1), C[:, s:e].float().unbind(1)):
            h = dA_t * h + dBx_t  # (B, D, N)
            y_steps.append(torch.einsum("bdn,bn->bd", h, C_t))  # (B, D)
        ys.append(torch.stack(y_steps, dim=1))  # (B, T, D)
    y = torch.cat(ys, dim=1) if ys else x.new_zeros(bsz, 0, d_inner, dtype=torch.float32)
    return _skip_and_gate(y, x, D, z), h


def _skip_and_gate(y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None):
    # Like HF: the skip and the gate are applied in fp32 (y fp32, D fp32), then cast to x's dtype.
    if D is not None:
        y = y + x.float() * D.float()
    if z is not None:
        y = y * F.silu(z).float()
    return y.to(x.dtype)


def selective_state_update_ref(
    h: torch.Tensor,  # (B, D, N) fp32, updated in place
    x: torch.Tensor,  # (B, D)
    dt: torch.Tensor,  # (B, D), already softplus'd
    A: torch.Tensor,  # (D, N)
    B: torch.Tensor,  # (B, N)
    C: torch.Tensor,  # (B, N)
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,  # (B, D)
) -> torch.Tensor:
    """One decode step of the scan; mutates h, returns y (B, D) in x.dtype."""
    dA = torch.exp(dt.float()[..., None] * A.float())  # (B, D, N)
    dBx = (dt.float() * x.float())[..., None] * B.float()[:, None, :]
    h.mul_(dA).add_(dBx)
    y = torch.einsum("bdn,bn->bd", h, C.float())
    return _skip_and_gate(y, x, D, z)


def dt_softplus_ref(dt: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The mixer's time step: softplus(dt + bias), the bias cast to dt's dtype first (HF's order). (..., D)."""
    return torch.nn.functional.softplus(dt + bias.to(dt.dtype))


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """HF's RMSNorm op order: normalise in fp32, cast back to x's dtype, then scale. (..., K)."""
    h = x.float()
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return h if weight is None else weight * h
