"""The serving engine: continuous batching over a slot cache, chunked prefill, a prefix-state cache.

Legend: B running rows in a decode step, V vocab, C chunk_size (prefill tokens per step).

    with Engine(model, EngineConfig(max_batch=8)).start() as engine:
        handle = engine.submit(prompt_ids, SamplingParams(max_tokens=64))
        for event in handle: ...            # TokenEvent per token, the last one with finish_reason

One background thread owns the model. Each step it (1) drops cancelled requests, (2) admits
waiting requests into free slots (resuming each from the deepest prefix-state checkpoint that
its prompt starts with), (3) decodes one token for every running sequence in ONE batched forward
(each row attending over its own length), and (4) prefills one chunk's worth of prompt: at most
C tokens, and at most the FLOPs of a first chunk of C tokens (a chunk deep into a long prompt
attends over its cached prefix, so it gets fewer tokens), so a long prompt never stalls the
running streams for more than about one first chunk plus one decode step.

Exactness: a slot's prefill is the very batch-1 call `generate` makes; decode rows share the
GEMMs but each row's attention runs the batch-1 kernel over its own keys, so a request's greedy
tokens equal `model.generate`'s alone (tests/test_serve_engine.py).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from jambalab.errors import ConfigError, InputError, JambalabError
from jambalab.generate import SamplingParams as _Sampler
from jambalab.generate import sample_next
from jambalab.ops import cpu
from jambalab.serve.cost import PrefillCost
from jambalab.serve.prefix_cache import PrefixCache
from jambalab.serve.slots import SlotCache

MAX_LOGPROBS = 20


class EngineFullError(JambalabError):
    """The waiting queue is full (or the engine is stopping): retry later (HTTP 503)."""


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # per-request generator: same seed -> same tokens whatever the batch
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int = 0  # top-N logprobs of each sampled token (0..20)

    def validate(self, vocab_size: int | None = None) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InputError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0 or math.isinf(self.temperature):
            raise InputError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise InputError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InputError(f"seed must be an integer or None, got {self.seed!r}")
        if isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InputError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or (vocab_size is not None and not 0 <= t < vocab_size):
                raise InputError(f"stop_token_ids holds {t!r}, not a token id in [0, {vocab_size})")


@dataclass
class EngineConfig:
    max_batch: int = 8  # slots
    kv_budget_tokens: int | None = None  # total KV tokens over all slots (None: max_batch * max_seq_len)
    max_seq_len: int = 4096  # per request: prompt + max_tokens must fit
    chunk_size: int = 256  # prefill per step: at most this many tokens and the FLOPs of this many at position 0
    prefix_cache_bytes: int = 256 * 2**20  # 0 disables the prefix-state cache
    prefix_checkpoint_every: int = 512
    eviction: str = "marconi"  # or "lru"
    max_waiting: int = 256  # submit() beyond this raises EngineFullError
    attention_cost: float = 1.4  # an attention FLOP's time in GEMM FLOPs (serve/cost.py: measured on the 2-core CPU)

    def validate(self) -> None:
        for name in ("max_batch", "max_seq_len", "chunk_size", "prefix_checkpoint_every", "max_waiting"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
        if self.kv_budget_tokens is not None and (not isinstance(self.kv_budget_tokens, int) or self.kv_budget_tokens <= 0):
            raise ConfigError(f"EngineConfig.kv_budget_tokens must be a positive integer or None, got {self.kv_budget_tokens!r}")
        if not isinstance(self.prefix_cache_bytes, int) or self.prefix_cache_bytes < 0:
            raise ConfigError(f"EngineConfig.prefix_cache_bytes must be an integer >= 0, got {self.prefix_cache_bytes!r}")
        if isinstance(self.attention_cost, bool) or not isinstance(self.attention_cost, (int, float)) \
                or not 0 < self.attention_cost < 100:
            raise ConfigError(f"EngineConfig.attention_cost must be a number in (0, 100), got {self.attention_cost!r}")
        if self.eviction not in ("marconi", "lru"):
            raise ConfigError(f"EngineConfig.eviction must be 'marconi' or 'lru', got {self.eviction!r}")

    @property
    def kv_budget(self) -> int:
        return self.max_batch * self.max_seq_len if self.kv_budget_tokens is None else self.kv_budget_tokens


@dataclass
class TokenEvent:
    token_id: int | None  # None only on a final event that carries no token (cancel / error)
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None  # None while running; "stop" | "length" | "cancelled" | "error"
    error: str | None = None


class RequestHandle:
    """The caller's side of one request: iterate its events, cancel it, or wait for its tokens."""

    def __init__(self, request_id: str, prompt_len: int, engine: Engine,
                 on_event: Callable[[TokenEvent], None] | None):
        self.id = request_id
        self.prompt_len = prompt_len
        self.cached_tokens = 0  # prompt tokens that came from the prefix-state cache (set when admitted)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self._engine, self._on_event = engine, on_event
        self._events: queue.Queue[TokenEvent] = queue.Queue()
        self._done = threading.Event()

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            event = self._events.get()
            yield event
            if event.finish_reason is not None:
                return

    def cancel(self) -> None:
        self._engine._cancel(self.id)

    def result(self, timeout: float | None = None) -> list[int]:
        """All generated token ids; raises TimeoutError, or InputError when the request failed."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self.finish_reason == "error":
            raise InputError(f"request {self.id} failed: {self.error}")
        return list(self.tokens)

    def _emit(self, event: TokenEvent) -> None:
        """Engine thread only."""
        if event.token_id is not None:
            self.tokens.append(event.token_id)
        if event.finish_reason is not None:
            self.finish_reason, self.error = event.finish_reason, event.error
        self._events.put(event)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a failing callback must not take the engine down
                pass
        if event.finish_reason is not None:
            self._done.set()


@dataclass
class _Request:
    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    reserved: int  # KV tokens held while running: prompt + max_tokens
    seq: int  # arrival order
    slot: int = -1
    fed: int = 0  # tokens of prompt + output already in the slot's state
    output: list[int] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)  # prompt positions to snapshot during prefill
    cancelled: bool = False

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)


class Engine:
    def __init__(self, model, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self.config.validate()
        self.model = model.eval()
        self.vocab_size = model.config.vocab_size
        self.slots = SlotCache(model, self.config.max_batch)
        self.prefix = (PrefixCache(model, self.config.prefix_cache_bytes, self.config.eviction,
                                   attention_cost=self.config.attention_cost)
                       if self.config.prefix_cache_bytes > 0 else None)
        self.cost = PrefillCost(model, self.config.attention_cost)
        self.step_flops = self.cost(0, self.config.chunk_size)  # one step's prefill budget: a first chunk
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[_Request] = deque()
        self._running: dict[int, _Request] = {}  # slot -> request
        self._by_id: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = self._draining = False
        self._counters = dict(requests_finished=0, prompt_tokens=0, generated_tokens=0, prefill_tokens_computed=0,
                              steps=0)

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="jambalab-engine", daemon=True)
            self._thread.start()
        return self

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(drain=False, timeout=30)

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """drain=True: stop admitting, finish running and waiting requests; False: cancel them all."""
        with self._lock:
            self._draining = True
            if not drain:
                for req in [*self._waiting, *self._running.values()]:
                    req.cancelled = True
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._thread = None
        else:
            while self.step():  # never started: finish (or cancel) here
                pass

    # ---- requests --------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams,
               on_event: Callable[[TokenEvent], None] | None = None) -> RequestHandle:
        prompt = self._check_prompt(prompt_ids)
        if not isinstance(params, SamplingParams):
            raise InputError(f"params must be jambalab.serve.engine.SamplingParams, got {type(params).__name__}")
        params.validate(self.vocab_size)
        need = len(prompt) + params.max_tokens
        if need > self.config.max_seq_len:
            raise InputError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {need} exceeds "
                             f"max_seq_len {self.config.max_seq_len}")
        if need > self.config.kv_budget:
            raise InputError(f"prompt + max_tokens = {need} tokens exceeds kv_budget_tokens {self.config.kv_budget}")
        with self._lock:
            if self._draining:
                raise EngineFullError("the engine is stopping and admits no new requests")
            if len(self._waiting) >= self.config.max_waiting:
                raise EngineFullError(f"the waiting queue is full ({self.config.max_waiting} requests)")
            seq = next(self._ids)
            handle = RequestHandle(f"req-{seq}", len(prompt), self, on_event)
            gen = None
            if params.temperature > 0:
                seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
                gen = torch.Generator(device=self.slots.device).manual_seed(seed)
            req = _Request(handle, prompt, params, gen, need, seq)
            self._waiting.append(req)
            self._by_id[handle.id] = req
            self._wake.notify_all()
        return handle

    def _check_prompt(self, prompt_ids) -> list[int]:
        if torch.is_tensor(prompt_ids):
            prompt_ids = prompt_ids.reshape(-1).tolist()
        try:
            prompt = list(prompt_ids)
        except TypeError:
            raise InputError(f"prompt_ids must be a list of token ids, got {type(prompt_ids).__name__}") from None
        if not prompt:
            raise InputError("prompt_ids is empty: a request needs at least one prompt token")
        for t in prompt:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise InputError(f"prompt_ids holds {t!r}, not a token id in [0, {self.vocab_size})")
        return prompt

    def _cancel(self, request_id: str) -> None:
        with self._lock:
            req = self._by_id.get(request_id)
            if req is not None:
                req.cancelled = True
                self._wake.notify_all()

    def stats(self) -> dict[str, int | float]:
        with self._lock:
            out: dict[str, int | float] = dict(self._counters)
            out.update(running=len(self._running), waiting=len(self._waiting),
                       free_slots=self.config.max_batch - len(self._running),
                       kv_tokens_used=sum(self.slots.lengths),
                       kv_tokens_reserved=sum(r.reserved for r in self._running.values()))
        prefix = self.prefix.stats() if self.prefix is not None else dict(
            prefix_lookups=0, prefix_hits=0, prefix_tokens_reused=0, prefix_bytes=0, prefix_evictions=0,
            prefix_checkpoints=0)
        out.update(prefix)
        return out

    # ---- the step loop -----------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)  # this thread's grad mode only
        while True:
            with self._lock:
                while not (self._waiting or self._running or self._stopping):
                    self._wake.wait()
                if self._stopping and not (self._waiting or self._running):
                    return
            try:
                self.step()
            except Exception as e:  # a bug, not bad input: fail what is in flight rather than hang its clients
                self._fail_all(f"engine step failed: {type(e).__name__}: {e}")

    def _fail_all(self, message: str) -> None:
        with self._lock:
            reqs = [*self._waiting, *self._running.values()]
            self._waiting.clear()
        for req in reqs:
            self._finish(req, TokenEvent(None, None, None, "error", message))

    def idle(self) -> bool:
        with self._lock:
            return not (self._waiting or self._running)

    @torch.no_grad()
    def step(self) -> bool:
        """One engine step; returns whether any request is still waiting or running. The background
        thread calls it; call it yourself only on an engine that was never start()ed (tests)."""
        self._drop_cancelled()
        self._admit()
        self._decode()
        self._prefill()
        with self._lock:
            self._counters["steps"] += 1
            return bool(self._waiting or self._running)

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [r for r in self._waiting if r.cancelled]
            for r in gone:
                self._waiting.remove(r)
            gone += [r for r in self._running.values() if r.cancelled]
        for req in gone:
            self._finish(req, TokenEvent(None, None, None, "cancelled"))

    def _admit(self) -> None:
        """Waiting requests, oldest first, into free slots while the KV budget holds them (FIFO:
        a big request at the head waits for room rather than being overtaken forever)."""
        while True:
            with self._lock:
                if not self._waiting or len(self._running) >= self.config.max_batch:
                    return
                reserved = sum(r.reserved for r in self._running.values())
                req = self._waiting[0]
                if reserved + req.reserved > self.config.kv_budget:
                    return
                self._waiting.popleft()
                req.slot = next(s for s in range(self.config.max_batch) if s not in self._running)
                self._running[req.slot] = req
            self.slots.open(req.slot, req.reserved)
            self._counters["prompt_tokens"] += len(req.prompt)
            if self.prefix is not None:
                self._resume_from_prefix(req)

    def _resume_from_prefix(self, req: _Request) -> None:
        # At least one prompt token is left to prefill: its logits give the first new token.
        hit, state, marks = self.prefix.lookup(req.prompt, self.config.prefix_checkpoint_every)
        if state is not None:
            self.slots.restore(req.slot, state)
            req.fed = hit
            req.handle.cached_tokens = hit
        req.checkpoints = marks

    def _decode(self) -> None:
        rows = sorted(s for s, r in self._running.items() if not r.prefilling and not r.cancelled)
        if not rows:
            return
        reqs = [self._running[s] for s in rows]
        ids = torch.tensor([[r.output[-1]] for r in reqs], device=self.slots.device)  # (B, 1)
        batch = self.slots.batch(rows)
        try:
            logits = self.model(ids, cache=batch).logits[:, -1]  # (B, V)
        except Exception as e:  # e.g. out of memory: these rows' states are unknown now; fail them, keep serving
            for req in reqs:
                self._finish(req, TokenEvent(None, None, None, "error", f"{type(e).__name__}: {e}"))
            return
        self.slots.scatter_back(batch, rows)
        for b, req in enumerate(reqs):
            self.slots.lengths[req.slot] += 1
            req.fed += 1
            self._emit_next(req, logits[b])

    def _prefill(self) -> None:
        """One chunk's worth of prefill this step, oldest request first, each chunk a batch-1 call.

        The step's budget is the FLOPs of a first chunk (chunk_size tokens, no cached prefix). A
        request's chunks are cut by chunk_end(): at most chunk_size tokens and at most that budget
        (deep into a long prompt, attention over the cached prefix makes a token dearer, so chunks
        shrink), and at its checkpoint positions. The cut depends on the position only, never on
        the batch; a chunk that does not fit the step's remaining budget waits for the next step."""
        budget = self.step_flops
        for slot in sorted(self._running, key=lambda s: self._running[s].seq):
            req = self._running[slot]
            while req.prefilling and not req.cancelled:
                end = self.chunk_end(req.fed, len(req.prompt))
                marks = [m for m in req.checkpoints if req.fed < m < end]
                end = marks[0] if marks else end
                cost = self.cost(req.fed, end)
                if cost > budget and budget < self.step_flops:  # a step always runs its first chunk
                    return
                ids = torch.tensor([req.prompt[req.fed:end]], device=self.slots.device)  # (1, c)
                try:
                    logits = self.model(ids, cache=self.slots.row_cache(slot), logits_to_keep=1).logits[0, -1]  # (V,)
                except Exception as e:  # this request alone fails; its slot is freed
                    self._finish(req, TokenEvent(None, None, None, "error", f"{type(e).__name__}: {e}"))
                    break
                self.slots.lengths[slot] += end - req.fed
                budget -= cost
                self._counters["prefill_tokens_computed"] += end - req.fed
                req.fed = end
                if end in req.checkpoints or end == len(req.prompt):
                    self._checkpoint(req.prompt[:end], slot)
                if not req.prefilling:
                    self._emit_next(req, logits)
            if budget <= 0:
                return

    def chunk_end(self, start: int, prompt_len: int) -> int:
        """Where the prefill chunk starting at `start` ends (before checkpoint cuts): chunk_size
        tokens while a token is cheap, fewer once attention over the cached prefix makes one dear."""
        return min(prompt_len, self.cost.chunk_end(start, self.config.chunk_size, self.step_flops))

    def _checkpoint(self, tokens: list[int], slot: int) -> None:
        """Save the slot's state under `tokens` in the prefix cache (copied only if it can be kept)."""
        if self.prefix is not None and self.prefix.admits(tokens, self.slots.snapshot_nbytes(slot)):
            self.prefix.insert(tokens, self.slots.snapshot(slot))

    # ---- tokens out ------------------------------------------------------------------------
    def _emit_next(self, req: _Request, logits: torch.Tensor) -> None:
        """Sample the request's next token from its logits (V,) and stream it; finish if it ends."""
        p = req.params
        sampler = _Sampler(do_sample=p.temperature > 0, temperature=p.temperature or 1.0,
                           top_k=p.top_k or None, top_p=p.top_p if p.top_p < 1 else None)
        top = None
        # On this thread alone: ops over the vocabulary would wake torch's OpenMP workers, which then spin
        # beside the next decode step's threads (jambalab.ops.cpu.one_aten_thread).
        with cpu.one_aten_thread() if logits.is_cpu else contextlib.nullcontext():
            token = int(sample_next(logits[None], sampler, req.generator)[0])
            logp = F.log_softmax(logits.float(), dim=-1)  # the model's distribution, before any filtering
            if p.logprobs:
                values, ids = torch.topk(logp, p.logprobs)
                top = list(zip(ids.tolist(), values.tolist()))
        req.output.append(token)
        self._counters["generated_tokens"] += 1
        reason = "stop" if token in p.stop_token_ids else "length" if len(req.output) >= p.max_tokens else None
        event = TokenEvent(token, float(logp[token]), top, reason)
        if reason is None:
            req.handle._emit(event)
        else:
            self._finish(req, event)

    def _finish(self, req: _Request, event: TokenEvent) -> None:
        if req.slot >= 0 and event.finish_reason in ("stop", "length"):
            # The state holds prompt + output less the last token (never fed): the next chat turn
            # repeats all of it, so it resumes here.
            self._checkpoint((req.prompt + req.output)[:req.fed], req.slot)
        with self._lock:
            if req.slot >= 0:
                self._running.pop(req.slot, None)
                self.slots.close(req.slot)
            self._by_id.pop(req.handle.id, None)
            if event.finish_reason in ("stop", "length"):
                self._counters["requests_finished"] += 1
        req.handle._emit(event)
