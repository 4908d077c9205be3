"""`jambalab ablate`: the paper's Sec. 6 ablations at CPU scale, one knob per run (see jambalab.ablate)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jambalab.commands.common import run_with_threads
from jambalab.errors import InputError


def register(sub) -> None:
    from jambalab.ablate import DEFAULT_TOKENS, GRID, TASKS

    p = sub.add_parser("ablate", help="train and compare attention / Mamba / hybrid / MoE / RoPE variants (paper Sec. 6)",
                       description="Trains a grid of small models that differ in one knob each (same active "
                                   "parameters, same training tokens) over several seeds, evaluates them and prints "
                                   "the paper-style table (mean ± spread over seeds); --task needle also draws the "
                                   "needle-in-a-haystack heatmaps (paper Fig. 4).")
    p.add_argument("--only", help=f"comma-separated runs of the grid ({', '.join(GRID)}); "
                                  "default: all for mqar/passkey/lm, attention,mamba,hybrid-1:7 for needle")
    p.add_argument("--task", default="mqar", help=f"{' | '.join(TASKS)}, or several comma-separated (default: mqar)")
    p.add_argument("--tokens", "--max-tokens", dest="tokens", type=float, default=None,
                   help="training tokens per run: the budget, the same on every machine (default: "
                        + ", ".join(f"{k} {v / 1e6:g}M" for k, v in DEFAULT_TOKENS.items()) + ")")
    p.add_argument("--seeds", "--seed", dest="seeds", default="0,1,2",
                   help="comma-separated seeds (model init and data), one run each (default: 0,1,2)")
    p.add_argument("--budget", type=float, default=None,
                   help="also stop a run after this many seconds (default: no time limit; see --clock)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="what --budget counts: this process's CPU seconds (default; the same compute however busy "
                        "the machine is) or wall-clock seconds")
    p.add_argument("--data", help="text for --task lm: a file, a directory or a JSONL file (default: the stdlib corpus)")
    p.add_argument("--out", help="keep runs (model, metrics, result.json) and plots here; finished runs are skipped on re-run")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 3e-3)")
    p.add_argument("--eval-samples", type=int, default=256,
                   help="held-out samples per context length (recall tasks), per heatmap cell (needle)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (default: 1; on a busy machine OpenMP's spin-waiting makes 2 threads "
                        "several times slower than 1 unless OMP_WAIT_POLICY=PASSIVE is set)")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per run and seed, to stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_with_threads(args.threads, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from jambalab import ablate

    if args.budget is not None and not args.budget > 0:
        raise InputError(f"--budget must be a positive number of seconds, got {args.budget}")
    if args.tokens is not None and not args.tokens >= 1:
        raise InputError(f"--tokens must be at least 1, got {args.tokens}")
    if args.lr is not None and not args.lr > 0:
        raise InputError(f"--lr must be positive, got {args.lr}")
    if args.eval_samples < 1:
        raise InputError(f"--eval-samples must be positive, got {args.eval_samples}")
    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    bad = [t for t in tasks if t not in ablate.TASKS]
    if bad or not tasks:
        raise InputError(f"--task: unknown task(s) {bad or args.task!r}; choose from {', '.join(ablate.TASKS)}")
    seeds = _seeds(args.seeds)
    out = Path(args.out) if args.out else None
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))

    results = []
    for task in tasks:
        names = ablate.parse_only(args.only or (ablate.NEEDLE_GRID if task == "needle" else None))
        hp = ablate.TrainHParams(max_tokens=int(args.tokens or ablate.DEFAULT_TOKENS[task]))
        if args.lr is not None:
            hp.lr = args.lr
        results += ablate.run_grid(names, task, hp, seeds, out=out, budget_s=args.budget, data=args.data,
                                   eval_samples=args.eval_samples,
                                   clock=args.clock, log=log)
    if out is not None:
        from jambalab.ablate_plots import plot_results

        for path in plot_results(results, out):
            log(f"wrote {path}")
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "summary.json").write_text(json.dumps(ablate.summarize(results), indent=1))
    if args.json:
        print(json.dumps(results))
    else:
        print()
        print(ablate.format_table(results))
    return 0


def _seeds(s: str) -> list[int]:
    try:
        seeds = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--seeds must be comma-separated integers, got {s!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise InputError(f"--seeds must name distinct seeds, got {s!r}")
    return seeds
