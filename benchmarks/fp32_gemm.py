"""The float32 prefill GEMM two ways: torch's F.linear (MKL's sgemm in the x86 wheels) and oneDNN's fp32
matmul (torch.ops.mkldnn._linear_pointwise), which jambalab.ops.gemm chooses for prefill-sized linears.

    python benchmarks/fp32_gemm.py                          # the matrices of bench peers' A and B
    python benchmarks/fp32_gemm.py --rows 64 512 --repeat 5 --json gemm.json --plot gemm.png

For each weight shape (N, K) and each number of rows M: x (M, K) @ W^T, both ways (oneDNN as jambalab
calls it: jambalab.ops.gemm.linear, in blocks of 256 rows, the last padded to a multiple of 32) alternating in one
process (a warm-up call each first, so oneDNN's one-time primitive creation is not timed), the best of
--repeat calls, in GFLOP/s (2 M N K / seconds). The table gives both and the ratio oneDNN / F.linear;
the plot draws GFLOP/s against M, one panel per shape.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`

# (label, N, K): bench peers' A (Falcon-Mamba-7B-shaped) and B (Jamba-shaped, d 1024) matrices.
SHAPES = [("A in_proj", 16384, 4096), ("A out_proj", 4096, 8192), ("A x_proj", 288, 8192),
          ("A dt_proj", 8192, 256), ("B expert gate/up", 3328, 1024), ("B expert down", 1024, 3328),
          ("B in_proj", 4096, 1024)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="+", type=int, default=[17, 64, 100, 256, 512, 2048])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the measurements here")
    ap.add_argument("--plot", type=Path, help="write the plot here (png)")
    args = ap.parse_args()
    if args.repeat < 1 or args.threads < 1 or min(args.rows) < 1:
        ap.error("--repeat, --threads and every --rows value must be >= 1")

    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from jambalab.ops import gemm

    if gemm.backend() != "onednn":
        print(f"jambalab.ops.gemm chose {gemm.backend()!r} here (a torch without oneDNN, or {gemm.GEMM_ENV}=blas): "
              "nothing to compare")
        return 1
    torch.set_num_threads(args.threads)
    ways = {"F.linear": F.linear, "oneDNN": gemm.linear}
    rows = []
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode(), tqdm(total=len(SHAPES) * len(args.rows), desc="fp32 gemm", unit="shape") as bar:
        for label, n, k in SHAPES:
            w = torch.randn(n, k, generator=g) * k ** -0.5
            for m in args.rows:
                x = torch.randn(m, k, generator=g)
                best = dict.fromkeys(ways, 0.0)
                for fn in ways.values():
                    fn(x, w, None)
                for _ in range(args.repeat):
                    for name, fn in ways.items():
                        t0 = time.perf_counter()
                        fn(x, w, None)
                        best[name] = max(best[name], 2 * m * n * k / (time.perf_counter() - t0) / 1e9)
                rows.append({"shape": label, "N": n, "K": k, "M": m, **{f"{w_} GFLOP/s": v for w_, v in best.items()}})
                bar.update(1)
    print(f"\nfloat32 x (M, K) @ W (N, K)^T, {args.threads} threads, GFLOP/s, best of {args.repeat}\n")
    print("| matrix | N x K | M | F.linear | oneDNN | oneDNN / F.linear |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["F.linear GFLOP/s"], r["oneDNN GFLOP/s"]
        print(f"| {r['shape']} | {r['N']} x {r['K']} | {r['M']} | {a:.0f} | {b:.0f} | {b / a:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "repeat": args.repeat, "rows": rows}, indent=1))
    if args.plot:
        _plot(rows, args.plot, args.threads)
    return 0


def _plot(rows: list[dict], path: Path, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["shape"] for r in rows))
    cols = min(4, len(labels))
    lines = (len(labels) + cols - 1) // cols
    fig, axes = plt.subplots(lines, cols, figsize=(3.2 * cols, 2.8 * lines), squeeze=False, sharey=True)
    for ax, label in zip(axes.flat, labels):
        mine = [r for r in rows if r["shape"] == label]
        for way, style in (("F.linear", "o--"), ("oneDNN", "s-")):
            ax.plot([r["M"] for r in mine], [r[f"{way} GFLOP/s"] for r in mine], style, label=way)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{label} ({mine[0]['N']}x{mine[0]['K']})", fontsize=9)
        ax.set_xlabel("rows M")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(labels):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("GFLOP/s")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"float32 prefill GEMM, {threads} threads: F.linear (MKL) vs oneDNN")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
