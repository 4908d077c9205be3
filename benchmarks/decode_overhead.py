"""The fixed cost of a decode step, and what one busy core does to it: ms per token of greedy
generate() after a 16-token prompt, with the whole-token op (jambalab/decode_step.py,
csrc/step.cpp) or layer by layer (its twin, what decode was before), idle and with one other
process spinning on core 0.

    python benchmarks/decode_overhead.py                      # tiny-hybrid, bench-hybrid, bench-mamba
    python benchmarks/decode_overhead.py --presets tiny-hybrid --tokens 200 --json out.json

Each figure is the median time of one decode step of stream_generate over --repeat runs of
--tokens steps (sampling included, the prefill excluded); "busy" starts `python -c "while True: pass"` pinned to core 0 (sched_setaffinity)
for the measurement and stops it after. The slowdown column is busy / idle.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`


def ms_per_token(model, ids, tokens: int, repeat: int) -> float:
    """The median time of one decode step of stream_generate (sampling included, prefill not) over
    `repeat` runs of `tokens` steps. A median, not a mean: on a shared machine a mean mostly
    counts the time other processes held the core."""
    from jambalab.generate import stream_generate

    times = []
    for _ in range(repeat):
        stream = stream_generate(model, ids, tokens + 1)
        next(stream)  # the prefill's token
        t0 = time.perf_counter()
        for _ in stream:
            t1 = time.perf_counter()
            times.append((t1 - t0) * 1000)
            t0 = t1
    return statistics.median(times)


def busy_core() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import os; os.sched_setaffinity(0, {0})\nwhile True: pass"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny-hybrid", "bench-hybrid", "bench-mamba"])
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    if args.tokens < 1 or args.repeat < 1 or args.threads < 1:
        ap.error("--tokens, --repeat and --threads must be >= 1")

    import torch

    import jambalab
    import jambalab.model as M
    from jambalab.decode_step import decode_step

    torch.set_num_threads(args.threads)
    rows = []
    print(f"ms/token, greedy generate, {args.threads} threads, {os.cpu_count()} cores")
    print(f"{'preset':<14}{'path':<10}{'idle':>9}{'busy':>9}{'slowdown':>10}{'tok/s idle':>12}")
    for preset in args.presets:
        model = jambalab.from_preset(preset, seed=0).eval()
        ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        for path, step in (("step", decode_step), ("layers", lambda *a: None)):
            M.decode_step = step
            ms_per_token(model, ids, min(args.tokens, 10), 1)  # warm up: kernel build, caches
            idle = ms_per_token(model, ids, args.tokens, args.repeat)
            spinner = busy_core()
            try:
                time.sleep(0.2)
                busy = ms_per_token(model, ids, args.tokens, args.repeat)
            finally:
                spinner.kill()
                spinner.wait()
            M.decode_step = decode_step
            row = dict(preset=preset, path=path, threads=args.threads, idle_ms=idle, busy_ms=busy,
                       slowdown=busy / idle, tokens_per_s=1000 / idle)
            rows.append(row)
            print(f"{preset:<14}{path:<10}{idle:>9.3f}{busy:>9.3f}{busy / idle:>9.1f}x{1000 / idle:>12.0f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
