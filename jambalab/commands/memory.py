"""`jambalab memory`: inference memory of a model at a context, batch and dtype; what fits a budget;
the papers' Table 1 and Figure 2 (--paper); a hybrid planner (--plan). See docs/memory.md.
"""

from __future__ import annotations

import argparse
import json
import re

from jambalab.commands.common import add_model_source, config_from_args
from jambalab.errors import InputError
from jambalab.memory import (DEFAULT_CHUNK, DTYPES, UNBOUNDED, GiB, check_positive, max_batch, max_context,
                             memory_report, parse_count, parse_size)


def register(sub) -> None:
    p = sub.add_parser("memory", help="weights, KV cache, Mamba state, activations; budgets; paper tables; planner",
                       description=__doc__)
    add_model_source(p, required=False)
    p.add_argument("--context", default="262144", help="context length in tokens; 256K = 262144 (default)")
    p.add_argument("--batch", default="1", help="sequences decoded together (default 1)")
    p.add_argument("--dtype", default="bf16", help=f"weights: {', '.join(DTYPES)} (default bf16)")
    p.add_argument("--prefill-chunk", default=str(DEFAULT_CHUNK),
                   help=f"tokens per prefill call (default {DEFAULT_CHUNK}); 0 = the whole prompt at once")
    p.add_argument("--budget", help="memory budget, e.g. 80GB (10^9) or 80GiB (2^30): what fits in it")
    p.add_argument("--paper", action="store_true", help="reproduce Table 1 (Jamba, Jamba-1.5) and Figure 2 (Jamba)")
    p.add_argument("--plan", action="store_true", help="suggest hybrid configs for --budget, --context, --active")
    p.add_argument("--active", default="12B", help="target active parameters for --plan (default 12B)")
    p.add_argument("--headroom", type=float, default=0.25,
                   help="fraction of --budget --plan keeps free at --context (default 0.25)")
    p.add_argument("--top", type=int, default=20, help="rows --plan prints (default 20)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def parse_tokens(text: str, what: str) -> int:
    """'262144', '256K' (x1024), '1M' (x2**20): token counts use binary suffixes, as the papers' "256K"."""
    m = re.fullmatch(r"\s*(-?[0-9]+)\s*([kKmM]?)\s*", text)
    if not m:
        raise InputError(f"cannot parse {what} {text!r}: use an integer, optionally with K (1024) or M (2**20)")
    n = int(m.group(1)) * {"": 1, "k": 2**10, "m": 2**20}[m.group(2).lower()]
    return check_positive(what, n)


def run(args: argparse.Namespace) -> int:
    if args.paper:
        return _run_paper(args)
    if args.plan:
        return _run_plan(args)
    cfg = config_from_args(args)
    context, batch = parse_tokens(args.context, "context"), parse_tokens(args.batch, "batch")
    chunk = _chunk(args.prefill_chunk)
    rep = memory_report(cfg, context, batch, args.dtype, chunk)
    out = rep.to_dict()
    if args.budget:
        budget = parse_size(args.budget)
        out.update(budget_bytes=budget, fits=rep.total_bytes <= budget,
                   max_context=max_context(cfg, budget, batch, args.dtype, chunk),
                   max_batch=max_batch(cfg, budget, context, args.dtype, chunk))
    if args.json:
        print(json.dumps(out))
    else:
        _print_report(out)
    return 0


def _chunk(text: str) -> int | None:
    n = int(text) if re.fullmatch(r"\s*-?[0-9]+\s*", text) else None
    if n is None or n < 0:
        raise InputError(f"--prefill-chunk must be a non-negative integer, got {text!r}")
    return None if n == 0 else n


def _gib(n: int) -> str:
    return f"{n / GiB:10.3f} GiB"


def _print_report(d: dict) -> None:
    print(f"{d['name']}: context {d['context']:,} tokens, batch {d['batch']}, {d['dtype']} weights, "
          f"prefill chunk {d['prefill_chunk']:,}")
    print(f"  parameters      {d['params_total'] / 1e9:10.3f} B total, {d['params_active'] / 1e9:.3f} B active")
    print(f"  weights         {_gib(d['weight_bytes'])}")
    print(f"  KV cache        {_gib(d['kv_cache_bytes'])}   ({d['kv_bytes_per_token'] / 1024:g} KiB/token/sequence)")
    print(f"  Mamba state     {_gib(d['ssm_state_bytes'])}")
    print(f"  activations     {_gib(d['activation_bytes'])}   (peak of one prefill chunk, estimate)")
    print(f"  total           {_gib(d['total_bytes'])}")
    if "budget_bytes" in d:
        mc = "unbounded (no attention layers)" if d["max_context"] == UNBOUNDED else f"{d['max_context']:,} tokens"
        print(f"  budget {d['budget_bytes'] / GiB:.2f} GiB: {'fits' if d['fits'] else 'does NOT fit'}; "
              f"longest context at batch {d['batch']}: {mc}; largest batch at {d['context']:,}: {d['max_batch']}")


# ---------------------------------------------------------------------------------------
# --paper
# ---------------------------------------------------------------------------------------
def _run_paper(args: argparse.Namespace) -> int:
    from jambalab.memory_paper import FIGURE2_BUDGET, FIGURE2_PAPER_JAMBA_TOKENS, FIGURE2_SETTINGS, figure2, table1

    t1 = table1()
    f2 = {s.name: {"description": s.description, "rows": figure2(s)} for s in FIGURE2_SETTINGS}
    if args.json:
        print(json.dumps({"table1": t1, "figure2": f2}))
        return 0
    print("Table 1: KV cache at 256K tokens, 16-bit (the papers' GB are GiB)")
    print(f"  {'paper':9s} {'model':16s} {'preset':16s} {'params paper':>13s} {'ours':>14s} "
          f"{'KV paper':>9s} {'ours GiB':>9s}")
    for r in t1:
        ours_p = f"{r['params_total'] / 1e9:.1f}/{r['params_active'] / 1e9:.1f}B"
        paper_p = f"{r['paper_params_total_b']:g}/{r['paper_params_active_b']:g}B"
        flag = "" if r["agrees"] else "  DIFFERS: " + r["note"]
        print(f"  {r['paper']:9s} {r['model']:16s} {r['preset']:16s} {paper_p:>13s} {ours_p:>14s} "
              f"{r['paper_kv_gb']:>9g} {r['kv_cache_gib']:>9.2f}{flag}")
    print(f"\nFigure 2: longest context at batch 1 on one {FIGURE2_BUDGET / GiB:.0f} GiB GPU "
          f"(paper: Jamba 2x Mixtral, 7x Llama-2-70B; Jamba ~{FIGURE2_PAPER_JAMBA_TOKENS // 1000}K)")
    for name, block in f2.items():
        print(f"  setting {name}: {block['description']}")
        for r in block["rows"]:
            ratio = "" if r["preset"] == "jamba-v0.1" else (f"Jamba/this {r['jamba_ratio']:5.2f}x  "
                                                            f"(paper {r['paper_ratio']:g}x)")
            print(f"    {r['preset']:14s} int8 weights {r['weight_bytes'] / GiB:6.1f} GiB  "
                  f"max context {r['max_context']:>10,}  {ratio}")
    return 0


# ---------------------------------------------------------------------------------------
# --plan
# ---------------------------------------------------------------------------------------
def _run_plan(args: argparse.Namespace) -> int:
    from jambalab.planner import plan

    if not args.budget:
        raise InputError("--plan needs --budget (e.g. --budget 80GiB)")
    budget, active = parse_size(args.budget), parse_count(args.active)
    context, batch = parse_tokens(args.context, "context"), parse_tokens(args.batch, "batch")
    dtype = args.dtype
    cands = plan(budget, context, active, batch, dtype, prefill_chunk=_chunk(args.prefill_chunk),
                 headroom=args.headroom)
    rows = [dict(c.knobs(), paper_choice=c.is_paper_choice(), **c.report.to_dict()) for c in cands]
    if args.json:
        print(json.dumps({"budget_bytes": budget, "headroom": args.headroom, "context": context, "batch": batch,
                          "active_target": active, "dtype": dtype, "candidates": rows}))
        return 0
    print(f"{len(rows)} hybrid configs with {active / 1e9:g}B active +-15% fit {budget / GiB:.1f} GiB with "
          f"{args.headroom:.0%} to spare at context {context:,}, batch {batch}, {dtype} "
          f"(most total parameters first; * = the paper's choice)")
    print(f"  {'a:m':>5s} {'e':>2s} {'n':>3s} {'K':>2s} {'blocks':>6s} {'layers':>6s} {'d':>5s} "
          f"{'total':>7s} {'active':>7s} {'weights':>8s} {'KV':>7s} {'state':>6s} {'act':>6s} {'sum GiB':>8s}")
    paper_rank = next((i for i, r in enumerate(rows) if r["paper_choice"]), None)
    for i, r in enumerate(rows):
        if i < args.top or i == paper_rank:
            _print_plan_row(r, i)
    if paper_rank is None:
        print("  the paper's choice (4 blocks, 1:7, e=2, n=16, K=2, d 4096) is not among them")
    else:
        print(f"  the paper's choice (4 blocks, 1:7, e=2, n=16, K=2, d 4096) is #{paper_rank + 1} of {len(rows)}")
    return 0


def _print_plan_row(r: dict, i: int) -> None:
    g = GiB
    mark = "*" if r["paper_choice"] else " "
    print(f"{mark}{i + 1:>3d} {r['a']}:{r['m']:<3d} {r['e']:>2d} {r['n']:>3d} {r['K']:>2d} {r['blocks']:>6d} "
          f"{r['n_layers']:>6d} {r['d_model']:>5d} {r['params_total'] / 1e9:>6.1f}B {r['params_active'] / 1e9:>6.2f}B "
          f"{r['weight_bytes'] / g:>8.1f} {r['kv_cache_bytes'] / g:>7.2f} {r['ssm_state_bytes'] / g:>6.2f} "
          f"{r['activation_bytes'] / g:>6.2f} {r['total_bytes'] / g:>8.1f}")
