"""Decode attention's pure-PyTorch reference twin.

Legend: B batch, H query heads, Hk key/value heads, S cached keys, hd head_dim.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def decode_attention_ref(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """One query per head, q (B, H, hd), over every key of k, v (B, Hk, S, hd), all visible:
    softmax(q k^T / sqrt(hd)) v with query head h reading kv head h // (H / Hk). Returns (B, H, hd)."""
    return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]
