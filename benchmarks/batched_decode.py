"""Batched decode: ms per step and tokens/s against the number of rows, per precision.

What the serving engine does each step with R running requests: one token per row, one forward. Each
row count is prefilled with a 16-token prompt, warmed up for 2 steps, then timed over --steps steps
(median step), in one process per precision (fresh memory, the same threads).

    python benchmarks/batched_decode.py --model bench-out/peers/jamba-1024d-8l --precisions bf16,bf16w \\
        --rows 1,4,5,8,16 --plot batched_decode.png
    python benchmarks/batched_decode.py --preset tiny-hybrid      # any preset, random weights

Precisions are bench peers' (fp32, bf16 = a bf16 model, bf16w = weight-only bf16, int8, int4).
"""

from __future__ import annotations

import jambalab  # noqa: F401  (before torch: jambalab's OpenMP settings)

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def measure(source: str, precision: str, rows: list[int], steps: int, threads: int) -> list[dict]:
    """Child side: one precision, every row count."""
    from jambalab.bench.peers import PRECISIONS, load_precision

    torch.set_num_threads(threads)
    dtype, quantize = PRECISIONS[precision]
    kind, name = source.split(":", 1)
    model = (load_precision(name, precision) if kind == "model"
             else jambalab.from_preset(name, seed=0).to(getattr(torch, dtype)).eval())
    if kind == "preset" and quantize:
        from jambalab.quant import quantize_model

        quantize_model(model, quantize)
    prompt = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    out = []
    with torch.inference_mode():
        for r in rows:
            cache = model.allocate_cache(r, max_length=16 + steps + 2)
            model(prompt.expand(r, -1).contiguous(), cache=cache)
            tok = torch.full((r, 1), 5)
            times = []
            for i in range(steps + 2):
                t0 = time.perf_counter()
                tok = model(tok, cache=cache).logits[:, -1].argmax(-1, keepdim=True)  # (r, 1) greedy
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            ms = 1e3 * statistics.median(times)
            out.append({"precision": precision, "rows": r, "ms_per_step": ms, "tokens_per_s": 1e3 * r / ms})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="a checkpoint directory (HF or jambalab)")
    src.add_argument("--preset", help="a jambalab preset with random weights (default tiny-hybrid)")
    ap.add_argument("--precisions", default="fp32,bf16,bf16w,int8,int4")
    ap.add_argument("--rows", default="1,2,4,5,8,16", help="comma-separated row counts")
    ap.add_argument("--steps", type=int, default=16, help="timed steps per row count (median kept)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plot", help="write a PNG: tokens/s against rows, one line per precision")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], rows, args.steps, args.threads)))
        return
    from jambalab.bench.peers import PRECISIONS

    precisions = args.precisions.split(",")
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not rows or min(rows) < 1 or args.steps < 1:
        sys.exit(f"batched_decode: precisions must be among {','.join(PRECISIONS)} (got {bad}), rows and steps >= 1")
    source = f"model:{args.model}" if args.model else f"preset:{args.preset or 'tiny-hybrid'}"
    results = []
    for p in precisions:
        cmd = [sys.executable, __file__, "--child", source, p, "--rows", args.rows, "--steps", str(args.steps),
               "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"batched_decode: {p} failed:\n{done.stderr[-2000:]}")
        results += json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{source}, {args.threads} threads, median of {args.steps} steps")
    print("| precision | rows | ms / step | tokens/s |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['precision']} | {r['rows']} | {r['ms_per_step']:.2f} | {r['tokens_per_s']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for p in precisions:
            mine = [r for r in results if r["precision"] == p]
            ax.plot([r["rows"] for r in mine], [r["tokens_per_s"] for r in mine], marker="o", label=p)
        ax.set_xlabel("rows (requests decoding together)")
        ax.set_ylabel("tokens/s, all rows")
        name = source.split(":", 1)[1]
        ax.set_title(f"batched decode: {Path(name).name}, {args.threads} threads", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
