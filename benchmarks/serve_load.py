"""Load and fault test of `jambalab serve` (see jambalab/bench/serve_load.py for what it sends and checks).

    python benchmarks/serve_load.py                                    # tiny-hybrid, 32 clients, 30 s
    python benchmarks/serve_load.py --model DIR --clients 64 --duration 120 --json load.json
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --served-model-name NAME   # a running server

It starts the server itself (unless --url), runs every request kind once alone for the reference
answers, then the clients for --duration seconds, and prints what each kind got, the server's
idle state before and after, the /metrics counts against the clients', memory, and latencies.
Exit status 1 if a check failed. Throughput and latency figures depend on the machine (and on
anything else running on it): the checks, not the speeds, are the result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", default="tiny-hybrid")
    src.add_argument("--model", help="a checkpoint directory")
    src.add_argument("--url", help="test a server that is already running (no memory check)")
    ap.add_argument("--served-model-name", help="with --url: the model name it serves")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--prefix-cache", default="64MiB")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args()
    if args.clients < 1 or args.duration <= 0:
        ap.error("--clients must be >= 1 and --duration > 0")

    from jambalab.bench.serve_load import MEMORY_OVERHEAD, LoadConfig, ServerProcess, check, run_load

    cfg = LoadConfig(clients=args.clients, duration_s=args.duration, seed=args.seed)
    server, prefix_budget, memory_budget = None, None, None
    if args.url:
        url, name = args.url.rstrip("/").removesuffix("/v1"), args.served_model_name
        if not name:
            import httpx

            name = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    else:
        source = ["--model", args.model] if args.model else ["--preset", args.preset]
        server = ServerProcess([*source, "--max-batch", str(args.max_batch), "--max-seq-len", str(args.max_seq_len),
                                "--prefix-cache", args.prefix_cache], ROOT, threads=args.threads)
        url, name = server.url, Path(args.model).resolve().name if args.model else args.preset
        prefix_budget, memory_budget = budgets(args)
    print(f"load: {cfg.clients} clients for {cfg.duration_s:.0f} s against {url} ({name})", flush=True)
    try:
        report = asyncio.run(run_load(url, name, cfg, pid=server.proc.pid if server else None))
    finally:
        if server is not None:
            server.close()
    problems = check(report, prefix_budget, None if memory_budget is None else memory_budget + MEMORY_OVERHEAD)
    report["problems"] = problems
    print_report(report, memory_budget)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 1 if problems else 0


def budgets(args) -> tuple[int, int]:
    """(prefix-cache bytes, KV + Mamba-state + prefix-cache bytes) the server was configured with."""
    from jambalab.commands.common import config_from_args
    from jambalab.memory import kv_cache_bytes, mamba_state_bytes, parse_size

    cfg = config_from_args(argparse.Namespace(preset=None if args.model else args.preset, config=None,
                                              model=args.model))
    prefix = 0 if args.prefix_cache.strip() == "0" else parse_size(args.prefix_cache)
    kv = kv_cache_bytes(cfg, args.max_batch * args.max_seq_len, 1, "fp32")
    return prefix, kv + mamba_state_bytes(cfg, args.max_batch, "fp32") + prefix


def print_report(r: dict, memory_budget: int | None) -> None:
    mib = 2**20
    print(f"\n{r['requests']} requests in {r['wall_s']:.1f} s ({r['requests'] / r['wall_s']:.1f}/s), "
          f"{r['generated_tokens']:.0f} tokens generated ({r['generated_tokens'] / r['wall_s']:.0f}/s)")
    print(f"{'kind / outcome':<34}{'count':>7}")
    for k, n in r["outcomes"].items():
        print(f"{k:<34}{n:>7}")
    print(f"\n{'route status':<30}{'clients':>9}{'/metrics':>10}")
    for k, v in r["http_counts"].items():
        print(f"{k:<30}{v['client']:>9}{v['server']:>10.0f}")
    print(f"\nserver-side cancelled requests: {r['server_cancelled']:.0f}; prefix-cache hits: {r['prefix_hits']:.0f}, "
          f"bytes held: {(r['prefix_bytes'] or 0) / mib:.2f} MiB")
    print(f"idle before: {r['idle_before']}\nidle after:  {r['idle_after']}")
    if r["memory"]:
        m = r["memory"]
        print(f"memory: baseline RSS {m['baseline_rss'] / mib:.0f} MiB, peak {m['peak_rss'] / mib:.0f} MiB "
              f"(+{(m['peak_rss'] - m['baseline_rss']) / mib:.0f} MiB; configured budgets {memory_budget / mib:.0f} MiB "
              f"+ stated overhead)")
    print("latency (s, indicative): " + ", ".join(f"{k} median {v['median_s']:.3f} max {v['max_s']:.3f}"
                                                   for k, v in r["latency"].items()))
    print("\nchecks: " + ("all passed" if not r["problems"] else "FAILED\n  " + "\n  ".join(r["problems"])))


if __name__ == "__main__":
    sys.exit(main())
