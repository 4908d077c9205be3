"""Generation: chunked prefill into an explicit cache, then one token per step.

Legend: B batch, L prompt length (padded), V vocab, C prefill chunk length.

    prefill(model, ids, cache, chunk_size=C)   -> last logits (B, V); the cache now holds the prompt
    stream_generate(model, ids, n, ...)        -> yields the next token of every row, (B,), as it comes
    generate(model, ids, n, ...)               -> prompt + new tokens, (B, L + n'), like transformers

Prefill runs in chunks of any size with logits_to_keep=1: the Mamba layers carry conv and SSM
state across chunks (exact, unlike transformers 5.23) and no (L, V) logits are ever built, so a
long prompt costs memory only for the attention layers' KV cache.

Batches are LEFT-padded (attention_mask 0 = padding, as transformers); padding never reaches the
conv, SSM or attention state, so each row yields exactly the tokens it would yield alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from jambalab.cache import HybridCache
from jambalab.errors import InputError
from jambalab.ops import cpu


@dataclass
class SamplingParams:
    """How the next token is picked from the logits (transformers' order: temperature, top-k, top-p)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def validate(self) -> None:
        if not self.temperature >= 0:  # also rejects NaN
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise InputError(f"top_k must be a positive integer, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError(f"top_p must lie in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


# Top-k and top-p keep a prefix of the tokens sorted by logit, so the filters and the draw run on the C
# highest logits (torch.topk): C = 256 first, then 4096, then a sort of all V only when the nucleus is
# that wide (a flat distribution, as an untrained model's). The draw inverts the candidates' cumulative
# probabilities with one uniform number per row, and all of it runs on the calling thread
# (cpu.one_aten_thread). On a 65,536 vocabulary the reference (sample_probs_ref, then torch.multinomial)
# took 7.0-7.4 ms a row with top-p 0.9 (a full sort, and multinomial's V exponential draws) and 2.9-3.5
# ms with top-k 40 as well; this takes 0.3-0.5 ms (a nucleus of up to 256 tokens). Decoding bench
# peers' B in weight-only bf16 at temperature 0.7, top-k 40, top-p 0.9 went from 40-43 to 52-66
# tokens/s (3 interleaved rounds; greedy 51-65): besides the sampler's own 3.6 ms, its ops on two
# threads had left torch's OpenMP workers spinning into the next step (17 -> 21 ms a forward).
_FIRST_CANDIDATES = 256


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) fp32 -> token ids (B,)."""
    if params.greedy:
        return logits.argmax(dim=-1)  # first maximum on ties, as transformers
    with cpu.one_aten_thread() if logits.is_cpu else contextlib.nullcontext():
        probs, ids = sample_probs(logits, params)  # (B, C)
        pick = _draw(probs, generator)  # (B,) indices into the C candidates
        return pick if ids is None else ids.gather(-1, pick[:, None])[:, 0]


def sample_probs(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sampling distribution on its candidates: (probs (B, C) float64, token ids (B, C)), the
    candidates the C highest logits in descending order and the tokens top-k / top-p drop at
    probability 0; or (probs (B, V), None) over the whole vocabulary when neither filter applies. The
    distribution of sample_probs_ref (transformers' order: temperature, top-k, then top-p over what
    top-k kept), its probabilities in float64 (the twin's in the logits' dtype)."""
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    top_k = params.top_k if params.top_k is not None and params.top_k < vocab else None
    top_p = params.top_p if params.top_p is not None and params.top_p < 1 else None
    if top_k is None and top_p is None:
        return F.softmax(logits.double(), dim=-1), None
    if top_k is not None:  # every token top-k keeps is a candidate: softmax over them, then top-p
        values, ids = torch.topk(logits, top_k, dim=-1)  # (B, k), descending
        kth = values[:, -1:]
        ties = int((logits >= kth).sum(dim=-1).max())  # logits equal to the k-th stay too, as the reference
        if ties > top_k:
            values, ids = torch.topk(logits, ties, dim=-1)
            values = values.masked_fill(values < kth, float("-inf"))
        probs = F.softmax(values.double(), dim=-1)
        return (probs, ids) if top_p is None else (_nucleus(probs, top_p), ids)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True).double()  # (B, 1): the whole vocabulary's normaliser
    c = min(vocab, _FIRST_CANDIDATES)
    while True:
        # (B, C), descending; a whole-vocabulary topk ran ~1.5x slower than the sort
        values, ids = torch.sort(logits, dim=-1, descending=True) if c == vocab else torch.topk(logits, c, dim=-1)
        probs = torch.exp(values.double() - lse)
        # Every row's nucleus lies in the candidates once their mass reaches top_p (or all V are in).
        if c == vocab or bool((probs.sum(dim=-1) >= top_p).all()):
            return _nucleus(probs, top_p), ids
        c = vocab if 16 * c >= vocab else 16 * c  # a wide nucleus (a flat distribution): soon all of them


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs (B, C) in descending order, renormalised over the candidates top-p keeps: those whose
    predecessors' mass is below top_p (the first always)."""
    above = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill(above >= top_p, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of probs (B, C), with probability proportional to its entry: the first whose
    cumulative mass passes a uniform fraction of the row's total."""
    cum = probs.cumsum(dim=-1)  # (B, C)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=cum.dtype, device=cum.device) * cum[:, -1:]
    pick = torch.searchsorted(cum, u, right=True)[:, 0]  # never a 0-probability entry: its cum equals the one before
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).to(torch.uint8).argmax(dim=-1)  # u rounded up to the total
    return torch.minimum(pick, last)


def sample_probs_ref(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """sample_probs' twin, over the whole vocabulary (B, V): transformers' filters on a full sort."""
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1:
        logits = _top_p_filter(logits, params.top_p)
    return F.softmax(logits, dim=-1)


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (always at least the best one)."""
    sorted_logits, order = torch.sort(logits, dim=-1)  # ascending, (B, V)
    cum = F.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop = cum <= 1 - top_p
    drop[:, -1] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


# ---------------------------------------------------------------------------------------
# Prefill
# ---------------------------------------------------------------------------------------
@torch.no_grad()  # not inference_mode: the cache's tensors must stay usable by a later plain forward
def prefill(model, input_ids: torch.Tensor, cache: HybridCache, attention_mask: torch.Tensor | None = None,
            chunk_size: int | None = None, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Feed input_ids (B, L) into the cache in chunks of chunk_size (None = one call).

    Returns the logits after the last position, (B, V) fp32. progress(n) is called after each
    chunk with the number of tokens it held (for a progress bar)."""
    _check_chunk_size(chunk_size)
    length = input_ids.shape[1]
    step = length if chunk_size is None else chunk_size
    logits = None
    for s in range(0, length, step):
        mask = None if attention_mask is None else attention_mask[:, s:s + step]
        logits = model(input_ids[:, s:s + step], cache=cache, attention_mask=mask, logits_to_keep=1).logits
        if progress is not None:
            progress(min(step, length - s))
    return logits[:, -1]  # (B, V)


# ---------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------
@dataclass
class _Stopper:
    """Per-row stopping on EOS ids and stop strings; finished rows then receive pad_token_id."""

    eos: torch.Tensor  # (n_eos,) long
    stop_strings: list[str]
    tokenizer: object | None
    finished: torch.Tensor  # (B,) bool
    generated: list[list[int]]  # new tokens per row (kept only when stop strings need them)

    def update(self, tokens: torch.Tensor) -> None:
        """tokens (B,): the step's tokens (already padded for rows finished before this step)."""
        newly = torch.isin(tokens, self.eos) & ~self.finished
        if self.stop_strings:
            for row, tok in enumerate(tokens.tolist()):
                if self.finished[row]:
                    continue
                self.generated[row].append(tok)
                if self._hits_stop_string(self.generated[row]):
                    newly[row] = True
        self.finished |= newly

    def _hits_stop_string(self, toks: list[int]) -> bool:
        # A token decodes to at least one byte, so the text of the last len(s) + 4 tokens holds
        # any stop string s that the newest token completes (the slack covers split UTF-8).
        window = max(len(s.encode()) for s in self.stop_strings) + 4
        tail = self.tokenizer.decode(toks[-window:])
        return any(s in tail for s in self.stop_strings)


def stream_generate(model, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False,
                    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                    seed: int | None = None, eos_token_id: int | Sequence[int] | None = None,
                    attention_mask: torch.Tensor | None = None, chunk_size: int | None = None,
                    stop_strings: str | Sequence[str] | None = None, tokenizer=None,
                    cache: HybridCache | None = None,
                    progress: Callable[[int], None] | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,) long, one step at a time.

    input_ids (B, L), left-padded where attention_mask (B, L) has zeros. eos_token_id None means
    no EOS stop (pass the tokenizer's). A row that hit EOS or a stop string receives
    pad_token_id from then on; the stream ends when every row has finished or after
    max_new_tokens steps. cache: continue from a state that already holds a prefix (e.g. a
    copy of a prefilled shared prefix); input_ids then holds only the continuation.
    """
    input_ids, attention_mask = _check_prompt(model, input_ids, attention_mask)
    params = SamplingParams(do_sample, temperature, top_k, top_p)
    params.validate()
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
    _check_chunk_size(chunk_size)
    stopper = _make_stopper(model, input_ids.shape[0], eos_token_id, stop_strings, tokenizer)
    pad = _pad_id(model, stopper.eos)
    gen = None if seed is None else torch.Generator(device=input_ids.device).manual_seed(seed)
    if cache is None:
        cache = model.allocate_cache(input_ids.shape[0], max_length=input_ids.shape[1] + max_new_tokens)
    elif attention_mask is not None and cache.length > 0:
        # Padding after real positions would still decay the SSM state (dt > 0 on zeros): not exact.
        raise InputError("padding is only allowed at the start of a sequence; this cache already holds "
                         f"{cache.length} positions (continue each row with its own cache.select([row]))")
    return _stream(model, input_ids, attention_mask, cache, chunk_size, progress, params, gen, stopper, pad,
                   max_new_tokens)


def _stream(model, input_ids, attention_mask, cache, chunk_size, progress, params, gen, stopper, pad,
            max_new_tokens) -> Iterator[torch.Tensor]:
    # A separate generator function, so that stream_generate checks its arguments when called,
    # not at the first next(). no_grad wraps each forward, never a yield: grad mode is
    # thread-local and would leak into the caller's code between steps.
    logits = prefill(model, input_ids, cache, attention_mask, chunk_size, progress)  # (B, V)
    stops = bool(stopper.eos.numel() or stopper.stop_strings)  # else no row can finish early: skip the checks
    for step in range(max_new_tokens):
        tokens = sample_next(logits, params, gen)
        if stops:
            tokens = torch.where(stopper.finished, torch.full_like(tokens, pad), tokens)  # (B,)
            stopper.update(tokens)
        yield tokens
        if step == max_new_tokens - 1 or (stops and bool(stopper.finished.all())):
            return
        with torch.no_grad():
            logits = model(tokens[:, None], cache=cache).logits[:, -1]  # (B, V)


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, eos_token_id: int | Sequence[int] | None = None,
             attention_mask: torch.Tensor | None = None, chunk_size: int | None = None,
             stop_strings: str | Sequence[str] | None = None, tokenizer=None,
             cache: HybridCache | None = None) -> torch.Tensor:
    """The prompt followed by the new tokens: (B, L + n) with n <= max_new_tokens (fewer when every
    row stopped early), like transformers' generate. A 1-D prompt (L,) gives a 1-D result."""
    one_d = torch.is_tensor(input_ids) and input_ids.dim() == 1
    ids = input_ids[None] if one_d else input_ids
    mask = attention_mask[None] if one_d and attention_mask is not None and attention_mask.dim() == 1 else attention_mask
    steps = list(stream_generate(model, ids, max_new_tokens, do_sample, temperature, top_k, top_p, seed,
                                 eos_token_id, mask, chunk_size, stop_strings, tokenizer, cache))
    out = torch.cat([ids, torch.stack(steps, dim=1).to(ids.dtype)], dim=1)  # (B, L + n)
    return out[0] if one_d else out


# ---------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------
def _check_prompt(model, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not torch.is_tensor(input_ids):
        raise InputError(f"input_ids must be a tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
        attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise InputError(f"the prompt is empty or not (batch, length): shape {tuple(input_ids.shape)}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise InputError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    vocab = model.config.vocab_size
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab:
        raise InputError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {vocab})")
    if attention_mask is not None:
        attention_mask = _check_left_padding(attention_mask, input_ids)
    return input_ids.long(), attention_mask


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise InputError(f"chunk_size must be a positive integer, got {chunk_size}")


def _check_left_padding(mask: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor | None:
    if mask.shape != input_ids.shape:
        raise InputError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    mask = mask.bool()
    if not bool(mask[:, -1].all()) or not bool((mask[:, 1:] >= mask[:, :-1]).all()):
        # Right padding would put pad tokens between the prompt and the new tokens.
        raise InputError("attention_mask must be left padding (each row: zeros, then ones, ending in a real token)")
    return None if bool(mask.all()) else mask


def _make_stopper(model, bsz: int, eos_token_id, stop_strings, tokenizer) -> _Stopper:
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    for e in eos:
        if not 0 <= e < model.config.vocab_size:
            raise InputError(f"eos_token_id {e} is outside the vocabulary [0, {model.config.vocab_size})")
    stops = [] if stop_strings is None else [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
    if any(not isinstance(s, str) or not s for s in stops):
        raise InputError(f"stop_strings must be non-empty strings, got {stops!r}")
    if stops and tokenizer is None:
        raise InputError("stop_strings need a tokenizer to decode the generated tokens")
    device = next(model.parameters()).device
    return _Stopper(torch.tensor(eos, dtype=torch.long, device=device), stops, tokenizer,
                    torch.zeros(bsz, dtype=torch.bool, device=device), [[] for _ in range(bsz)])


def _pad_id(model, eos: torch.Tensor) -> int:
    """What finished rows receive: the config's pad_token_id, else the first EOS id (transformers' fallback)."""
    if model.config.pad_token_id is not None:
        return model.config.pad_token_id
    return int(eos[0]) if eos.numel() else 0
