"""The training loss's pure-PyTorch reference twin.

Legend: T rows (tokens), d d_model, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def linear_cross_entropy_ref(h: Tensor, weight: Tensor, target: Tensor, ignore_index: int = -100) -> Tensor:
    """mean over kept rows of cross_entropy(h (T, d) @ weight (V, d)^T, target (T,)): the lm_head and
    the loss, with the (T, V) logits in fp32 (the model's order: project, then .float())."""
    return F.cross_entropy(F.linear(h, weight).float(), target, ignore_index=ignore_index)
