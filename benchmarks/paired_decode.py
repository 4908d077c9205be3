"""Paired decode rounds against llama.cpp: each round runs llama-bench's decode of N tokens, then
jambalab's, seconds apart, so both engines meet the machine in the same state.

`jambalab bench peers` alternates the engines too, but one round of it is minutes long, and this
VM's memory bandwidth moves by up to ~1.5x from one minute to the next (docs/precision.md), which
is enough to turn a decode pair around between runs. Here the jambalab side is one process that
keeps its model loaded and decodes N tokens (greedy, from an empty cache, as llama-bench's tg) each
time it is asked, and llama-bench runs once a round (`-p 0 -n N -r 1`, after its own warm-up). The
figure of a pair is the ratio of each round, jambalab / llama.cpp, and their median.

    T=llama_cpp_python-0.3.36/vendor/llama.cpp
    python benchmarks/paired_decode.py --llama-bench $T/build/bin/llama-bench --rounds 10 \\
        --pair bench-out/peers/falcon-mamba-7b-6l:bench-out/peers/gguf/falcon-mamba-7b-6l-bf16.gguf:bf16 \\
        --pair bench-out/peers/falcon-mamba-7b-6l:bench-out/peers/gguf/falcon-mamba-7b-6l-q8_0.gguf:int8 \\
        --plot paired.png --json paired.json

Each --pair is MODEL_DIR:GGUF:PRECISION, the precision one of bench peers' (fp32, bf16 = a bf16
model, bf16w = weight-only bf16, int8, int4); bench peers' --work folder holds both the checkpoints
and their GGUF files (gguf/).
"""

from __future__ import annotations

import jambalab  # noqa: F401  (before torch: jambalab's OpenMP settings)

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch


def child(model_dir: str, precision: str, tokens: int, threads: int) -> None:
    """The jambalab side: load once, print "ready", then decode `tokens` tokens for each line read."""
    from jambalab.bench.peers import greedy_decode_rate, load_precision

    torch.set_num_threads(threads)
    model = load_precision(model_dir, precision)
    first = torch.full((1, 1), 5)
    with torch.inference_mode():
        greedy_decode_rate(model, first, min(tokens, 8))  # warm-up, as llama-bench's
        print("ready", flush=True)
        for _ in sys.stdin:
            print(f"{greedy_decode_rate(model, first, tokens):.4f}", flush=True)


def llama_decode(bench: str, gguf: str, tokens: int, threads: int) -> float:
    """llama-bench's decode tokens/s for one run of `tokens` tokens."""
    from jambalab.bench.llamacpp import parse_llama_bench, run_tool

    out = run_tool([bench, "-m", gguf, "-t", str(threads), "-p", "0", "-n", str(tokens), "-r", "1", "-o", "json"],
                   600, f"llama-bench on {Path(gguf).name}")
    try:
        return parse_llama_bench(json.loads(out))["decode"][0]
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise RuntimeError(f"llama-bench on {Path(gguf).name} printed no decode figure: {e}") from None


def run_pair(bench: str, pair: dict, rounds: int, tokens: int, threads: int) -> dict:
    """`rounds` rounds of llama-bench then jambalab on one pair; the jambalab process lives for all of them."""
    cmd = [sys.executable, __file__, "--child", pair["model"], pair["precision"], "--tokens", str(tokens),
           "--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"jambalab could not load {pair['model']} as {pair['precision']}:\n"
                               f"{proc.stderr.read()[-2000:]}")
        theirs, ours = [], []
        for r in range(rounds):
            theirs.append(llama_decode(bench, pair["gguf"], tokens, threads))
            proc.stdin.write("go\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"jambalab's decoder for {pair['model']} exited:\n{proc.stderr.read()[-2000:]}")
            ours.append(float(line))
            print(f"  round {r + 1}/{rounds}: llama.cpp {theirs[-1]:.2f}, jambalab {ours[-1]:.2f} tokens/s",
                  file=sys.stderr, flush=True)
    finally:
        proc.stdin.close()
        proc.kill()
        proc.wait()
    ratios = [a / b for a, b in zip(ours, theirs)]
    return {**pair, "llama_cpp": theirs, "jambalab": ours, "ratios": ratios,
            "ratio_median": statistics.median(ratios), "ahead": sum(x > 1 for x in ratios)}


def parse_pair(text: str) -> dict:
    from jambalab.bench.peers import PRECISIONS

    parts = text.rsplit(":", 2)
    if len(parts) != 3 or parts[2] not in PRECISIONS:
        sys.exit(f"paired_decode: --pair {text!r} must be MODEL_DIR:GGUF:PRECISION, the precision among "
                 f"{','.join(PRECISIONS)}")
    model, gguf, precision = parts
    if not Path(model).is_dir():
        sys.exit(f"paired_decode: --pair {text!r}: {model} is not a directory")
    if not Path(gguf).is_file():
        sys.exit(f"paired_decode: --pair {text!r}: {gguf} is not a file")
    return {"model": model, "gguf": gguf, "precision": precision, "label": f"{Path(model).name} {precision} / "
            f"{Path(gguf).stem.rsplit('-', 1)[-1].upper()}"}


def table(results: list[dict], tokens: int, threads: int) -> str:
    lines = [f"decode of {tokens} tokens from an empty cache, {threads} threads; per round: llama-bench, then jambalab",
             "| pair | llama.cpp tokens/s (median) | jambalab tokens/s (median) | ratio per round: median [min, max] "
             "| rounds jambalab ahead |",
             "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['label']} | {statistics.median(r['llama_cpp']):.2f} | {statistics.median(r['jambalab']):.2f} "
                     f"| {r['ratio_median']:.2f}x [{min(r['ratios']):.2f}, {max(r['ratios']):.2f}] "
                     f"| {r['ahead']} of {len(r['ratios'])} |")
    return "\n".join(lines)


def plot(results: list[dict], path: str, tokens: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(results) + 2), 4))
    for i, r in enumerate(results):
        xs = [i + 0.15 * ((j % 5) - 2) / 2 for j in range(len(r["ratios"]))]  # a little spread, not stacked
        ax.scatter(xs, r["ratios"], s=14, alpha=0.7)
        ax.plot([i - 0.3, i + 0.3], [r["ratio_median"]] * 2, color="black", lw=2)
    ax.axhline(1.0, color="grey", ls="--", lw=1)
    ax.set_xticks(range(len(results)), [r["label"] for r in results], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("jambalab / llama.cpp, decode tokens/s")
    ax.set_title(f"paired decode rounds ({tokens} tokens each; bar: median)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", help="the llama-bench binary")
    ap.add_argument("--pair", action="append", default=[], help="MODEL_DIR:GGUF:PRECISION (repeat for more)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=32, help="tokens decoded per round by each engine")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plot", help="write a PNG: every round's ratio per pair")
    ap.add_argument("--json", help="also write every round here")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.tokens, args.threads)
        return
    if args.rounds < 1 or args.tokens < 1 or args.threads < 1:
        sys.exit("paired_decode: --rounds, --tokens and --threads must be >= 1")
    if not args.llama_bench or not Path(args.llama_bench).is_file():
        sys.exit(f"paired_decode: --llama-bench {args.llama_bench} is not a file (build llama.cpp: ../shared/LLAMACPP.md)")
    if not args.pair:
        sys.exit("paired_decode: give at least one --pair MODEL_DIR:GGUF:PRECISION")
    pairs = [parse_pair(p) for p in args.pair]
    results = []
    for p in pairs:
        print(f"{p['label']}:", file=sys.stderr, flush=True)
        try:
            results.append(run_pair(args.llama_bench, p, args.rounds, args.tokens, args.threads))
        except RuntimeError as e:
            sys.exit(f"paired_decode: {e}")
    print(table(results, args.tokens, args.threads))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.plot:
        plot(results, args.plot, args.tokens)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
