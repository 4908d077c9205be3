"""`jambalab ablate`: the paper's Sec. 6 ablations at CPU scale, one knob per run (see jambalab.ablate)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jambalab.commands.common import run_with_threads
from jambalab.errors import InputError


def register(sub) -> None:
    from jambalab.ablate import GRID, TASKS

    p = sub.add_parser("ablate", help="train and compare attention / Mamba / hybrid / MoE / RoPE variants (paper Sec. 6)",
                       description="Trains a grid of small models that differ in one knob each under the same token "
                                   "and time budget, evaluates them and prints the paper-style table.")
    p.add_argument("--only", help=f"comma-separated runs of the grid ({', '.join(GRID)}); default: all")
    p.add_argument("--task", default="mqar", help=f"{' | '.join(TASKS)}, or several comma-separated (default: mqar)")
    p.add_argument("--budget", type=float, default=300.0, help="training seconds per run (default: 300)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="what --budget counts: this process's CPU seconds (default; every run gets the same compute "
                        "however busy the machine is, and with 1 thread it equals wall time on an idle machine) "
                        "or wall-clock seconds")
    p.add_argument("--max-tokens", type=float, default=None,
                   help="training tokens per run (default: 8M; the time budget usually ends a run first)")
    p.add_argument("--data", help="text for --task lm: a file, a directory or a JSONL file (default: the stdlib corpus)")
    p.add_argument("--out", help="keep runs (model, metrics, result.json) and plots here; finished runs are skipped on re-run")
    p.add_argument("--seed", type=int, default=0, help="model init and data seed (default: 0)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 3e-3)")
    p.add_argument("--eval-samples", type=int, default=256, help="held-out samples per context length (recall tasks)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (default: 1; on a busy machine OpenMP's spin-waiting makes 2 threads "
                        "several times slower than 1 unless OMP_WAIT_POLICY=PASSIVE is set)")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per run, to stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_with_threads(args.threads, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from jambalab import ablate
    if not args.budget > 0:
        raise InputError(f"--budget must be a positive number of seconds, got {args.budget}")
    names = ablate.parse_only(args.only)
    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    bad = [t for t in tasks if t not in ablate.TASKS]
    if bad or not tasks:
        raise InputError(f"--task: unknown task(s) {bad or args.task!r}; choose from {', '.join(ablate.TASKS)}")
    hp = ablate.TrainHParams()
    if args.lr is not None:
        if not args.lr > 0:
            raise InputError(f"--lr must be positive, got {args.lr}")
        hp.lr = args.lr
    if args.max_tokens is not None:
        if not args.max_tokens >= 1:
            raise InputError(f"--max-tokens must be at least 1, got {args.max_tokens}")
        hp.max_tokens = int(args.max_tokens)
    if args.eval_samples < 1:
        raise InputError(f"--eval-samples must be positive, got {args.eval_samples}")
    out = Path(args.out) if args.out else None
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))

    results = []
    for task in tasks:
        results += ablate.run_grid(names, task, args.budget, out=out, seed=args.seed, hp=hp, data=args.data,
                                   eval_samples=args.eval_samples, clock=args.clock, log=log)
    if out is not None:
        for path in ablate.plot_results(results, out):
            log(f"wrote {path}")
        (out / "results.json").write_text(json.dumps(results, indent=1))
    if args.json:
        print(json.dumps(results))
    else:
        print()
        print(ablate.format_table(results))
    return 0
