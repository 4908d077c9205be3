"""Transparent huge pages for torch's CPU allocator (THP_MEM_ALLOC_ENABLE=1), on and off: the A/B
behind docs/training.md's advice to set it for training, and not by default.

    python benchmarks/huge_pages.py                          # bench-hybrid and bench-mamba, 3 rounds
    python benchmarks/huge_pages.py --presets bench-mamba --rounds 5 --json thp.json

Each measurement runs in a fresh child process (torch reads the variable once, at its first
allocation), with THP_MEM_ALLOC_ENABLE=1 or =0, alternating on/off in every round so that a
slow spell of a shared machine hits both sides. A child builds the model (random weights,
fp32, 2 threads unless --threads) and times, after a warm-up, the best of --repeat calls of:
one training step (forward with labels, backward, AdamW) at 1 x 512 tokens, one 2048-token
prefill (logits of the last token), and one decode token after a 512-token prompt. The table
gives the best over the rounds, per side, and the ratio off / on (> 1: huge pages faster).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`

BENCHES = ("train 1x512 s", "prefill 2048 s", "decode ms")


# ---------------------------------------------------------------------------------------
# Child: one process, one setting
# ---------------------------------------------------------------------------------------
def child(preset: str, threads: int, repeat: int) -> dict:
    import torch

    from jambalab.bench.kernels import build_pair, our_decode_seconds, train_step_callable
    from jambalab.bench.machine import best_time, huge_pages

    torch.set_num_threads(threads)
    cfg, model, _ = build_pair(preset, with_hf=False)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, 2048), generator=gen)

    with torch.inference_mode():
        prefill = best_time(lambda: model(ids, logits_to_keep=1), repeat)
        decode = min(our_decode_seconds(model, ids[:, :512], 16)[0] for _ in range(repeat))
    model.train()
    train = best_time(train_step_callable(model, ids[:, :512], hf=False), repeat)
    return {"huge_pages": huge_pages(), BENCHES[0]: train, BENCHES[1]: prefill, BENCHES[2]: decode * 1e3}


# ---------------------------------------------------------------------------------------
# Parent: alternate the two settings
# ---------------------------------------------------------------------------------------
def run_child(preset: str, on: bool, threads: int, repeat: int) -> dict:
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1" if on else "0")
    cmd = [sys.executable, __file__, "--child", preset, "--threads", str(threads), "--repeat", str(repeat)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"child {preset} (huge pages {'on' if on else 'off'}) failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["bench-hybrid", "bench-mamba"])
    ap.add_argument("--rounds", type=int, default=3, help="on/off pairs per preset (default 3)")
    ap.add_argument("--repeat", type=int, default=4, help="timed calls per figure in a child, best kept")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write every child's figures to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.threads, args.repeat)))
        return 0
    if args.rounds < 1 or args.repeat < 1 or args.threads < 1:
        ap.error("--rounds, --repeat and --threads must be >= 1")

    from tqdm import tqdm

    runs = []
    todo = [(p, r, on) for p in args.presets for r in range(args.rounds) for on in (True, False)]
    start = time.perf_counter()
    for preset, rnd, on in tqdm(todo, desc="children", unit="run"):
        runs.append({"preset": preset, "round": rnd, "asked": on, **run_child(preset, on, args.threads, args.repeat)})
    print(f"{len(runs)} children in {time.perf_counter() - start:.0f} s, {args.threads} threads, "
          f"load {os.getloadavg()[0]:.2f} at the end")
    print(f"{'preset':<14}{'bench':<16}{'huge pages on':>15}{'off':>10}{'off / on':>10}")
    for preset in args.presets:
        for bench in BENCHES:
            on = min(r[bench] for r in runs if r["preset"] == preset and r["asked"])
            off = min(r[bench] for r in runs if r["preset"] == preset and not r["asked"])
            print(f"{preset:<14}{bench:<16}{on:>15.3f}{off:>10.3f}{off / on:>9.2f}x")
    print("huge pages as the children saw them:", sorted({r["huge_pages"] for r in runs}))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
