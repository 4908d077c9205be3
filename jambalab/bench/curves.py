"""Throughput and memory curves of four architectures with equal active parameters, measured here.

The Jamba paper's Figure 3 (throughput vs batch at a fixed context, and vs context at batch 1)
and Falcon Mamba's "constant speed and memory while generating", reproduced at small scale on
the CPU: curves-hybrid (Jamba 1:7 + MoE), curves-transformer (Llama-like), curves-mamba (Falcon
Mamba-like) and curves-mixtral (MoE Transformer), all ~12.4M active parameters (presets.py).

Every point runs in a fresh process (jambalab.bench.probe), so one run's peak memory cannot leak
into the next: prefill in chunks with logits_to_keep=1, then one token per step through the cache.
  (a) batch:   decode tokens/s vs batch size at a fixed context
  (b) context: decode tokens/s, prefill tokens/s and peak memory vs context, while under --mem-limit
  (c) decode:  per-token time and memory over 1..N generated tokens (batch 1, short prompt)
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from jambalab.bench.probe import run_in_child
from jambalab.errors import InputError

MODELS = ("curves-hybrid", "curves-transformer", "curves-mamba", "curves-mixtral")
LABELS = {"curves-hybrid": "hybrid 1:7 + MoE", "curves-transformer": "Transformer",
          "curves-mamba": "Mamba", "curves-mixtral": "MoE Transformer"}
MiB = 2**20


@dataclass
class CurvesPlan:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    batch_context: int = 512  # (a) prompt length for every batch size
    batch_decode: int = 16  # (a) timed decode steps
    contexts: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096, 8192])
    context_batch: int = 2  # (b) batch size for every context
    context_decode: int = 16  # (b) timed decode steps
    trace_prompt: int = 16  # (c) prompt before the generated tokens
    trace_tokens: int = 4096  # (c) N generated tokens
    chunk: int = 2048  # prefill chunk
    mem_limit: int = 4 * 2**30  # (b) stop a model's context sweep once its model memory exceeds this
    threads: int = 2
    timeout_s: int = 600  # per measured point

    def check(self) -> CurvesPlan:
        for name in ("batch_context", "batch_decode", "context_batch", "context_decode", "trace_prompt",
                     "trace_tokens", "chunk", "mem_limit", "threads", "timeout_s"):
            if getattr(self, name) <= 0:
                raise InputError(f"curves: {name} must be positive, got {getattr(self, name)}")
        for name in ("batch_sizes", "contexts"):
            vals = getattr(self, name)
            if not vals or any(v <= 0 for v in vals):
                raise InputError(f"curves: {name} must be positive integers, got {vals}")
        return self


# --quick: every curve, a few seconds each; for tests and smoke runs.
QUICK = CurvesPlan(batch_sizes=[1, 2], batch_context=32, batch_decode=2, contexts=[32, 64], context_batch=1,
                   context_decode=2, trace_prompt=4, trace_tokens=6, chunk=32, timeout_s=120)


def _spec(plan: CurvesPlan, preset: str, **kw) -> dict:
    return dict(preset=preset, chunk=plan.chunk, threads=plan.threads, **kw)


# ---------------------------------------------------------------------------------------
# The three curves
# ---------------------------------------------------------------------------------------
def batch_curve(plan: CurvesPlan, models, bar) -> list[dict]:
    rows = []
    for m in models:
        for b in plan.batch_sizes:
            bar.set_postfix_str(f"batch {m} b={b}")
            spec = _spec(plan, m, batch=b, context=plan.batch_context, decode=plan.batch_decode)
            r = run_in_child(spec, plan.timeout_s)
            rows.append(_row(m, r, batch=b, context=plan.batch_context, steps=plan.batch_decode))
            bar.update()
    return rows


def context_curve(plan: CurvesPlan, models, bar) -> list[dict]:
    """Each model's sweep stops at the first context whose model memory exceeds mem_limit.

    Model memory = peak resident minus the runtime's share (torch and jambalab imported, no model
    yet): weights, cache, activations, the analogue of what a GPU budget has to hold.
    """
    rows = []
    for m in models:
        over = False
        for n in plan.contexts:
            bar.set_postfix_str(f"context {m} n={n}")
            if over:
                rows.append({"model": m, "context": n, "batch": plan.context_batch, "skipped": "over mem-limit"})
            else:
                r = run_in_child(_spec(plan, m, batch=plan.context_batch, context=n, decode=plan.context_decode),
                          plan.timeout_s)
                row = _row(m, r, batch=plan.context_batch, context=n, steps=plan.context_decode)
                over = "error" in row or row["model_bytes"] > plan.mem_limit
                row["over_limit"] = over
                rows.append(row)
            bar.update()
    return rows


def decode_trace(plan: CurvesPlan, models, bar) -> list[dict]:
    rows = []
    for m in models:
        bar.set_postfix_str(f"decode trace {m}")
        r = run_in_child(_spec(plan, m, batch=1, context=plan.trace_prompt, decode=plan.trace_tokens, trace=True),
                  plan.timeout_s)
        if "error" in r:
            rows.append({"model": m, "error": r["error"]})
        else:
            rows.append({"model": m, "baseline_bytes": r["baseline_bytes"], "step_s": r["step_s"],
                         "step_rss": r["step_rss"], "step_cache_bytes": r["step_cache_bytes"]})
        bar.update()
    return rows


def _row(model: str, r: dict, batch: int, context: int, steps: int) -> dict:
    row = {"model": model, "batch": batch, "context": context}
    if "error" in r:
        return dict(row, error=r["error"])
    return dict(row, decode_tok_s=batch * steps / r["decode_s"], prefill_tok_s=batch * context / r["prefill_s"],
                peak_bytes=r["peak_bytes"], baseline_bytes=r["baseline_bytes"],
                model_bytes=r["peak_bytes"] - r["runtime_bytes"],
                prefill_extra_bytes=r["prefill_peak_bytes"] - r["baseline_bytes"], cache_bytes=r["cache_bytes"])


# ---------------------------------------------------------------------------------------
# Driver, tables, plots
# ---------------------------------------------------------------------------------------
CURVES = ("batch", "context", "decode")


def run_curves(plan: CurvesPlan, out_dir: Path, curves=CURVES, models=MODELS) -> dict:
    from tqdm import tqdm

    plan.check()
    out_dir.mkdir(parents=True, exist_ok=True)
    points = {"batch": len(plan.batch_sizes), "context": len(plan.contexts), "decode": 1}
    results: dict = {"plan": asdict(plan), "machine": machine_info()}
    with tqdm(total=sum(points[c] for c in curves) * len(models), desc="bench curves", unit="run") as bar:
        if "batch" in curves:
            results["batch"] = batch_curve(plan, models, bar)
        if "context" in curves:
            results["context"] = context_curve(plan, models, bar)
        if "decode" in curves:
            results["decode"] = decode_trace(plan, models, bar)
    results["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    (out_dir / "curves.json").write_text(json.dumps(results, indent=1))
    results["pngs"] = write_plots(results, out_dir)
    return results


def machine_info() -> dict:
    import platform

    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpus": os.cpu_count(), "loadavg": load, "torch": torch.__version__, "python": platform.python_version()}


def tables(results: dict) -> str:
    out = []
    if "batch" in results:
        c = results["plan"]["batch_context"]
        out.append(f"(a) decode tokens/s vs batch size, context {c}")
        out += _grid(results["batch"], "batch", lambda r: f"{r['decode_tok_s']:.0f}")
    if "context" in results:
        b = results["plan"]["context_batch"]
        out.append(f"\n(b) decode tokens/s vs context, batch {b}")
        out += _grid(results["context"], "context", lambda r: f"{r['decode_tok_s']:.0f}")
        out.append(f"\n(b) prefill tokens/s vs context, batch {b}")
        out += _grid(results["context"], "context", lambda r: f"{r['prefill_tok_s']:.0f}")
        out.append(f"\n(b) model memory MiB (peak resident minus the runtime) vs context, batch {b} [cache MiB]")
        out += _grid(results["context"], "context",
                     lambda r: f"{r['model_bytes'] / MiB:.0f} [{r['cache_bytes'] / MiB:.0f}]")
    if "decode" in results:
        out.append("\n(c) per-token decode ms (median of first and last 10%) and memory growth over the run")
        out.append(f"  {'model':20s} {'first ms':>9s} {'last ms':>9s} {'RSS +MiB':>9s} {'cache +MiB':>10s}")
        for r in results["decode"]:
            if "error" in r:
                out.append(f"  {r['model']:20s} error: {r['error']}")
                continue
            k = max(1, len(r["step_s"]) // 10)
            first, last = statistics.median(r["step_s"][:k]), statistics.median(r["step_s"][-k:])
            rss = (r["step_rss"][-1] - r["step_rss"][0]) / MiB
            cache = (r["step_cache_bytes"][-1] - r["step_cache_bytes"][0]) / MiB
            out.append(f"  {r['model']:20s} {first * 1e3:9.2f} {last * 1e3:9.2f} {rss:9.1f} {cache:10.2f}")
    return "\n".join(out)


def _grid(rows: list[dict], key: str, cell) -> list[str]:
    xs = sorted({r[key] for r in rows})
    lines = [f"  {'model':20s}" + "".join(f"{x:>12d}" for x in xs)]
    for m in dict.fromkeys(r["model"] for r in rows):
        by_x = {r[key]: r for r in rows if r["model"] == m}
        cells = []
        for x in xs:
            r = by_x.get(x)
            text = "-" if r is None or "skipped" in r else "error" if "error" in r else cell(r)
            if r is not None and r.get("over_limit"):
                text += "!"
            cells.append(f"{text:>12s}")
        lines.append(f"  {m:20s}" + "".join(cells))
    if any(r.get("over_limit") for r in rows):
        lines.append("  ! = model memory above --mem-limit: the sweep stopped there")
    return lines


def write_plots(results: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if "batch" in results:
        fig, ax = plt.subplots(figsize=(6, 4))
        _lines(ax, results["batch"], "batch", "decode_tok_s")
        ax.set(ylabel="decode tokens/s", title=f"(a) decode throughput, context {results['plan']['batch_context']}")
        _log_x(ax, results["plan"]["batch_sizes"], "batch size")
        paths.append(_save(fig, out_dir / "curves_batch.png"))
    if "context" in results:
        paths.append(_context_plot(plt, results, out_dir / "curves_context.png"))
    if "decode" in results:
        paths.append(_decode_plot(plt, results, out_dir / "curves_decode.png"))
    return paths


def _context_plot(plt, results: dict, path: Path) -> str:
    plan, rows = results["plan"], results["context"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    _lines(axes[0], rows, "context", "decode_tok_s")
    axes[0].set(ylabel="decode tokens/s", title=f"(b) decode throughput, batch {plan['context_batch']}")
    _lines(axes[1], rows, "context", "model_bytes", scale=1 / MiB)
    if any(r.get("over_limit") for r in rows):
        axes[1].axhline(plan["mem_limit"] / MiB, color="grey", ls="--", lw=1, label="--mem-limit")
        _legend(axes[1])
    axes[1].set(ylabel="peak memory above the runtime (MiB)", title="(b) model memory: weights + cache + activations")
    _lines(axes[2], rows, "context", "cache_bytes", scale=1 / MiB)
    axes[2].set(yscale="log", ylabel="KV cache + Mamba state (MiB)", title="(b) the cache alone")
    for ax in axes:
        _log_x(ax, plan["contexts"], "context (tokens)")
    return _save(fig, path)


def _decode_plot(plt, results: dict, path: Path) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in results["decode"]:
        if "error" in r:
            continue
        xs = range(1, len(r["step_s"]) + 1)
        label = LABELS.get(r["model"], r["model"])
        axes[0].plot(xs, _rolling_median([t * 1e3 for t in r["step_s"]]), label=label)
        line, = axes[1].plot(xs, [(b - r["baseline_bytes"]) / MiB for b in r["step_rss"]], label=label)
        # the cache's own bytes, dotted in the same colour, beside what the process holds
        axes[1].plot(xs, [(b - r["step_cache_bytes"][0]) / MiB for b in r["step_cache_bytes"]],
                     ls=":", color=line.get_color())
    axes[0].set(xlabel="generated tokens", ylabel="ms per token (rolling median)", title="(c) decode time per token")
    axes[1].set(xlabel="generated tokens", ylabel="MiB above the start",
                title="(c) memory while decoding (solid: resident, dotted: cache)")
    for ax in axes:
        _legend(ax)
    return _save(fig, path)


def _log_x(ax, ticks: list[int], label: str) -> None:
    ax.set_xscale("log")
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(label)


def _lines(ax, rows: list[dict], key: str, value: str, scale: float = 1.0) -> None:
    for m in dict.fromkeys(r["model"] for r in rows):
        pts = [(r[key], r[value] * scale) for r in rows if r["model"] == m and value in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=LABELS.get(m, m))
    ax.grid(alpha=0.3)
    _legend(ax)


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:  # a curve whose every point failed or was skipped has none
        ax.legend(fontsize=8)


def _rolling_median(xs: list[float], window: int = 31) -> list[float]:
    half = window // 2
    return [statistics.median(xs[max(0, i - half):i + half + 1]) for i in range(len(xs))]


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)


def replot(out_dir: Path) -> dict:
    """Tables and plots again from a previous run's curves.json (no measuring)."""
    path = out_dir / "curves.json"
    if not path.is_file():
        raise InputError(f"{path} does not exist: run `jambalab bench curves --out {out_dir}` first")
    results = json.loads(path.read_text())
    results["pngs"] = write_plots(results, out_dir)
    return results


def plan_from(quick: bool, **overrides) -> CurvesPlan:
    base = QUICK if quick else CurvesPlan()
    return replace(base, **{k: v for k, v in overrides.items() if v is not None}).check()
