"""Plots of `jambalab ablate` results (matplotlib, imported when used): per task, training curves,
accuracy by context length and the summary scores, as mean and spread over seeds; for the needle
task, the paper's Figure 4 heatmaps (depth x context length) per run and accuracy against length.

    paths = plot_results(results, Path("runs"))   # results: run_grid's list, one dict per (run, seed)

Titles name runs by their grid name (never a path), so a figure reads the same on every machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jambalab.ablate import no_lookup_accuracy, summarize


def plot_results(results: list[dict], out: Path) -> list[Path]:
    """ablate-<task>.png per task; for the needle task also needle-heatmaps.png and needle-by-length.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for task in dict.fromkeys(r["task"] for r in results):
        rs = [r for r in results if r["task"] == task]
        rows = summarize(rs)
        recall = any(r["recall_by_length"] for r in rows)
        fig, axes = plt.subplots(1, 3 if recall else 2, figsize=(15 if recall else 10, 4))
        _plot_curves(axes[0], rs, task)
        if recall:
            _plot_by_length(axes[1], rows, f"{task}: accuracy by context length")
        _plot_summary(axes[-1], rows, task)
        paths.append(_save(fig, out / f"ablate-{task}.png"))
        if any(r.get("needle_grid") for r in rows):
            paths += plot_needle(rows, out)
    return paths


def plot_needle(rows: list[dict], out: Path) -> list[Path]:
    """The heatmaps side by side (mean over seeds) and accuracy against context length."""
    import matplotlib.pyplot as plt

    from jambalab.evaluate import draw_heatmap

    rows = [r for r in rows if r.get("needle_grid")]
    train_len = max(rows[0]["task_params"]["train_lengths"])
    fig, axes = plt.subplots(1, len(rows), figsize=(1 + 4.3 * len(rows), 3.6), squeeze=False, layout="constrained")
    for k, (ax, r) in enumerate(zip(axes[0], rows)):
        g = r["needle_grid"]
        im = draw_heatmap(ax, np.asarray(g["accuracy"]), g["lengths"], g["depths"],
                          f"{r['name']} (mean of {len(r['seeds'])} seed{'s' if len(r['seeds']) > 1 else ''})")
        ax.axvline(g["lengths"].index(train_len) + 0.5, color="black", lw=1.5, ls="--")
        if k:
            ax.set_ylabel("")
    fig.colorbar(im, ax=list(axes[0]), label="needle retrieval accuracy", shrink=0.9)
    fig.suptitle(f"key-value needle in a haystack, trained on contexts of up to {train_len} tokens "
                 f"(dashed line); one key-value pair per {rows[0]['task_params']['pair_every']} tokens", fontsize=10)
    heat = _save(fig, out / "needle-heatmaps.png", tight=False)

    fig, ax = plt.subplots(figsize=(6, 4))
    _plot_by_length(ax, rows, "needle: accuracy against context length (mean ± sd over seeds)")
    lengths, params = rows[0]["needle_grid"]["lengths"], rows[0]["task_params"]
    ax.plot(lengths, [no_lookup_accuracy(max(1, n // params["pair_every"]), params["n_values"]) for n in lengths],
            color="gray", ls=":", label="no lookup: the context's commonest value")
    ax.legend(fontsize=7)
    ax.axvline(train_len, color="gray", ls="--", lw=1)
    ax.text(train_len, 1.0, " longest training length", fontsize=7, va="top", color="gray")
    return [heat, _save(fig, out / "needle-by-length.png")]


def _save(fig, path: Path, tight: bool = True) -> Path:
    import matplotlib.pyplot as plt

    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _plot_curves(ax, rs: list[dict], task: str) -> None:
    colors = _colors(rs)
    seen = set()
    for r in rs:
        curve = r.get("train_curve") or []
        label = None if r["name"] in seen else r["name"]
        seen.add(r["name"])
        ax.plot([c[0] / 1e6 for c in curve], [c[1] for c in curve], color=colors[r["name"]], alpha=0.7, lw=1,
                label=label)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("training loss (nats per byte)" if task == "lm" else "training loss on the answers")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(f"{task}: training loss (one line per seed)")


def _plot_by_length(ax, rows: list[dict], title: str) -> None:
    colors = _colors(rows)
    for r in rows:
        by = r["recall_by_length"]
        xs = sorted(int(k) for k in by)
        ax.errorbar(xs, [by[str(x)]["mean"] for x in xs], yerr=[by[str(x)]["std"] for x in xs], marker="o",
                    capsize=3, color=colors[r["name"]], label=r["name"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("accuracy (held out)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)


def _plot_summary(ax, rows: list[dict], task: str) -> None:
    names = [r["name"] for r in rows]
    key = "bits_per_byte" if all(r["bits_per_byte"] is not None for r in rows) else "val_loss"
    ax.bar(names, [r[key]["mean"] for r in rows], yerr=[r[key]["std"] for r in rows], capsize=3, color="tab:blue")
    ax.set_ylabel(key.replace("_", " "))
    ax.tick_params(axis="x", rotation=30, labelsize=7)
    ax.set_title(f"{task}: held-out {key.replace('_', ' ')} (mean ± sd over seeds)")


def _colors(rows: list[dict]) -> dict[str, str]:
    names = list(dict.fromkeys(r["name"] for r in rows))
    return {n: f"C{i}" for i, n in enumerate(names)}
