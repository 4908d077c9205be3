"""Pure-PyTorch reference for the depthwise causal conv used by the Mamba mixer.

Legend: B batch, L length, D d_inner, K d_conv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_ref(
    x: torch.Tensor,  # (B, L, D)
    weight: torch.Tensor,  # (D, K)
    bias: torch.Tensor | None,  # (D,)
    conv_state: torch.Tensor | None = None,  # (B, D, K): the last K inputs before x (zeros = fresh)
) -> torch.Tensor:
    """silu(depthwise causal conv(x)), continuing from conv_state. Returns (B, L, D) in x.dtype.

    conv_state holds the last K pre-conv inputs (HF's layout); only its last K-1 columns
    matter for the next output. It is not modified here (see conv_state_update).
    """
    bsz, length, d_inner = x.shape
    k = weight.shape[-1]
    xt = x.transpose(1, 2)  # (B, D, L)
    if conv_state is None:
        xt = F.pad(xt, (k - 1, 0))
    else:
        xt = torch.cat([conv_state[:, :, 1:].to(x.dtype), xt], dim=-1)  # (B, D, K-1+L)
    out = F.conv1d(xt.to(weight.dtype), weight.unsqueeze(1), bias, groups=d_inner)  # (B, D, L)
    return F.silu(out).to(x.dtype).transpose(1, 2)


def conv_state_update(conv_state: torch.Tensor, x: torch.Tensor) -> None:
    """Shift the new inputs x (B, L, D) into conv_state (B, D, K) in place."""
    k = conv_state.shape[-1]
    xt = x.transpose(1, 2).to(conv_state.dtype)  # (B, D, L)
    if xt.shape[-1] >= k:
        conv_state.copy_(xt[:, :, -k:])
    else:
        conv_state.copy_(torch.cat([conv_state[:, :, xt.shape[-1]:], xt], dim=-1))


def causal_conv1d_update_ref(
    x: torch.Tensor,  # (B, D): one new token
    conv_state: torch.Tensor,  # (B, D, K), updated in place
    weight: torch.Tensor,  # (D, K)
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """One decode step of the conv: shift x into the state and return silu(conv) (B, D)."""
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x.to(conv_state.dtype)
    out = (conv_state.to(weight.dtype) * weight).sum(-1)  # (B, D)
    if bias is not None:
        out = out + bias
    return F.silu(out).to(x.dtype)
