"""Mamba kernels behind one signature each: a fast implementation when one is
available, else the pure-PyTorch reference twin (jambalab.ops.*_ref).

The fast path is chosen once, at first use.
"""

from jambalab.ops.conv_ref import causal_conv1d_ref, causal_conv1d_update_ref, conv_state_update
from jambalab.ops.scan_ref import selective_scan_ref, selective_state_update_ref

selective_scan = selective_scan_ref
selective_state_update = selective_state_update_ref
causal_conv1d = causal_conv1d_ref
causal_conv1d_update = causal_conv1d_update_ref

__all__ = [
    "selective_scan",
    "selective_state_update",
    "causal_conv1d",
    "causal_conv1d_update",
    "conv_state_update",
    "selective_scan_ref",
    "selective_state_update_ref",
    "causal_conv1d_ref",
    "causal_conv1d_update_ref",
]
