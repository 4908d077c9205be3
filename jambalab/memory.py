"""Inference memory arithmetic: weights, KV cache, Mamba state, activations, and the inverse questions.

Legend: B batch, S context (attended tokens), c prefill chunk (tokens per forward call),
d d_model, D d_inner, N d_state, R dt_rank, F d_ff, E experts, K top-k, V vocab.

Conventions (docs/memory.md says why):
- "GB" in the papers' tables means GiB (Jamba's 4 GB = 16 KiB/token x 262144 tokens exactly);
  sizes we print are GiB. Parsed sizes: KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of 1024.
- Weights: fp32 4 bytes, bf16 2 bytes per parameter. int8 is weight-only quantization (as
  Jamba-1.5's ExpertsInt8 and LLM.int8): 1 byte for the big matrices (attention, Mamba
  projections, MLPs, experts), 16-bit for embeddings, lm_head, routers, norms and Mamba's small
  parameters (conv, A_log, D, biases); per-channel scales (< 0.1% of the bytes) are not counted.
- KV cache: 16-bit for bf16 and int8 weights (the paper keeps KV in 16-bit), fp32 for fp32.
- Mamba state: SSM state always fp32, conv state in the compute dtype (REFERENCE.md).
- Activations: the peak of one prefill forward call over a chunk of c tokens, inference only
  (no autograd), with logits_to_keep=1; see activation_bytes.
- The KV cache is preallocated for the whole context (model.allocate_cache(B, max_length=S)),
  so it never pays the transient copy of a growing buffer.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from jambalab.config import JambaConfig
from jambalab.errors import InputError
from jambalab.stats import MATRIX_GROUPS, kv_bytes_per_token, param_breakdown, param_counts_fast, ssm_state_bytes

DTYPES = ("fp32", "bf16", "int8")
DEFAULT_CHUNK = 2048
GiB = 2**30
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
# SDPA materialises at most this many mask entries per call (jambalab.model._MAX_MASK_ELEMENTS).
_MASK_BLOCK = 1 << 25


# ---------------------------------------------------------------------------------------
# Input parsing and checks
# ---------------------------------------------------------------------------------------
def parse_size(text: str | int) -> int:
    """'80GB' -> 80e9, '80GiB' -> 80 * 2**30, '512MiB', '1.5TB', '1000' (bytes). Errors name the input."""
    if isinstance(text, int):
        return _positive_size(text, str(text))
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?)?(b)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise InputError(f"cannot parse size {text!r}: use a number with an optional unit, e.g. 80GB, 80GiB, 512MiB")
    unit = (m.group(2) or "").lower()
    return _positive_size(int(float(m.group(1)) * _UNITS[unit]), text)


def _positive_size(n: int, text: str) -> int:
    if n <= 0:
        raise InputError(f"size {text!r} must be positive")
    return n


def parse_count(text: str | int) -> int:
    """'12B' -> 12e9, '700M' -> 7e8, '52e9' -> 52e9 (parameter counts)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbt])?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise InputError(f"cannot parse count {text!r}: use a number with an optional K/M/B/T suffix, e.g. 12B")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}[(m.group(2) or "").lower()]
    n = int(float(m.group(1)) * scale)
    if n <= 0:
        raise InputError(f"count {text!r} must be positive")
    return n


def check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return dtype


# ---------------------------------------------------------------------------------------
# The forward computation: bytes for a config at (context, batch, dtype, chunk)
# ---------------------------------------------------------------------------------------
def weight_bytes(cfg: JambaConfig, dtype: str) -> int:
    groups = param_breakdown(cfg)
    if dtype == "int8":
        big = sum(groups[g] for g in MATRIX_GROUPS)
        return big + 2 * (sum(groups.values()) - big)
    return {"fp32": 4, "bf16": 2}[check_dtype(dtype)] * sum(groups.values())


def compute_bytes(dtype: str) -> int:
    """Bytes per activation element: int8 weights are dequantized into bf16 matmuls."""
    return 4 if dtype == "fp32" else 2


def kv_cache_bytes(cfg: JambaConfig, context: int, batch: int, dtype: str) -> int:
    return kv_bytes_per_token(cfg, "fp32" if dtype == "fp32" else "bf16") * context * batch


def mamba_state_bytes(cfg: JambaConfig, batch: int, dtype: str) -> int:
    return ssm_state_bytes(cfg, "fp32" if dtype == "fp32" else "bf16") * batch


def activation_bytes(cfg: JambaConfig, chunk: int, batch: int, dtype: str, context: int | None = None,
                     logits_to_keep: int = 1) -> int:
    """Estimated peak of live activations in one prefill call of `chunk` tokens per sequence.

    peak = B * c * (stream + max over layer kinds of its per-token live bytes) + attention mask + logits.
    Layers run one after another and free their temporaries, so the peak is one layer's, not a
    sum over layers. Per token, with s bytes per element (4 fp32, 2 otherwise):
      stream     residual + normed input: d * (s or 4 if residual_in_fp32) + d * s
      attention  q, k, v, attention output, its (B, L, H*hd) copy, o_proj output
      mamba      in_proj output 2D, conv output D, dt D, the gate z copied to rows D, the fused scan's
                 output D (jambalab.ops.fused; the pure-PyTorch reference scan holds more), x_proj
                 output R + 2N, out_proj output d
      mlp        gate and up 2F (SwiGLU runs in place at inference, jambalab.model.swiglu), down
                 output d, plus the block's normed input d
      moe        tokens gathered K*d, expert outputs and their weighted copy 2K*d, scatter target d,
                 each expert's 2F intermediates over its share c*K/E of the tokens (balanced router)
    A chunk after the first attends over cached keys with an explicit boolean causal mask, built
    per block of query rows (1 byte per entry, at most 32 MiB): what jambalab.model.attend does on
    a GPU, with left padding, or under autograd. CPU inference in fp32/bf16 without padding builds
    no mask (two flash calls), so there the figure is high by at most those 32 MiB. The logits:
    B * V * logits_to_keep (0 = every position of the chunk, as HF generate computed them for
    Llama/Mixtral in 2024), in the compute dtype plus their fp32 copy.
    Within 0.85-1.3x of the measured peak on 8 small configs (docs/memory.md); tests/test_memory.py
    checks one within a factor of 2.
    """
    context = chunk if context is None else context
    s = compute_bytes(dtype)
    tokens = batch * chunk
    per_token = _stream_bytes(cfg, s) + max(_layer_bytes(cfg, s))
    mask = 0
    if cfg.n_attention_layers and context > chunk:  # past > 0: explicit mask path
        # rows per block are floor(2**25 / S); the bound below ignores the floor so that memory
        # stays monotone in the context (the inverse questions bisect on it)
        mask = min(chunk * context, _MASK_BLOCK)
    kept = chunk if logits_to_keep <= 0 else min(logits_to_keep, chunk)
    logits = batch * kept * cfg.vocab_size * (s + (4 if s != 4 else 0))
    return tokens * per_token + mask + logits


def _stream_bytes(cfg: JambaConfig, s: int) -> int:
    return cfg.d_model * (4 if cfg.residual_in_fp32 else s) + cfg.d_model * s


def _layer_bytes(cfg: JambaConfig, s: int) -> list[int]:
    """Per-token live bytes inside each kind of sublayer the config has."""
    d, D = cfg.d_model, cfg.d_inner
    kinds = []
    if cfg.n_attention_layers:
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        kinds.append((3 * q + 2 * kv + d) * s)
    if cfg.n_mamba_layers:
        kinds.append((6 * D + cfg.dt_rank + 2 * cfg.d_state + d) * s)
    if cfg.d_ff:
        F = cfg.d_ff
        if cfg.n_layers > cfg.n_moe_layers:  # some layer keeps a dense MLP
            kinds.append((2 * F + 2 * d) * s)
        if cfg.n_moe_layers:
            share = cfg.top_k / cfg.n_experts
            kinds.append(int((3 * cfg.top_k * d + 2 * d + 2 * F * share) * s) + cfg.n_experts * (s + 4))
    return kinds


@dataclass
class MemoryReport:
    name: str
    dtype: str
    context: int
    batch: int
    prefill_chunk: int
    params_total: int
    params_active: int
    weight_bytes: int
    kv_cache_bytes: int
    ssm_state_bytes: int
    activation_bytes: int
    total_bytes: int
    kv_bytes_per_token: int  # per sequence, all attention layers

    def to_dict(self) -> dict:
        return asdict(self)


def memory_report(cfg: JambaConfig, context: int, batch: int = 1, dtype: str = "bf16",
                  prefill_chunk: int | None = DEFAULT_CHUNK, logits_to_keep: int = 1) -> MemoryReport:
    """Everything that must be resident to prefill `context` tokens for `batch` sequences and decode on.

    prefill_chunk None (or >= context) means the whole prompt in one forward call.
    """
    check_positive("context", context)
    check_positive("batch", batch)
    check_dtype(dtype)
    chunk = context if prefill_chunk is None else min(check_positive("prefill chunk", prefill_chunk), context)
    total, active = param_counts_fast(cfg)
    w = weight_bytes(cfg, dtype)
    kv = kv_cache_bytes(cfg, context, batch, dtype)
    state = mamba_state_bytes(cfg, batch, dtype)
    act = activation_bytes(cfg, chunk, batch, dtype, context, logits_to_keep)
    kv_tok = kv_bytes_per_token(cfg, "fp32" if dtype == "fp32" else "bf16")
    return MemoryReport(cfg.name, dtype, context, batch, chunk, total, active, w, kv, state, act,
                        w + kv + state + act, kv_tok)


# ---------------------------------------------------------------------------------------
# Inverse questions: the longest context at a batch, the largest batch at a context
# ---------------------------------------------------------------------------------------
UNBOUNDED = -1  # a model without attention layers: context costs no memory (chunked prefill)
_SEARCH_CAP = 1 << 40


def check_budget(cfg: JambaConfig, budget: int, dtype: str) -> None:
    w = weight_bytes(cfg, dtype)
    if budget <= w:
        raise InputError(f"budget {budget / GiB:.2f} GiB is smaller than the {dtype} weights of {cfg.name} "
                         f"({w / GiB:.2f} GiB): nothing fits")


def max_context(cfg: JambaConfig, budget: int, batch: int = 1, dtype: str = "bf16",
                prefill_chunk: int | None = DEFAULT_CHUNK, logits_to_keep: int = 1) -> int:
    """The longest context whose memory_report total fits the budget (0 if not one token fits).

    UNBOUNDED for a model without attention layers prefilled in chunks: its memory does not grow
    with the context at all (Falcon Mamba's "prompts of any length").
    """
    check_budget(cfg, budget, dtype)
    check_positive("batch", batch)

    def fits(n: int) -> bool:
        return memory_report(cfg, n, batch, dtype, prefill_chunk, logits_to_keep).total_bytes <= budget

    if cfg.n_attention_layers == 0 and prefill_chunk is not None and fits(prefill_chunk):
        return UNBOUNDED
    return _largest(fits)


def max_batch(cfg: JambaConfig, budget: int, context: int, dtype: str = "bf16",
              prefill_chunk: int | None = DEFAULT_CHUNK, logits_to_keep: int = 1) -> int:
    """The largest batch whose memory_report total at `context` fits the budget (0 if none)."""
    check_budget(cfg, budget, dtype)
    check_positive("context", context)
    return _largest(lambda b: memory_report(cfg, context, b, dtype, prefill_chunk, logits_to_keep).total_bytes
                    <= budget)


def _largest(fits) -> int:
    """The largest n >= 1 with fits(n), for a monotone predicate (0 if fits(1) is false)."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi < _SEARCH_CAP and fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # invariant: fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
