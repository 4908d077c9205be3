"""`jambalab train`: train on text or a synthetic task; with no arguments, the main job.

The main job trains the main preset on the Python standard library's source (bytes) for a few
minutes, then prints the validation loss beside the corpus' byte unigram entropy, a generated
sample, and the model's cache memory beside a pure Transformer of the same shape.

Multi-process: `torchrun --nproc_per_node N -m jambalab train ...` (DDP; --parallel fsdp for FSDP2).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from jambalab.config import JambaConfig
from jambalab.errors import ConfigError

MAIN_PRESET = "cpu-hybrid"
MAIN_TIME_BUDGET = 390.0  # seconds of training when neither --max-steps nor --time-budget is given
SAMPLE_PROMPT = "def "


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model (no arguments: the main job on the stdlib corpus)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help=f"a named preset (default {MAIN_PRESET})")
    src.add_argument("--config", help="a jambalab config JSON file")
    src.add_argument("--model", help="fine-tune a HF-format checkpoint directory (its tokenizer.json if it has one)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data", help="a text file, a directory of them, or a JSONL file (default: the stdlib corpus)")
    data.add_argument("--task", choices=["mqar", "passkey", "copy", "needle"], help="a synthetic recall task instead of text")
    p.add_argument("--task-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a task parameter, e.g. n_pairs=16 (repeatable)")
    p.add_argument("--text-field", default="text", help="the text field of JSONL records (default text)")
    p.add_argument("--out", help="output directory (default runs/<preset>-<data>)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: as many as --time-budget allows)")
    p.add_argument("--time-budget", type=float, help=f"seconds of training (default {MAIN_TIME_BUDGET:.0f} "
                                                      "when --max-steps is not given)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per process and micro-step")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--lr", type=float, default=5e-3,
                   help="peak learning rate (default 5e-3, tuned for the main job; larger models want less)")
    p.add_argument("--schedule", choices=["cosine", "wsd"], default="cosine")
    p.add_argument("--warmup", type=int, default=30, help="warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--activation-loss", type=float, default=0.0, metavar="ALPHA",
                   help="Jamba-1.5's activation loss coefficient (they use 1e-5)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model config field, e.g. attn_layer_period=4 (repeatable)")
    p.add_argument("--parallel", choices=["auto", "ddp", "fsdp"], default="auto", help="under torchrun")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    p.set_defaults(func=run)


def parse_value(text: str) -> Any:
    """'4' -> 4, '1e-3' -> 0.001, 'true' -> True, 'none' -> None, anything else stays a string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_assignments(items: list[str], flag: str) -> dict[str, Any]:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE")
        out[key.strip()] = parse_value(value)
    return out


def model_config(args: argparse.Namespace) -> JambaConfig | None:
    """--preset / --config (+ --set); None when resuming without them (the checkpoint's config is used)."""
    overrides = parse_assignments(args.set, "--set")
    if args.config:
        cfg = JambaConfig.from_file(args.config)
    elif args.preset or not (args.resume or args.model):
        cfg = JambaConfig.from_preset(args.preset or MAIN_PRESET)
    elif overrides:
        raise ConfigError("--set needs --preset or --config to apply to (a checkpoint's config is fixed)")
    else:
        return None
    return cfg.replace(**overrides) if overrides else cfg


def default_out(args: argparse.Namespace) -> Path:
    model = args.preset or (Path(args.config).stem if args.config else Path(args.model).name if args.model else MAIN_PRESET)
    data = args.task or (Path(args.data).stem if args.data else "stdlib")
    return Path("runs") / f"{model}-{data}"


def run(args: argparse.Namespace) -> int:
    from jambalab.train import DataSpec, TrainArgs, Trainer
    from jambalab.train.data import STDLIB
    from jambalab.train.parallel import shutdown

    started = time.perf_counter()
    budget = args.time_budget if args.time_budget is not None or args.max_steps else MAIN_TIME_BUDGET
    targs = TrainArgs(max_steps=args.max_steps or 1_000_000, seq_len=args.seq_len, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, lr=args.lr, schedule=args.schedule, warmup_steps=args.warmup,
                      weight_decay=args.weight_decay, grad_clip=args.grad_clip, activation_loss=args.activation_loss,
                      bf16=args.bf16, val_every=args.val_every, val_batches=args.val_batches,
                      ckpt_every=args.ckpt_every, seed=args.seed, time_budget=budget, parallel=args.parallel)
    spec = DataSpec(source=None if args.task else (args.data or STDLIB), task=args.task,
                    task_options=parse_assignments(args.task_opt, "--task-opt"), text_field=args.text_field)
    out = Path(args.out) if args.out else default_out(args)
    trainer = Trainer(model_config(args), targs, spec, out, resume=args.resume, init_from=args.model,
                      device=args.device)
    trainer.log(_describe(trainer, out))
    result = trainer.run()
    if trainer.dist.is_main:
        _report(trainer, result, out, time.perf_counter() - started)
    # Only after a success, as torchtitan does: every rank waits here for rank 0's report, then the
    # group is torn down together. After an error a rank may be inside a collective that will never
    # complete, and tearing down beside it can deadlock; torchrun stops the other workers instead.
    shutdown(trainer.dist)
    return 0


def _describe(trainer, out: Path) -> str:
    cfg, a, d = trainer.config, trainer.args, trainer.dist
    m = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    n = sum(p.numel() for p in m.parameters()) if not trainer.fsdp else 0
    size = f"{n / 1e6:.1f}M parameters, " if n else ""
    until = f"{a.max_steps} steps" if a.time_budget is None else f"{a.time_budget:.0f} s of training" + (
        f" or {a.max_steps} steps" if a.max_steps < 1_000_000 else "")
    return (f"model: {cfg.name} ({cfg.layer_pattern()}), {size}vocab {cfg.vocab_size}\n"
            f"train: {d.world_size} process(es) on {d.device}, global batch {a.batch_size * a.grad_accum * d.world_size}"
            f" x {a.seq_len} tokens, lr {a.lr:g} ({a.schedule}), until {until}; output in {out}")


def _report(trainer, result, out: Path, wall: float) -> None:
    from jambalab.train.report import bits, memory_table, sample_text
    from jambalab.train.tasks import TaskData

    print(f"\ntrained {result.step} steps, {result.tokens:,} tokens in {result.elapsed / 60:.1f} min of training "
          f"({result.tokens_per_s:,.0f} tokens/s; stopped: {result.stop_reason.replace('_', ' ')})")
    if isinstance(result.data, TaskData):
        print(f"validation: loss {result.val_loss:.4f}, answer accuracy {result.val_accuracy:.3f} "
              f"({result.data.task.name}, {trainer.args.seq_len} tokens)")
    else:
        h = trainer.unigram_entropy
        print(f"validation loss {result.val_loss:.3f} nats/token ({bits(result.val_loss):.2f} bits) vs the "
              f"training text's unigram entropy {h:.3f} nats ({bits(h):.2f} bits)")
        print(f"\nsample (prompt {SAMPLE_PROMPT!r}, temperature 0.8, top-k 40):\n" + "-" * 60)
        text = sample_text(result.model, result.tokenizer, SAMPLE_PROMPT, seed=trainer.args.seed)
        print("\n".join(line.rstrip() for line in text.splitlines()))  # deep indents end in runs of spaces
        print("-" * 60)
    print()
    print("\n".join(memory_table(trainer.config)))
    print(f"\ncheckpoint: {result.checkpoint}\nmetrics: {out / 'metrics.jsonl'}, plot: {out / 'loss.png'}")
    print(f"total wall time {wall / 60:.1f} min")
