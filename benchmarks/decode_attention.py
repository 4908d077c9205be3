"""Decode after a long context: one token of bench-hybrid with S cached tokens, its attention through
jambalab.model._attend_one_query (fp32: the csrc/attention.cpp kernel) or through SDPA with
enable_gqa (the twin, what it was before).

    python benchmarks/decode_attention.py                                  # S = 8K, 64K, 256K
    python benchmarks/decode_attention.py --lengths 1024 32768 --threads 1

The cache is allocated for S + 64 positions and its length set to S without a prefill (the time
of a decode step does not depend on the cached values, and a 256K-token prefill takes ~15
minutes here). Both variants run twice, alternating, in one process; each figure is the best of
--repeat steps.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="bench-hybrid")
    ap.add_argument("--lengths", nargs="+", type=int, default=[8192, 65536, 262144])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.repeat < 1 or args.threads < 1 or min(args.lengths) < 1:
        ap.error("--repeat, --threads and every --lengths value must be >= 1")

    import torch
    import torch.nn.functional as F

    from jambalab import model as M
    from jambalab.bench.kernels import build_pair

    torch.set_num_threads(args.threads)
    cfg, model, _ = build_pair(args.preset, with_hf=False)
    if not cfg.n_attention_layers:
        ap.error(f"{args.preset} has no attention layer")
    ours = M._attend_one_query
    variants = {"jambalab": ours,
                "sdpa enable_gqa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)}
    print(f"{args.preset}, {args.threads} threads: ms per decode token (best of {args.repeat})")
    print(f"{'cached':>9}{'jambalab':>11}{'sdpa enable_gqa':>18}{'speedup':>9}")
    tok = torch.tensor([[5]])
    try:
        for length in args.lengths:
            cache = model.allocate_cache(1, length + 64)
            best = {name: float("inf") for name in variants}
            with torch.inference_mode():
                for name in list(variants) * 2:
                    M._attend_one_query = variants[name]
                    cache.length = length
                    model(tok, cache=cache)  # warm-up
                    for _ in range(args.repeat):
                        start = time.perf_counter()
                        model(tok, cache=cache)
                        best[name] = min(best[name], time.perf_counter() - start)
                    cache.length = length
            a, b = best["jambalab"] * 1e3, best["sdpa enable_gqa"] * 1e3
            print(f"{length:>9}{a:>11.2f}{b:>18.2f}{b / a:>8.2f}x")
    finally:
        M._attend_one_query = ours
    return 0


if __name__ == "__main__":
    sys.exit(main())
