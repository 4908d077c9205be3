"""`jambalab bench <what>`: benchmark programs that print tables and write plots.

A group of subcommands: each entry of BENCHES is a function that adds its own parser to the
group's subparsers (and sets `func`). Add a benchmark by writing jambalab/bench/<name>.py with an
`add_parser(group)` and listing `_from_module("<name>")`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jambalab.errors import InputError


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (tables and plots)", description=__doc__)
    group = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for add in BENCHES:
        add(group)


# ---------------------------------------------------------------------------------------
# bench curves
# ---------------------------------------------------------------------------------------
def add_curves(group) -> None:
    p = group.add_parser("curves", help="throughput/memory vs batch, context and generated tokens (4 architectures)",
                         description="Measured here, each point in a fresh process. See jambalab/bench/curves.py.")
    p.add_argument("--quick", action="store_true", help="tiny sizes: every curve in seconds (tests, smoke runs)")
    p.add_argument("--out", default="bench-out", help="directory for curves.json and the PNGs (default bench-out)")
    p.add_argument("--curves", default="batch,context,decode", help="which curves: batch,context,decode")
    p.add_argument("--models", help="comma-separated presets (default: the four curves-* presets)")
    p.add_argument("--mem-limit", help="(b) stop a model's context sweep once its model memory (peak RSS minus "
                   "the torch runtime) exceeds this, e.g. 512MiB (default 4GiB)")
    p.add_argument("--batch-sizes", help="(a) comma-separated batch sizes")
    p.add_argument("--batch-context", type=int, help="(a) context length")
    p.add_argument("--contexts", help="(b) comma-separated context lengths")
    p.add_argument("--context-batch", type=int, help="(b) batch size")
    p.add_argument("--tokens", type=int, help="(c) number of generated tokens N")
    p.add_argument("--chunk", type=int, help="prefill chunk (tokens per forward call)")
    p.add_argument("--threads", type=int, help="torch threads per run (default 2)")
    p.add_argument("--replot", action="store_true", help="no measuring: tables and PNGs again from --out/curves.json")
    p.set_defaults(func=run_curves)


def _ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{what} must be comma-separated integers, got {text!r}") from None


def run_curves(args: argparse.Namespace) -> int:
    from jambalab.bench import curves as C
    from jambalab.config import JambaConfig
    from jambalab.memory import parse_size

    which = tuple(x.strip() for x in args.curves.split(",") if x.strip())
    bad = [c for c in which if c not in C.CURVES]
    if bad or not which:
        raise InputError(f"unknown curve(s) {bad or which}; choose from {', '.join(C.CURVES)}")
    models = tuple(args.models.split(",")) if args.models else C.MODELS
    for m in models:
        JambaConfig.from_preset(m)  # an unknown preset fails here, before any run
    if args.replot:
        results = C.replot(Path(args.out))
        print(C.tables(results))
        print("wrote " + ", ".join(results["pngs"]))
        return 0
    plan = C.plan_from(args.quick, batch_sizes=_ints(args.batch_sizes, "--batch-sizes"),
                       batch_context=args.batch_context, contexts=_ints(args.contexts, "--contexts"),
                       context_batch=args.context_batch, trace_tokens=args.tokens, chunk=args.chunk,
                       threads=args.threads, mem_limit=parse_size(args.mem_limit) if args.mem_limit else None)
    results = C.run_curves(plan, Path(args.out), which, models)
    print(C.tables(results))
    m = results["machine"]
    print(f"\n{m['cpus']} CPUs, load average (1, 5, 15 min) at the start {m['loadavg']}, at the end "
          f"{m['loadavg_end']}; wrote {Path(args.out) / 'curves.json'}, " + ", ".join(results["pngs"]))
    return 0


# ---------------------------------------------------------------------------------------
# The others: their parser and runner live with the benchmark, in jambalab/bench/<name>.py
# ---------------------------------------------------------------------------------------
def _from_module(name: str):
    def add(group) -> None:
        import importlib

        importlib.import_module(f"jambalab.bench.{name}").add_parser(group)

    return add


# Each entry adds one `jambalab bench <name>` subcommand.
BENCHES = [_from_module("kernels"), add_curves, _from_module("serve"), _from_module("peers"), _from_module("vision")]
