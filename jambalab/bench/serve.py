"""`jambalab bench serve`: the serving engine under load (jambalab/serve/engine.py).

Three workloads, each through a started Engine (its background thread) with random-weight models:

  concurrency  c = 1, 2, 4, 8, 16 requests at once (prompt P, G new tokens each), for a hybrid
               (bench-hybrid) and a pure Transformer of the same active parameters (built here:
               the hybrid's width, depth, heads and vocab, every layer attention + a dense FFN
               whose width matches the active count): total generated tokens/s, decode tokens/s
               once every request streams, median time to first token. Jamba's Fig. 3a, served.
  chat         a shared system prompt, 8 conversations x 6 turns, every turn re-sending the whole
               history (round by round: turn t of all 8 conversations at once): time to first
               token and prefill tokens computed per turn, the token hit rate; prefix cache off,
               on, and, under a budget a third of what "on" held, LRU vs the Marconi-style score.
  docs         LRU vs the Marconi-style eviction where they differ: long shared documents (system
               prompts, RAG contexts) of different lengths, asked about at different rates, between
               many short one-off requests that flood an LRU cache; one request at a time, under a
               budget that holds the documents and a few one-offs: token hit rate, prefill tokens.
  stall        a long prompt (100,000 tokens) arriving while 4 streams decode: the longest gap between
               two tokens of those streams during its whole prefill, against one first prefill chunk
               (a lone chunk-token request's time to first token) + one decode step.

Speed figures depend on the machine and its load: run it on an idle machine for numbers to keep.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from jambalab.errors import InputError

WORKLOADS = ("concurrency", "chat", "docs", "stall")


@dataclass
class Plan:
    hybrid: str = "bench-hybrid"
    concurrency: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    prompt: int = 512  # concurrency: prompt tokens per request
    gen: int = 64  # concurrency: new tokens per request
    system: int = 2048  # chat: shared system prompt tokens
    conversations: int = 8
    turns: int = 6
    user: int = 48  # chat: tokens per user message
    reply: int = 32  # chat: tokens per assistant reply
    stall_prompt: int = 100_000  # stall: the long prompt
    stall_streams: int = 4
    chunk: int = 256  # the engine's prefill chunk
    checkpoint_every: int = 512
    small_budget_frac: float = 1 / 3  # chat: the eviction budget, as a fraction of what "on" held
    docs: list[int] = field(default_factory=lambda: [3072, 1536, 768])  # docs: document lengths
    doc_rounds: int = 12  # docs: in round i, document j is asked about when i % (j + 1) == 0
    oneoffs: int = 6  # docs: one-off requests per round
    oneoff_len: int = 192  # docs: tokens of a one-off prompt
    docs_budget_oneoffs: int = 4  # docs: the budget holds the documents' checkpoints and this many one-offs'
    threads: int | None = None

    def check(self) -> Plan:
        for name in ("prompt", "gen", "system", "conversations", "turns", "user", "reply", "stall_prompt",
                     "stall_streams", "chunk", "checkpoint_every", "doc_rounds", "oneoffs", "oneoff_len"):
            if getattr(self, name) <= 0:
                raise InputError(f"bench serve: {name} must be positive, got {getattr(self, name)}")
        if not self.docs or any(d <= 0 for d in self.docs):
            raise InputError(f"bench serve: docs must be positive lengths, got {self.docs}")
        if not self.concurrency or any(c <= 0 for c in self.concurrency):
            raise InputError(f"bench serve: concurrency must be positive integers, got {self.concurrency}")
        return self


QUICK = Plan(hybrid="tiny-hybrid", concurrency=[1, 2, 4], prompt=24, gen=6, system=64, conversations=3, turns=3,
             user=8, reply=5, stall_prompt=200, stall_streams=2, chunk=32, checkpoint_every=32, docs=[160, 96, 64],
             doc_rounds=6, oneoffs=4, oneoff_len=24)


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------
def matched_transformer_config(hybrid: str):
    """A pure Transformer (every layer attention, dense SwiGLU FFN, RoPE) with the hybrid's width,
    depth, heads and vocab, its FFN width chosen so the active parameter counts match."""
    from jambalab.config import JambaConfig
    from jambalab.model import JambaLM

    base = JambaConfig.from_preset(hybrid)
    target = JambaLM.on_meta(base).num_active_parameters()

    def dense(d_ff: int) -> JambaConfig:
        return base.replace(attn_layer_period=1, attn_layer_offset=0, expert_layer_period=0, expert_layer_offset=0,
                            n_experts=1, top_k=1, rope=True, d_ff=d_ff)

    lo, hi = 8, 64 * base.d_model
    while hi - lo > 8:  # the active count grows with d_ff: bisect on multiples of 8
        mid = (lo + hi) // 16 * 8
        lo, hi = (mid, hi) if JambaLM.on_meta(dense(mid)).num_active_parameters() < target else (lo, mid)
    return min((dense(lo), dense(hi)), key=lambda c: abs(JambaLM.on_meta(c).num_active_parameters() - target))


def load_models(plan: Plan) -> dict:
    from jambalab.model import JambaLM
    from jambalab.config import JambaConfig

    hybrid = JambaLM.from_config(JambaConfig.from_preset(plan.hybrid), seed=0).eval()
    transformer = JambaLM.from_config(matched_transformer_config(plan.hybrid), seed=0).eval()
    return {"hybrid": hybrid, "transformer": transformer}


# ---------------------------------------------------------------------------------------
# Measuring one batch of requests
# ---------------------------------------------------------------------------------------
class _Timed:
    """Submit requests and record every event's time (the on_event callback runs in the engine thread)."""

    def __init__(self, engine):
        self.engine = engine
        self.submitted: list[float] = []
        self.times: list[list[float]] = []
        self.handles = []

    def submit(self, prompt: list[int], max_tokens: int):
        from jambalab.serve.engine import SamplingParams

        i = len(self.handles)
        self.times.append([])
        self.submitted.append(time.perf_counter())
        h = self.engine.submit(prompt, SamplingParams(max_tokens=max_tokens),
                               on_event=lambda e, i=i: self.times[i].append(time.perf_counter()))
        self.handles.append(h)
        return h

    def wait(self, timeout: float = 3600) -> None:
        for h in self.handles:
            h.result(timeout)

    def ttft(self, i: int) -> float:
        return self.times[i][0] - self.submitted[i]


def _engine(model, plan: Plan, **cfg):
    from jambalab.serve.engine import Engine, EngineConfig

    cfg.setdefault("chunk_size", plan.chunk)
    cfg.setdefault("prefix_checkpoint_every", plan.checkpoint_every)
    cfg.setdefault("max_seq_len", 1 << 20)
    return Engine(model, EngineConfig(**cfg)).start()


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


# ---------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------
def run_concurrency(models: dict, plan: Plan, bar) -> list[dict]:
    rows = []
    for arch, model in models.items():
        rng = random.Random(0)
        _warm(model, plan)
        for c in plan.concurrency:
            engine = _engine(model, plan, max_batch=c, prefix_cache_bytes=0)
            try:
                t = _Timed(engine)
                start = time.perf_counter()
                for _ in range(c):
                    t.submit(_tokens(rng, plan.prompt, model.config.vocab_size), plan.gen)
                t.wait()
                end = max(ts[-1] for ts in t.times)
            finally:
                engine.stop(drain=False, timeout=60)
            streaming = max(ts[0] for ts in t.times)  # every request has its first token
            decode_tokens = sum(len(ts) - 1 for ts in t.times)
            rows.append(dict(arch=arch, preset=model.config.name or arch, concurrency=c,
                             active_params=model.num_active_parameters(),
                             tok_s=c * plan.gen / (end - start),
                             decode_tok_s=decode_tokens / (end - streaming) if end > streaming else float("nan"),
                             ttft_median_s=statistics.median(t.ttft(i) for i in range(c))))
            bar.update(c)
    return rows


def _warm(model, plan: Plan) -> None:
    """Build the kernels and warm the allocator before anything is timed."""
    engine = _engine(model, plan, max_batch=2, prefix_cache_bytes=0)
    try:
        t = _Timed(engine)
        t.submit([3] * min(plan.chunk + 1, 64), 3)
        t.submit([4] * 5, 3)
        t.wait()
    finally:
        engine.stop(drain=False, timeout=60)


def run_chat(model, plan: Plan, bar) -> dict:
    """Every mode replays the same conversations (the replies are greedy, so identical across modes)."""
    _warm(model, plan)
    modes = {"off": dict(prefix_cache_bytes=0), "on": dict(prefix_cache_bytes=1 << 40, eviction="marconi")}
    out = {}
    for mode, cfg in modes.items():
        out[mode] = _chat_once(model, plan, cfg, bar)
    small = max(1, int(out["on"]["peak_prefix_bytes"] * plan.small_budget_frac))
    for eviction in ("lru", "marconi"):
        out[f"{eviction}-small"] = _chat_once(model, plan, dict(prefix_cache_bytes=small, eviction=eviction), bar)
    out["small_budget_bytes"] = small
    return out


def _chat_once(model, plan: Plan, cfg: dict, bar) -> dict:
    rng = random.Random(1)
    vocab = model.config.vocab_size
    system = _tokens(rng, plan.system, vocab)
    users = [[_tokens(rng, plan.user, vocab) for _ in range(plan.turns)] for _ in range(plan.conversations)]
    history = [[] for _ in range(plan.conversations)]
    engine = _engine(model, plan, max_batch=plan.conversations, **cfg)
    turns, peak = [], 0
    try:
        for turn in range(plan.turns):
            before = engine.stats()
            t = _Timed(engine)
            prompts = [system + history[c] + users[c][turn] for c in range(plan.conversations)]
            for p in prompts:
                t.submit(p, plan.reply)
            t.wait()
            after = engine.stats()
            peak = max(peak, after["prefix_bytes"])
            for c, h in enumerate(t.handles):
                history[c] = prompts[c][len(system):] + h.result(0)
            turns.append(dict(turn=turn + 1, ttft_median_s=statistics.median(t.ttft(i) for i in range(len(prompts))),
                              prompt_tokens=sum(map(len, prompts)),
                              prefill_computed=after["prefill_tokens_computed"] - before["prefill_tokens_computed"],
                              tokens_reused=sum(h.cached_tokens for h in t.handles)))
            bar.update(plan.conversations)
        s = engine.stats()
    finally:
        engine.stop(drain=False, timeout=60)
    later = turns[1:]
    return dict(turns=turns, peak_prefix_bytes=peak, evictions=s["prefix_evictions"],
                hit_rate=sum(r["tokens_reused"] for r in turns) / sum(r["prompt_tokens"] for r in turns),
                later_prefill=sum(r["prefill_computed"] for r in later),
                later_ttft_median_s=statistics.median(r["ttft_median_s"] for r in later) if later else float("nan"))


def run_docs(model, plan: Plan, bar) -> dict:
    """Shared documents between one-off requests, LRU vs Marconi under the same budget. One request
    at a time (greedy), so both policies see exactly the same requests in the same order."""
    _warm(model, plan)
    rng = random.Random(3)
    vocab = model.config.vocab_size
    docs = [_tokens(rng, n, vocab) for n in plan.docs]
    requests = []  # (prompt, is_doc)
    for i in range(plan.doc_rounds):
        requests += [(doc + _tokens(rng, plan.user, vocab), True) for j, doc in enumerate(docs) if i % (j + 1) == 0]
        requests += [(_tokens(rng, plan.oneoff_len, vocab), False) for _ in range(plan.oneoffs)]
    budget = (sum(_checkpoint_bytes(model, n + plan.user + plan.reply) for n in plan.docs)
              + plan.docs_budget_oneoffs * _checkpoint_bytes(model, plan.oneoff_len + plan.reply))
    out: dict = dict(budget_bytes=budget, requests=len(requests), doc_requests=sum(d for _, d in requests))
    for eviction in ("lru", "marconi"):
        engine = _engine(model, plan, max_batch=1, prefix_cache_bytes=budget, eviction=eviction)
        reused = doc_reused = 0
        try:
            for prompt, is_doc in requests:
                t = _Timed(engine)
                h = t.submit(prompt, plan.reply)
                t.wait()
                reused += h.cached_tokens
                doc_reused += h.cached_tokens if is_doc else 0
                bar.update(1)
            s = engine.stats()
        finally:
            engine.stop(drain=False, timeout=60)
        prompt_tokens = sum(len(p) for p, _ in requests)
        doc_tokens = sum(len(p) for p, d in requests if d)
        out[eviction] = dict(hit_rate=reused / prompt_tokens, doc_hit_rate=doc_reused / doc_tokens,
                             prefill=s["prefill_tokens_computed"], evictions=s["prefix_evictions"])
    return out


def _docs_requests(plan: Plan) -> int:
    return sum(plan.oneoffs + sum(i % (j + 1) == 0 for j in range(len(plan.docs))) for i in range(plan.doc_rounds))


def _checkpoint_bytes(model, n: int) -> int:
    """A prefix-cache checkpoint's bytes after n tokens: KV of the attention layers, every Mamba state."""
    c, item = model.config, model.embed.weight.element_size()
    n_attn = sum(c.is_attention(i) for i in range(c.n_layers))
    mamba = (c.n_layers - n_attn) * c.d_inner * (c.d_conv * item + c.d_state * 4)  # conv + fp32 SSM state
    return n_attn * 2 * c.n_kv_heads * c.head_dim * item * n + mamba


def run_stall(model, plan: Plan, bar) -> dict:
    """Streams decode; once each has a few tokens, a long prompt arrives. The gaps between stream
    tokens while it prefills are compared with the engine's promise: one first chunk (chunk tokens
    into an empty cache, timed through the engine: later chunks are cut to the same estimated
    FLOPs) plus one decode step."""
    _warm(model, plan)
    rng = random.Random(2)
    vocab = model.config.vocab_size
    first_chunk, lone = _first_chunk_s(model, plan, rng, warm_s=min(3.0, plan.stall_prompt / 30_000))  # --quick: ~0
    engine = _engine(model, plan, max_batch=plan.stall_streams + 1, prefix_cache_bytes=0)
    n_chunks, pos = 0, 0
    while pos < plan.stall_prompt:  # the engine's own cut of the long prompt (no checkpoints: no prefix cache)
        pos, n_chunks = engine.chunk_end(pos, plan.stall_prompt), n_chunks + 1
    try:
        t = _Timed(engine)
        # The streams outlive the long prefill: one token per chunk of it, plus slack.
        stream_tokens = n_chunks + 32
        for _ in range(plan.stall_streams):
            t.submit(_tokens(rng, 16, vocab), stream_tokens)
        while min(len(ts) for ts in t.times[:plan.stall_streams]) < 8:
            time.sleep(0.001)
        arrive = time.perf_counter()
        t.submit(_tokens(rng, plan.stall_prompt, vocab), 1)
        t.wait()
    finally:
        engine.stop(drain=False, timeout=60)
    prefill_done = t.times[-1][0]
    gaps_before, gaps_during, early, late = [], [], [], []
    tenth = (prefill_done - arrive) / 10
    for ts in t.times[:plan.stall_streams]:
        for a, b in zip(ts, ts[1:]):
            (gaps_during if arrive <= b <= prefill_done else gaps_before if b < arrive else []).append(b - a)
            if arrive <= b <= arrive + tenth:
                early.append(b - a)
            elif prefill_done - tenth <= b <= prefill_done:
                late.append(b - a)
    decode_step = statistics.median(gaps_before)
    bar.update(plan.stall_streams + 1)
    return dict(prompt=plan.stall_prompt, chunk=plan.chunk, streams=plan.stall_streams, chunks=n_chunks,
                prefill_s=prefill_done - arrive, decode_step_s=decode_step, chunk_s=first_chunk,
                mean_chunk_s=max((prefill_done - arrive) / n_chunks - decode_step, 0.0),
                max_gap_s=max(gaps_during) if gaps_during else 0.0,
                median_gap_during_s=statistics.median(gaps_during) if gaps_during else 0.0,
                # the cost-aware cut should keep a step as long at the end of the prompt as at its start
                median_gap_first_tenth_s=statistics.median(early) if early else 0.0,
                median_gap_last_tenth_s=statistics.median(late) if late else 0.0,
                p99_gap_s=_quantile(gaps_during, 0.99),
                gaps_over_bound=sum(g > first_chunk + decode_step for g in gaps_during), gaps=len(gaps_during),
                # the machine's own noise: the spread of the lone first chunks whose median the bound takes
                lone_chunk_spread_pct=100 * (max(lone) - min(lone)) / max(lone),
                bound_s=first_chunk + decode_step)


def _quantile(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


def _first_chunk_s(model, plan: Plan, rng: random.Random, warm_s: float = 3.0,
                   samples: int = 9) -> tuple[float, list[float]]:
    """The median time to first token of a lone `chunk`-token request on an idle engine: one step
    whose prefill is exactly a first chunk (the engine's per-step budget is its estimated FLOPs); and
    the samples. Lone requests run back to back for warm_s first, untimed: this 2-core VM ran the same
    chunk ~25% faster in short bursts after idling than under the sustained load of the stall run
    (80 back-to-back chunks: 82-88 ms where the first few of a burst took 64-70), so the bound is
    measured in the state the run is in."""
    engine = _engine(model, plan, max_batch=1, prefix_cache_bytes=0)
    times = []
    try:
        start = time.perf_counter()
        while len(times) < samples:
            t = _Timed(engine)
            t.submit(_tokens(rng, plan.chunk, model.config.vocab_size), 1)
            t.wait()
            if time.perf_counter() - start >= warm_s:
                times.append(t.ttft(0))
    finally:
        engine.stop(drain=False, timeout=60)
    return statistics.median(times), times


# ---------------------------------------------------------------------------------------
# Driver, table, plot
# ---------------------------------------------------------------------------------------
def run(plan: Plan, workloads: tuple[str, ...] = WORKLOADS, progress: bool = True) -> dict:
    from tqdm import tqdm

    from jambalab.bench.machine import machine_info

    plan.check()
    if plan.threads is not None:
        torch.set_num_threads(plan.threads)
    models = load_models(plan)
    total = (2 * sum(plan.concurrency) * ("concurrency" in workloads)
             + 4 * plan.conversations * plan.turns * ("chat" in workloads)
             + (plan.stall_streams + 1) * ("stall" in workloads)
             + 2 * _docs_requests(plan) * ("docs" in workloads))
    results: dict = dict(plan=asdict(plan), workloads=list(workloads), machine=machine_info(),
                         presets={k: _describe(m) for k, m in models.items()})
    with tqdm(total=total, desc="bench serve", unit="req", disable=not progress) as bar:
        if "concurrency" in workloads:
            results["concurrency"] = run_concurrency(models, plan, bar)
        if "chat" in workloads:
            results["chat"] = run_chat(models["hybrid"], plan, bar)
        if "docs" in workloads:
            results["docs"] = run_docs(models["hybrid"], plan, bar)
        if "stall" in workloads:
            results["stall"] = run_stall(models["hybrid"], plan, bar)
    results["targets"] = targets(results)
    return results


def _describe(model) -> dict:
    c = model.config
    return dict(name=c.name, layers="".join("A" if c.is_attention(i) else "M" for i in range(c.n_layers)),
                d_ff=c.d_ff, experts=c.n_experts, active_params=model.num_active_parameters())


def targets(results: dict) -> list[dict]:
    out = []
    conc = {(r["arch"], r["concurrency"]): r for r in results.get("concurrency", [])}
    if ("hybrid", 1) in conc and ("hybrid", 8) in conc:
        ratio = conc["hybrid", 8]["decode_tok_s"] / conc["hybrid", 1]["decode_tok_s"]
        out.append(dict(target="hybrid decode tok/s at 8 requests >= 3x at 1", measured=ratio, met=ratio >= 3))
    chat = results.get("chat")
    if chat and chat["off"]["later_prefill"]:
        frac = chat["on"]["later_prefill"] / chat["off"]["later_prefill"]
        out.append(dict(target="chat turns 2+: prefill tokens with cache <= 10% of without", measured=100 * frac,
                        met=frac <= 0.10))
        speed = chat["off"]["later_ttft_median_s"] / chat["on"]["later_ttft_median_s"]
        out.append(dict(target="chat turns 2+: median TTFT >= 10x lower with cache", measured=speed, met=speed >= 10))
    stall = results.get("stall")
    if stall:
        out.append(dict(target="longest stream stall <= one first chunk + one decode step (s)",
                        measured=stall["max_gap_s"], met=stall["max_gap_s"] <= stall["bound_s"]))
    return out


def table(results: dict) -> str:
    lines = []
    if "concurrency" in results:
        p = results["presets"]
        lines += [f"concurrency (prompt {results['plan']['prompt']}, {results['plan']['gen']} new tokens each; hybrid "
                  f"{p['hybrid']['name']} {p['hybrid']['layers']}, Transformer {p['transformer']['layers']} d_ff "
                  f"{p['transformer']['d_ff']}; active params {p['hybrid']['active_params']:,} vs "
                  f"{p['transformer']['active_params']:,})",
                  f"{'model':<12} {'requests':>8} {'tok/s':>9} {'decode tok/s':>13} {'TTFT median ms':>15}"]
        for r in results["concurrency"]:
            lines.append(f"{r['arch']:<12} {r['concurrency']:>8} {r['tok_s']:>9.1f} {r['decode_tok_s']:>13.1f} "
                         f"{1e3 * r['ttft_median_s']:>15.1f}")
        lines.append("")
    if "chat" in results:
        chat = results["chat"]
        modes = [m for m in chat if isinstance(chat[m], dict)]
        lines += [f"chat ({results['plan']['conversations']} conversations x {results['plan']['turns']} turns, "
                  f"system prompt {results['plan']['system']}; small budget {chat['small_budget_bytes'] / 2**20:.1f} MiB)",
                  f"{'turn':>4} " + " ".join(f"{m + ' TTFT ms':>18} {m + ' prefill':>18}" for m in modes)]
        for i in range(len(chat["off"]["turns"])):
            cells = " ".join(f"{1e3 * chat[m]['turns'][i]['ttft_median_s']:>18.1f} "
                             f"{chat[m]['turns'][i]['prefill_computed']:>18}" for m in modes)
            lines.append(f"{i + 1:>4} {cells}")
        lines.append("token hit rate: " + ", ".join(f"{m} {100 * chat[m]['hit_rate']:.1f}% "
                                                   f"({chat[m]['evictions']} evictions)" for m in modes))
        lines.append("")
    if "docs" in results:
        d, p = results["docs"], results["plan"]
        lines += [f"docs (documents of {', '.join(map(str, p['docs']))} tokens asked about every 1, 2, 3 rounds "
                  f"of {p['doc_rounds']}, {p['oneoffs']} one-offs of {p['oneoff_len']} tokens a round; "
                  f"{d['requests']} requests; budget {d['budget_bytes'] / 2**20:.1f} MiB)",
                  f"{'eviction':<9} {'token hit rate':>15} {'document hit rate':>18} {'prefill tokens':>15} "
                  f"{'evictions':>10}"]
        for m in ("lru", "marconi"):
            lines.append(f"{m:<9} {100 * d[m]['hit_rate']:>14.1f}% {100 * d[m]['doc_hit_rate']:>17.1f}% "
                         f"{d[m]['prefill']:>15,} {d[m]['evictions']:>10}")
        lines.append("")
    if "stall" in results:
        s = results["stall"]
        lines += [f"stall: a {s['prompt']:,}-token prompt arrives during {s['streams']} streams (chunk {s['chunk']} "
                  f"tokens' FLOPs a step: {s['chunks']} chunks)",
                  f"  prefill {s['prefill_s']:.2f} s; decode step {1e3 * s['decode_step_s']:.1f} ms, first chunk "
                  f"{1e3 * s['chunk_s']:.1f} ms (mean chunk during the prefill {1e3 * s['mean_chunk_s']:.1f} ms); "
                  f"stream gaps during the prefill: median {1e3 * s['median_gap_during_s']:.1f} ms, longest "
                  f"{1e3 * s['max_gap_s']:.1f} ms (bound {1e3 * s['bound_s']:.1f} ms); median gap in the first tenth "
                  f"of the prefill {1e3 * s['median_gap_first_tenth_s']:.1f} ms, in the last tenth "
                  f"{1e3 * s['median_gap_last_tenth_s']:.1f} ms; p99 {1e3 * s['p99_gap_s']:.1f} ms, "
                  f"{s['gaps_over_bound']} of {s['gaps']} gaps over the bound; the lone first chunks spread "
                  f"{s['lone_chunk_spread_pct']:.0f}%", ""]
    m = results["machine"]
    lines.append(f"machine: {m.get('cpu')}, {m.get('threads')} threads, 1-min load average {m.get('load_1min')}")
    for t in results["targets"]:
        lines.append(f"target {t['target']}: {t['measured']:.3g} {'MET' if t['met'] else 'MISSED'}")
    return "\n".join(lines)


def plot(results: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [w for w in ("concurrency", "chat") if w in results]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(6 * max(len(panels), 1), 4.2), squeeze=False)
    for ax, w in zip(axes[0], panels):
        if w == "concurrency":
            for arch in ("hybrid", "transformer"):
                rows = [r for r in results["concurrency"] if r["arch"] == arch]
                ax.plot([r["concurrency"] for r in rows], [r["decode_tok_s"] for r in rows], "o-", label=arch)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent requests")
            ax.set_ylabel("decode tokens/s (all requests)")
            ax.set_title("throughput vs concurrency")
        else:
            chat = results["chat"]
            for m in (m for m in chat if isinstance(chat[m], dict)):
                ax.plot([r["turn"] for r in chat[m]["turns"]], [1e3 * r["ttft_median_s"] for r in chat[m]["turns"]],
                        "o-", label=f"{m} ({100 * chat[m]['hit_rate']:.0f}% hit)")
            ax.set_yscale("log")
            ax.set_xlabel("turn")
            ax.set_ylabel("median time to first token (ms)")
            ax.set_title("multi-turn chat, prefix cache")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# =======================================================================================
# Command line: `jambalab bench serve` (registered in jambalab/commands/bench.py)
# =======================================================================================
def add_parser(group) -> None:
    p = group.add_parser("serve", help="serving engine: throughput vs concurrency, multi-turn prefix cache, stalls",
                         description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny presets and sizes: all workloads in seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: throughput vs concurrency, TTFT per chat turn")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated: {','.join(WORKLOADS)}")
    p.add_argument("--hybrid", help="the hybrid preset (default bench-hybrid; tiny-hybrid with --quick)")
    p.add_argument("--concurrency", help="comma-separated request counts (default 1,2,4,8,16)")
    p.add_argument("--stall-prompt", type=int, help="the long prompt's tokens (default 100000)")
    p.add_argument("--chunk", type=int, help="prefill chunk tokens per step (default 256)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.set_defaults(func=main)


def main(args) -> int:
    import json

    from jambalab.config import JambaConfig

    plan = replace(QUICK) if args.quick else Plan()
    which = tuple(w.strip() for w in args.workloads.split(",") if w.strip())
    bad = [w for w in which if w not in WORKLOADS]
    if bad or not which:
        raise InputError(f"unknown workload(s) {bad or which}; choose from {', '.join(WORKLOADS)}")
    if args.hybrid:
        JambaConfig.from_preset(args.hybrid)  # an unknown preset fails before any run
        plan = replace(plan, hybrid=args.hybrid)
    if args.concurrency:
        try:
            plan = replace(plan, concurrency=[int(x) for x in args.concurrency.split(",") if x.strip()])
        except ValueError:
            raise InputError(f"--concurrency must be comma-separated integers, got {args.concurrency!r}") from None
    for name, value in (("stall_prompt", args.stall_prompt), ("chunk", args.chunk), ("threads", args.threads)):
        if value is not None:
            if value <= 0:
                raise InputError(f"--{name.replace('_', '-')} must be positive, got {value}")
            plan = replace(plan, **{name: value})
    results = run(plan.check(), which, progress=not args.json)
    if args.plot:
        plot(results, args.plot)
        results["plot"] = str(args.plot)
    print(json.dumps(results, indent=1) if args.json else table(results))
    return 0
