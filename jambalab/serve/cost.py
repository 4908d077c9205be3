"""Prefill cost in FLOPs: what the engine's chunk budget and the prefix cache's eviction both weigh.

Token t of a prompt costs 2 x the active parameters of its layers (every linear layer, the MoE's
routed experts; not the embedding, a lookup, nor the lm_head, which a prefill runs on its last
token only) plus, in each attention layer, QK^T and AV over its t + 1 keys: 4 x n_heads x head_dim FLOPs a key.
So prefilling tokens [start, end) costs

    linear * (end - start) + attention * (end^2 - start^2) / 2

A chunk that attends over a long cached prefix costs more than one of the same length at the
start: at 100,000 cached tokens, bench-hybrid's attention term is ~4x its linear term.

An attention FLOP is not a GEMM FLOP: SDPA over a long prefix with a short chunk of queries runs below
the GEMMs' rate. `attention_weight` scales the attention term to what it costs in time. The engine's
default (EngineConfig.attention_cost, 1.4) is a least-squares fit of 1,182 chunk times of a 100,000-token
prompt of bench-hybrid on the 2-core CPU (time = a * linear + b * attention; b / a = 1.42); with weight
1, the last tenth's chunks ran 34% longer than the first tenth's.
"""

from __future__ import annotations

import math


class PrefillCost:
    def __init__(self, model, attention_weight: float = 1.0):
        cfg = model.config
        tables = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)  # embedding, lm_head
        self.linear = 2 * (model.num_active_parameters() - tables)
        n_attn = sum(cfg.is_attention(i) for i in range(cfg.n_layers))
        self.attention = 4 * n_attn * cfg.n_heads * cfg.head_dim * attention_weight

    def __call__(self, start: int, end: int) -> float:
        """FLOPs to prefill tokens [start, end) after `start` cached ones."""
        return self.linear * (end - start) + self.attention * (end * end - start * start) / 2

    def chunk_end(self, start: int, max_tokens: int, budget: float) -> int:
        """The furthest end <= start + max_tokens with cost(start, end) <= budget (at least start + 1):
        a function of the position only, so a prompt is cut the same way whatever else runs."""
        end = start + max_tokens
        if self(start, end) <= budget:
            return end
        # attention/2 * end^2 + linear * end - (budget + linear * start + attention/2 * start^2) = 0
        a, b = self.attention / 2, self.linear
        c = budget + b * start + a * start * start
        end = min(end, int((-b + math.sqrt(b * b + 4 * a * c)) / (2 * a)))
        while end > start + 1 and self(start, end) > budget:  # float rounding
            end -= 1
        return max(end, start + 1)
