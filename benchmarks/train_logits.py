"""A training step with and without the (B, L, V) logits: `model(ids, labels=ids)` against
`model(ids, labels=ids, return_logits=False)` (lm_head + loss in row chunks, the trainer's call).

    python benchmarks/train_logits.py                            # bench-hybrid, 1 x 512 and 8 x 512 tokens
    python benchmarks/train_logits.py --presets bench-mamba --batches 1 4 --json tl.json

Each (preset, batch, setting) runs in a fresh child process, so the peak resident memory
(ru_maxrss) is that setting's own: the model, AdamW's state and one step's activations. A
child builds the model (random weights, fp32), runs one untimed step, then --repeat timed steps
(forward with labels, backward, AdamW with fused=True) of batch x 512 tokens, and reports the
best and median step time and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`
SEQ = 512


def child(preset: str, batch: int, keep: bool, repeat: int, threads: int) -> dict:
    import torch

    from jambalab.bench.kernels import build_pair

    torch.set_num_threads(threads)
    cfg, model, _ = build_pair(preset, with_hf=False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (batch, SEQ), generator=torch.Generator().manual_seed(0))

    def step():
        model(ids, labels=ids, return_logits=keep).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"preset": preset, "batch": batch, "logits": "kept" if keep else "none", "best_s": times[0],
            "median_s": times[len(times) // 2], "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["bench-hybrid"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="sequences of 512 tokens per step")
    ap.add_argument("--repeat", type=int, default=5, help="timed steps per child")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the rows to this file")
    ap.add_argument("--child", nargs=3, metavar=("PRESET", "BATCH", "KEEP"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        preset, batch, keep = args.child
        print(json.dumps(child(preset, int(batch), keep == "1", args.repeat, args.threads)))
        return 0
    if args.repeat < 1 or args.threads < 1 or min(args.batches) < 1:
        ap.error("--repeat, --threads and every --batches value must be >= 1")

    from tqdm import tqdm

    rows = []
    todo = [(p, b, k) for p in args.presets for b in args.batches for k in ("1", "0")]
    for preset, batch, keep in tqdm(todo, desc="children", unit="run"):
        cmd = [sys.executable, __file__, "--child", preset, str(batch), keep, "--repeat", str(args.repeat),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if out.returncode != 0:
            raise SystemExit(f"child {preset} batch {batch} logits {keep} failed:\n{out.stderr}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'preset':<14}{'tokens':>8}{'logits':>8}{'best s':>9}{'median s':>10}{'peak RSS MiB':>14}")
    for r in rows:
        print(f"{r['preset']:<14}{r['batch'] * SEQ:>8}{r['logits']:>8}{r['best_s']:>9.3f}{r['median_s']:>10.3f}"
              f"{r['peak_rss_mib']:>14.0f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
