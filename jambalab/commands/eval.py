"""`jambalab eval`: perplexity / bits per byte, passkey / needle heatmaps, attention maps (jambalab.evaluate)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jambalab.commands.common import add_precision_args, apply_precision, run_with_threads
from jambalab.errors import InputError


def register(sub) -> None:
    from jambalab.evaluate import DEFAULT_DEPTHS, DEFAULT_LENGTHS

    p = sub.add_parser("eval", help="perplexity / bits per byte, needle-in-a-haystack heatmap, attention maps",
                       description="Evaluates a checkpoint directory, a `jambalab train` / `jambalab ablate` run "
                                   "directory, or a preset (random init). Without --needle or --attention-map it "
                                   "measures perplexity and bits per byte.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="a checkpoint directory, a `jambalab train --out` run or a `jambalab ablate` run")
    g.add_argument("--preset", help="a named preset, randomly initialised (a baseline / smoke test)")
    p.add_argument("--data", help="perplexity text: a UTF-8 file, or a directory / JSONL corpus (held-out split); "
                                  "default: the embedded stdlib corpus' held-out split")
    p.add_argument("--seq-len", type=int, default=512, help="perplexity window (default: 512)")
    p.add_argument("--stride", type=int, default=None, help="new tokens scored per window (default: --seq-len)")
    p.add_argument("--max-tokens", type=int, default=65536, help="score at most this many tokens (default: 65536)")
    p.add_argument("--ppl", action="store_true", help="also measure perplexity when --needle / --attention-map is given")
    p.add_argument("--needle", action="store_true", help="passkey retrieval over context lengths x depths -> heatmap PNG")
    p.add_argument("--haystack", default="passkey",
                   help="'passkey' (the passkey task's filler), 'corpus' (stdlib source text) or a text file")
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="context lengths, comma-separated")
    p.add_argument("--depths", default=",".join(map(str, DEFAULT_DEPTHS)), help="needle depths in [0, 1], comma-separated")
    p.add_argument("--trials", type=int, default=8, help="prompts per (length, depth) cell (default: 8)")
    p.add_argument("--attention-map", action="store_true", help="draw the attention layers' weights on a prompt (PNG)")
    p.add_argument("--prompt", help="text for --attention-map (default: 32 random tokens, repeated: shows induction heads)")
    p.add_argument("--out", default=".", help="where the PNGs go (default: the current directory)")
    p.add_argument("--seed", type=int, default=0, help="seed for prompts, data split and preset init (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    add_precision_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_with_threads(args.threads, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from jambalab import evaluate as ev

    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))
    model, tok, source = ev.load_for_eval(args.model, args.preset, seed=args.seed)
    model = apply_precision(model, args)
    out_dir = Path(args.out)
    result: dict = {"model": source, "params_total": model.num_parameters(),
                    "params_active": model.num_active_parameters(), "layer_pattern": model.config.layer_pattern(),
                    "dtype": str(model.embed.weight.dtype).removeprefix("torch."),
                    "quantization": getattr(model, "quantization", None)}
    log(f"model: {source}  ({model.config.layer_pattern()})")
    if args.ppl or not (args.needle or args.attention_map):
        result["perplexity"] = _perplexity(args, model, tok, log)
    if args.needle:
        result["needle"] = _needle(args, model, tok, out_dir, ev.run_name(args.model, args.preset), log)
    if args.attention_map:
        result["attention_map"] = _attention(args, model, tok, out_dir, ev.run_name(args.model, args.preset), log)
    if args.json:
        print(json.dumps(result))
    return 0


def _perplexity(args, model, tok, log) -> dict:
    from jambalab import evaluate as ev

    for name in ("seq_len", "max_tokens"):
        if getattr(args, name) < 2:
            raise InputError(f"--{name.replace('_', '-')} must be at least 2, got {getattr(args, name)}")
    if args.stride is not None and not 1 <= args.stride <= args.seq_len:
        raise InputError(f"--stride must lie in [1, --seq-len={args.seq_len}], got {args.stride}")
    ids, n_bytes, what = ev.corpus_eval_text(tok, args.data, seed=args.seed, max_tokens=args.max_tokens)
    r = ev.perplexity(model, ids, n_bytes, seq_len=args.seq_len, stride=args.stride)
    r["text"] = what
    log(f"perplexity on {what}: loss {r['val_loss']:.4f} nats/token, ppl {r['ppl']:.3f}, "
        f"{r['bits_per_byte']:.4f} bits/byte ({r['tokens']} tokens scored, window {args.seq_len})")
    return r


def _floats(s: str, name: str) -> list[float]:
    try:
        vals = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--{name} must be comma-separated numbers, got {s!r}") from None
    if not vals:
        raise InputError(f"--{name} is empty")
    return vals


def _needle(args, model, tok, out_dir: Path, name: str, log) -> dict:
    from jambalab import evaluate as ev

    lengths = [int(x) for x in _floats(args.lengths, "lengths")]
    depths = _floats(args.depths, "depths")
    if any(not 0 <= d <= 1 for d in depths):
        raise InputError(f"--depths must lie in [0, 1], got {depths}")
    if args.trials < 1:
        raise InputError(f"--trials must be positive, got {args.trials}")
    haystack = None
    if args.haystack == "corpus":
        from jambalab.train.data import find_documents

        docs = find_documents("stdlib")
        haystack = "".join(d.path.read_text(encoding="utf-8", errors="replace") for d in docs[:40])
    elif args.haystack != "passkey":
        path = Path(args.haystack)
        if not path.is_file():
            raise InputError(f"--haystack must be 'passkey', 'corpus' or a text file; {path} is not a file")
        haystack = path.read_text(encoding="utf-8", errors="replace")
    grid = ev.needle_grid(model, tok, lengths, depths, args.trials, args.seed, haystack, log)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "needle-heatmap.png"
    ev.plot_heatmap(grid, lengths, depths, png, f"passkey retrieval ({Path(args.haystack).name} haystack)\n{name}")
    log(f"mean accuracy {grid.mean():.3f}; wrote {png}")
    return {"lengths": lengths, "depths": depths, "accuracy": grid.tolist(), "mean_accuracy": float(grid.mean()),
            "haystack": args.haystack, "trials": args.trials, "png": str(png)}


def _attention(args, model, tok, out_dir: Path, name: str, log) -> dict:
    from jambalab import evaluate as ev

    if model.config.n_attention_layers == 0:
        raise InputError(f"{name} has no attention layers (pattern {model.config.layer_pattern()}): no attention map")
    if args.prompt:
        ids = ev.text_ids(tok, args.prompt)[None]
        if ids.shape[1] < 2:
            raise InputError("--prompt must hold at least 2 tokens")
        n = None
    else:
        n = 32
        # printable ASCII for byte-level models (readable axis labels), else any non-special id
        low, high = (33, 127) if model.config.vocab_size >= 127 else (3, model.config.vocab_size)
        ids = ev.induction_ids(low, high, n, args.seed)
    maps = ev.attention_maps(model, ids)
    scores = ev.induction_scores(maps, n) if n else None
    labels = [tok.decode([int(t)]) for t in ids[0]]
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "attention-map.png"
    ev.plot_attention(maps, png, labels, f"attention weights, {name}", scores)
    log(f"wrote {png} ({len(maps)} attention layer(s), {ids.shape[1]} tokens)")
    if scores:
        for layer, s in scores.items():
            log(f"  layer {layer}: induction score per head " + " ".join(f"{x:.2f}" for x in s))
    return {"png": str(png), "layers": sorted(maps), "tokens": ids.shape[1],
            "induction_scores": {str(k): v for k, v in (scores or {}).items()}}
