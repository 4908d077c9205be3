"""Mamba kernels behind one signature each: a fast implementation when one is
available, else the pure-PyTorch reference twin (jambalab.ops.*_ref).

Legend: B batch, L length, D d_inner, N d_state, K d_conv.

- selective_scan, causal_conv1d, dt_softplus, linear, rms_norm, selective_state_update,
  causal_conv1d_update, cross_entropy, linear_cross_entropy (lm_head + loss in row chunks),
  decode_attention (one query per head over a KV cache), and the whole-layer decode steps
  (decode_fusable, mamba_decode, mlp_decode, moe_decode), and decode_step (a whole decode token
  in one call; None under JAMBALAB_KERNELS=ref): the fused CPU kernels of
  jambalab/ops/fused.py. They check their inputs (InputError), run
  the C++ kernels for CPU tensors and the reference for any other device. The
  C++ is compiled once per machine at the first CPU call (cached under
  ~/.cache/jambalab/torch_extensions, see jambalab/ops/cpu.py); if it cannot
  be built, one RuntimeWarning is issued and the references are used.

Environment: JAMBALAB_KERNELS=ref binds the pure-PyTorch references directly
(no compile, no extra checks), e.g. to rule the kernels out when debugging.
Any other value, or none, means "fused where possible". It is read once, when
jambalab.ops is first imported.

Callers look the functions up on the module (`ops.selective_scan(...)`), so
tests may rebind them.
"""

import os

import torch

from jambalab.ops.conv_ref import causal_conv1d_ref, causal_conv1d_update_ref, conv_state_update
from jambalab.ops.attention_ref import decode_attention_ref
from jambalab.ops.loss_ref import linear_cross_entropy_ref
from jambalab.ops.quant_ref import QuantWeight, linear_ref
from jambalab.ops.scan_ref import dt_softplus_ref, rms_norm_ref, selective_scan_ref, selective_state_update_ref

KERNELS_ENV = "JAMBALAB_KERNELS"

if os.environ.get(KERNELS_ENV, "").strip().lower() == "ref":
    causal_conv1d = causal_conv1d_ref
    dt_softplus = dt_softplus_ref
    linear = linear_ref
    rms_norm = rms_norm_ref
    selective_scan = selective_scan_ref
    selective_state_update = selective_state_update_ref
    causal_conv1d_update = causal_conv1d_update_ref
    cross_entropy = torch.nn.functional.cross_entropy
    linear_cross_entropy = linear_cross_entropy_ref
    decode_attention = decode_attention_ref

    def decode_fusable(*_) -> bool:
        return False  # the model then decodes layer by layer through the references above

    decode_step = None
else:
    from jambalab.ops.fused import (
        causal_conv1d,
        causal_conv1d_update,
        cross_entropy,
        decode_attention,
        decode_fusable,
        decode_step,
        dt_softplus,
        linear,
        linear_cross_entropy,
        mamba_decode,
        mlp_decode,
        moe_decode,
        rms_norm,
        selective_scan,
        selective_state_update,
    )

__all__ = [
    "selective_scan",
    "selective_state_update",
    "causal_conv1d",
    "causal_conv1d_update",
    "conv_state_update",
    "cross_entropy",
    "decode_attention",
    "decode_attention_ref",
    "decode_fusable",
    "decode_step",
    "dt_softplus",
    "dt_softplus_ref",
    "linear",
    "linear_ref",
    "QuantWeight",
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "rms_norm",
    "rms_norm_ref",
    "selective_scan_ref",
    "selective_state_update_ref",
    "causal_conv1d_ref",
    "causal_conv1d_update_ref",
    "KERNELS_ENV",
]
