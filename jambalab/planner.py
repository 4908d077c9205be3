"""Plan a hybrid: which (a:m, e, n, K, layers, width) fit a memory budget at a target context
with about a target number of active parameters.

The paper (Jamba Sec. 3.1) picked 4 blocks of l=8 layers, a:m=1:7, e=2, n=16, K=2, d_model 4096
to fit one 80 GB GPU with int8 weights and long contexts; plan() finds that config among others.
Shapes other than the knobs follow Jamba's proportions: head_dim 128, 8 KV heads, d_ff = 3.5 d,
d_inner = 2 d, d_state 16, vocab 65536.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from jambalab.config import JambaConfig
from jambalab.errors import ConfigError
from jambalab.memory import DEFAULT_CHUNK, MemoryReport, check_dtype, check_positive, memory_report
from jambalab.stats import param_counts_fast

WIDTHS = (2048, 3072, 4096, 5120, 6144, 8192)
LAYERS = tuple(range(8, 129, 8))
# Width per layer d/L kept within the range of released models (Jamba 128, Llama-2-70B 102,
# Llama-3.1-405B 130): a 112-layer, 2048-wide stack fits the arithmetic but nobody would train it.
ASPECT = (64, 256)
# (a, m): attention and Mamba layers per block. Only hybrids: the paper's ablations (Sec. 6) find
# pure Mamba fails in-context learning and pure attention needs the KV cache a hybrid avoids.
RATIOS = ((1, 1), (1, 3), (1, 7), (1, 15))
# (e, n, K): an MoE every e layers with n experts, top-K; (0, 1, 1) = dense MLPs only.
MOES = ((0, 1, 1),) + tuple((e, n, k) for e in (1, 2, 4) for n in (4, 8, 16, 32, 64) for k in (1, 2, 4) if k < n)


@dataclass
class Candidate:
    ratio: tuple[int, int]
    e: int
    n: int
    k: int
    n_layers: int
    d_model: int
    report: MemoryReport

    @property
    def blocks(self) -> int:
        return self.n_layers // sum(self.ratio)

    def knobs(self) -> dict:
        return {"a": self.ratio[0], "m": self.ratio[1], "e": self.e, "n": self.n, "K": self.k,
                "blocks": self.blocks, "n_layers": self.n_layers, "d_model": self.d_model}

    def is_paper_choice(self) -> bool:
        return self.knobs() == PAPER_CHOICE


PAPER_CHOICE = {"a": 1, "m": 7, "e": 2, "n": 16, "K": 2, "blocks": 4, "n_layers": 32, "d_model": 4096}


def hybrid_config(ratio: tuple[int, int], e: int, n: int, k: int, n_layers: int, d_model: int) -> JambaConfig:
    """A Jamba-proportioned config with the given knobs (attention at the middle of each block, as Jamba)."""
    a, m = ratio
    period = a + m
    d_ff = int(3.5 * d_model) // 256 * 256
    return JambaConfig(
        vocab_size=65536, d_model=d_model, n_layers=n_layers,
        attn_layer_period=period if a else 0, attn_layer_offset=period // 2 if a and m else 0,
        expert_layer_period=e, expert_layer_offset=1 if e > 1 else 0, n_experts=n, top_k=k,
        n_heads=d_model // 128, n_kv_heads=8, d_ff=d_ff, d_state=16, expand=2,
        name=f"{a}:{m} e={e} n={n} K={k} L={n_layers} d={d_model}")


def plan(budget: int, context: int, active: int, batch: int = 1, dtype: str = "int8", tolerance: float = 0.15,
         prefill_chunk: int | None = DEFAULT_CHUNK, headroom: float = 0.25) -> list[Candidate]:
    """Every enumerated config within `tolerance` of `active` params whose memory at `context` and
    `batch` leaves `headroom` of the budget free, the most total parameters (capacity at that
    compute) first.

    The headroom is the paper's "sufficient memory for the inputs" (Sec. 3.1): room for longer
    prompts, a larger batch, allocator slack. Without it the top answers fill the budget to the
    byte at exactly the target context.
    """
    check_positive("budget", budget)
    check_positive("context", context)
    check_positive("batch", batch)
    check_dtype(dtype)
    if not 0 < tolerance < 1:
        raise ConfigError(f"tolerance must lie in (0, 1), got {tolerance}")
    if not 0 <= headroom < 1:
        raise ConfigError(f"headroom must lie in [0, 1), got {headroom}")
    usable = (1 - headroom) * budget
    out = []
    for ratio, (e, n, k), n_layers, d in itertools.product(RATIOS, MOES, LAYERS, WIDTHS):
        if n_layers % sum(ratio) or not ASPECT[0] <= d / n_layers <= ASPECT[1]:
            continue
        cfg = hybrid_config(ratio, e, n, k, n_layers, d)
        if abs(param_counts_fast(cfg)[1] - active) > tolerance * active:
            continue
        rep = memory_report(cfg, context, batch, dtype, prefill_chunk)
        if rep.total_bytes <= usable:
            out.append(Candidate(ratio, e, n, k, n_layers, d, rep))
    out.sort(key=lambda c: (-c.report.params_total, c.report.total_bytes))
    return out
