"""The Jamba paper's ablations (arXiv 2403.19887, Sec. 6) at CPU scale: one knob per run.

    configs = grid_configs()                        # name -> JambaConfig: hybrid-1:7 with one knob changed
    setup = make_setup("mqar")                      # training batches + held-out scoring points
    result = run_one("mamba", configs["mamba"], setup, budget_s=300, hp=TrainHParams(), run_dir=Path("r"))
    results = run_grid(["attention", "mamba", "hybrid-1:7"], "mqar", budget_s=300, out=Path("runs"))
    print(format_table(results))

Every run gets the same data, the same token budget and the same time budget (whichever ends
first), and a cosine schedule that decays over that budget, so no run is judged half-trained.
The time budget counts this process's CPU seconds by default: on a shared machine other users'
load changes what a wall-clock second buys, CPU seconds give every run the same compute.
docs/ablations.md explains the task sizes.

Legend: L sequence length, K key-value pairs (MQAR), d d_model, N d_state, D d_inner.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from jambalab.config import JambaConfig
from jambalab.errors import InputError
from jambalab.model import JambaLM
from jambalab.train.tasks import IGNORE, MQAR, TRAIN, VAL, Passkey, Task

GRID = ("attention", "mamba", "hybrid-1:3", "hybrid-1:7", "hybrid-1:7-moe", "hybrid-1:7-rope")
TASKS = ("mqar", "passkey", "lm")
CLOCKS = ("cpu", "wall")
RESULT_FILE = "result.json"

# ---------------------------------------------------------------------------------------
# The grid: hybrid-1:7 (the paper's a:m) and one knob changed per run
# ---------------------------------------------------------------------------------------
# Width 64, N = 16: a Mamba layer's state is D x N = 128 x 16 numbers, the small-state regime in
# which Zoology (arXiv 2312.04927, Fig. 2) finds SSMs failing MQAR while attention solves it.
# 8 layers is the smallest stack with one attention layer in eight.
BASE = dict(vocab_size=256, d_model=64, n_layers=8, attn_layer_period=8, attn_layer_offset=4,
            expert_layer_period=0, expert_layer_offset=0, n_experts=1, top_k=1, n_heads=4, n_kv_heads=4,
            rope=False, d_ff=128, d_state=16, d_conv=4, expand=2, mamba_inner_norm="learnable",
            norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2)

KNOBS: dict[str, dict] = {
    # Pure attention: every layer attention. It keeps RoPE: a Transformer needs positions, and with
    # no positional encoding at all it has no cheap way to build the previous-token head MQAR needs.
    "attention": dict(attn_layer_period=1, attn_layer_offset=0, rope=True),
    "mamba": dict(attn_layer_period=0, attn_layer_offset=0),
    "hybrid-1:3": dict(attn_layer_period=4, attn_layer_offset=2),
    "hybrid-1:7": dict(),
    # MoE on every other layer (the paper's e = 2), 4 experts, top-1, each as wide as the dense MLP:
    # the same active parameters per token as hybrid-1:7 (plus a 64 x 4 router per MoE layer).
    "hybrid-1:7-moe": dict(expert_layer_period=2, expert_layer_offset=1, n_experts=4, top_k=1),
    "hybrid-1:7-rope": dict(rope=True),
}


def grid_configs(base: dict | None = None) -> dict[str, JambaConfig]:
    """name -> config, in GRID order."""
    base = dict(BASE if base is None else base)
    return {name: JambaConfig(**{**base, **KNOBS[name], "name": name}) for name in GRID}


def parse_only(only: str | None) -> list[str]:
    if not only:
        return list(GRID)
    names = [n.strip() for n in only.split(",") if n.strip()]
    bad = [n for n in names if n not in GRID]
    if bad or not names:
        raise InputError(f"--only: unknown run name(s) {bad or only!r}; the grid is {', '.join(GRID)}")
    return [n for n in GRID if n in names]


# ---------------------------------------------------------------------------------------
# Tasks: training batches and held-out scoring points
# ---------------------------------------------------------------------------------------
# MQAR (Zoology): context length L -> K key-value pairs, K = L / 4 (the pairs fill half of the
# context, every key is asked once in the other half). Training cycles through the lengths, one
# length per step; each length is scored on held-out samples. docs/ablations.md says why.
MQAR_POINTS = {32: 4, 64: 8, 128: 16}
MQAR_VOCAB = 35  # ids 3..34: 16 keys, 16 values
PASSKEY_LENGTHS = (128, 256, 512)
TOKENS_PER_STEP = 2048
LM_SEQ_LEN = 256


@dataclass
class Setup:
    """One task: step -> training batch, and the held-out evaluation."""

    task: str
    lengths: list[int]  # training lengths, cycled one per step
    tokens_per_step: int
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # step -> (input_ids, labels), (B, L)
    evaluate: Callable[[JambaLM, int], dict]  # (model, eval samples per length) -> scores
    params: dict = field(default_factory=dict)  # task sizes, recorded with each result


def make_setup(task: str, seed: int = 0, data: str | None = None, tokens_per_step: int = TOKENS_PER_STEP,
               cache_dir: Path | None = None) -> Setup:
    if task == "mqar":
        points = {n: MQAR(n_pairs=k, vocab_size=MQAR_VOCAB) for n, k in MQAR_POINTS.items()}
        params = {"pairs_by_length": {str(n): k for n, k in MQAR_POINTS.items()}, "key_value_ids": MQAR_VOCAB - 3}
        return _recall_setup("mqar", points, seed, tokens_per_step, params)
    if task == "passkey":
        points = {n: Passkey(n_digits=5) for n in PASSKEY_LENGTHS}
        return _recall_setup("passkey", points, seed, tokens_per_step, {"lengths": list(PASSKEY_LENGTHS), "n_digits": 5})
    if task == "lm":
        return _lm_setup(seed, tokens_per_step, data, cache_dir)
    raise InputError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")


def _recall_setup(name: str, points: dict[int, Task], seed: int, tokens_per_step: int, params: dict) -> Setup:
    lengths = sorted(points)
    for n, t in points.items():
        t.check(n, BASE["vocab_size"])
    params = {**params, "tokens_per_step": tokens_per_step}

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = lengths[step % len(lengths)]
        rows = max(1, tokens_per_step // seq_len)
        start = (step // len(lengths)) * rows  # this length's samples so far: batches never repeat
        return points[seq_len].batch_at(range(start, start + rows), seq_len, seed, TRAIN)

    def evaluate(model: JambaLM, n_samples: int) -> dict:
        acc, loss = {}, {}
        for n in lengths:
            acc[str(n)], loss[n] = recall_scores(model, points[n], n, n_samples, seed)
        return {"recall_by_length": acc, "recall_accuracy": sum(acc.values()) / len(acc),
                "val_loss": sum(loss.values()) / len(loss)}

    return Setup(name, lengths, tokens_per_step, batch, evaluate, params)


@torch.no_grad()
def recall_scores(model: JambaLM, task: Task, seq_len: int, n_samples: int, seed: int,
                  batch_size: int = 32) -> tuple[float, float]:
    """(answer accuracy, answer cross-entropy) on n_samples held-out samples of one length."""
    was = model.training
    model.eval()
    hits, nll, total = 0.0, 0.0, 0
    for start in range(0, n_samples, batch_size):
        ids, labels = task.batch_at(range(start, min(start + batch_size, n_samples)), seq_len, seed, VAL)
        out = model(ids, labels=labels)
        target = labels[:, 1:]
        mask = target != IGNORE  # (B, L-1)
        n = int(mask.sum())
        hits += float((out.logits[:, :-1].argmax(-1) == target)[mask].sum())
        nll += float(out.ce_loss) * n
        total += n
    model.train(was)
    return hits / total, nll / total


def _lm_setup(seed: int, tokens_per_step: int, data: str | None, cache_dir: Path | None) -> Setup:
    from jambalab.tokenizer import ByteTokenizer
    from jambalab.train.data import STDLIB, TextData, TokenStream, prepare_corpus

    source = data or STDLIB
    corpus = (cache_dir or _cache_root()) / f"corpus-{_slug(str(Path(source).resolve()) if data else source)}-seed{seed}"
    prepare_corpus(source, corpus, ByteTokenizer(eos_token_id=BASE["eos_token_id"]), seed, log=lambda s: None)
    text = TextData(TokenStream.open(corpus), LM_SEQ_LEN, seed)
    rows = max(1, tokens_per_step // LM_SEQ_LEN)

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return text.train_batch(range(step * rows, (step + 1) * rows))

    @torch.no_grad()
    def evaluate(model: JambaLM, n_samples: int) -> dict:
        """Loss per byte (the tokens are bytes) on held-out windows: files the training never saw."""
        was = model.training
        model.eval()
        nll, n = 0.0, 0
        for ids, labels in text.val_batches(max(1, n_samples // 16), 16):
            out = model(ids, labels=labels)
            k = ids.numel() - ids.shape[0]
            nll += float(out.ce_loss) * k
            n += k
        model.train(was)
        return {"val_loss": nll / n, "bits_per_byte": nll / n / math.log(2)}

    params = {"data": str(source), "seq_len": LM_SEQ_LEN, "tokenizer": "bytes", "tokens_per_step": rows * LM_SEQ_LEN}
    return Setup("lm", [LM_SEQ_LEN], rows * LM_SEQ_LEN, batch, evaluate, params)


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jambalab" / "ablate"


def _slug(s: str) -> str:
    import hashlib

    return hashlib.sha256(s.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------
# Training under a token and time budget
# ---------------------------------------------------------------------------------------
@dataclass
class TrainHParams:
    lr: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_tokens: int = 8_000_000


def lr_at(hp: TrainHParams, step: int, progress: float) -> float:
    """Linear warmup, then cosine to min_lr_ratio * lr as progress (0..1 of the budget) runs out."""
    warm = min(1.0, (step + 1) / hp.warmup_steps)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return hp.lr * warm * (hp.min_lr_ratio + (1 - hp.min_lr_ratio) * cos)


def _optimizer(model: JambaLM, hp: TrainHParams) -> torch.optim.AdamW:
    # No weight decay on norms, biases, Mamba's A_log and D (as the Mamba reference code).
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.endswith("A_log")]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.endswith("A_log"))]
    groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=hp.lr, betas=(0.9, 0.95))


def train_budgeted(model: JambaLM, batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]], budget_s: float,
                   hp: TrainHParams, clock: str = "cpu", log: Callable[[dict], None] | None = None,
                   log_every: int = 20) -> dict:
    """Train until budget_s seconds (CPU seconds of this process, or wall-clock) or hp.max_tokens tokens.

    The schedule's progress is whichever budget is further along, so the learning rate reaches its
    floor exactly when the run ends."""
    if clock not in CLOCKS:
        raise InputError(f"--clock must be one of {CLOCKS}, got {clock!r}")
    now = time.process_time if clock == "cpu" else time.perf_counter
    opt = _optimizer(model, hp)
    model.train()
    step, tokens, used, window = 0, 0, 0.0, []
    t0, wall0 = now(), time.perf_counter()
    while (progress := max(used / budget_s, tokens / hp.max_tokens)) < 1.0:
        lr = lr_at(hp, step, progress)
        for g in opt.param_groups:
            g["lr"] = lr
        ids, labels = batch(step)
        out = model(ids, labels=labels)
        if not torch.isfinite(out.loss):
            raise InputError(f"training diverged: loss {out.loss.item()} at step {step} (try a lower --lr)")
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step, tokens, used = step + 1, tokens + ids.numel(), now() - t0
        window.append(out.ce_loss.item())
        if log is not None and (step % log_every == 0 or step == 1):
            log({"step": step, "tokens": tokens, "time_s": round(used, 2), "lr": lr, "loss": sum(window) / len(window)})
            window = []
    return {"steps": step, "tokens": tokens, "train_time_s": used, "wall_time_s": time.perf_counter() - wall0,
            "tokens_per_s": tokens / used if used > 0 else 0.0}


# ---------------------------------------------------------------------------------------
# One run, the grid
# ---------------------------------------------------------------------------------------
def run_one(name: str, cfg: JambaConfig, setup: Setup, budget_s: float, hp: TrainHParams, run_dir: Path | None = None,
            seed: int = 0, eval_samples: int = 256, clock: str = "cpu", log: Callable[[str], None] = print) -> dict:
    """Train and score one grid entry; with run_dir, keep the model, metrics.jsonl and result.json there."""
    model = JambaLM.from_config(cfg, seed=seed)
    metrics: list[dict] = []

    def on_log(m: dict) -> None:
        metrics.append(m)
        log(f"  [{name}/{setup.task}] step {m['step']:5d}  {m['tokens'] / 1e6:6.2f}M tokens  "
            f"{m['time_s']:6.1f} {clock}-s  lr {m['lr']:.2e}  loss {m['loss']:.4f}")

    stats = train_budgeted(model, setup.batch, budget_s, hp, clock, on_log)
    t = time.perf_counter()
    scores = setup.evaluate(model, eval_samples)
    result = {
        "name": name, "task": setup.task, "seed": seed,
        "recall_accuracy": scores.get("recall_accuracy"), "recall_by_length": scores.get("recall_by_length"),
        "val_loss": scores["val_loss"], "bits_per_byte": scores.get("bits_per_byte"),
        "params_total": model.num_parameters(), "params_active": model.num_active_parameters(),
        "tokens_per_s": stats["tokens_per_s"], "tokens": stats["tokens"], "steps": stats["steps"],
        "train_time_s": stats["train_time_s"], "wall_time_s": stats["wall_time_s"], "clock": clock,
        "eval_time_s": time.perf_counter() - t, "budget_s": budget_s, "threads": torch.get_num_threads(),
        "layer_pattern": cfg.layer_pattern(), "hparams": asdict(hp), "task_params": setup.params,
        "config": cfg.to_dict(), "machine": machine_info(),
        "train_curve": [[m["tokens"], round(m["loss"], 5)] for m in metrics],
    }
    if run_dir is not None:
        _save_run(run_dir, model, result, metrics)
    return result


def machine_info() -> dict:
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "loadavg": list(os.getloadavg()),
            "torch": torch.__version__, "python": platform.python_version()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _save_run(run_dir: Path, model: JambaLM, result: dict, metrics: list[dict]) -> None:
    from jambalab.train.checkpoint import save_model

    if run_dir.exists():
        shutil.rmtree(run_dir)  # an older or unfinished run of this name
    run_dir.mkdir(parents=True)
    save_model(model, run_dir / "model")  # loadable by jambalab.from_pretrained / `jambalab eval --model`
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    tmp = run_dir / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, run_dir / RESULT_FILE)  # written last: its presence marks a finished run


def run_key(name: str, task: str) -> str:
    return f"{task}-{name.replace(':', '_')}"


def load_finished(run_dir: Path, settings: dict) -> dict | None:
    """The run's result if it finished with the same settings (budget, clock, hyperparameters, seed, task)."""
    try:
        r = json.loads((run_dir / RESULT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return r if all(r.get(k) == v for k, v in settings.items()) else None


def run_grid(names: list[str], task: str, budget_s: float, out: Path | None = None, seed: int = 0,
             hp: TrainHParams | None = None, data: str | None = None, tokens_per_step: int = TOKENS_PER_STEP,
             eval_samples: int = 256, clock: str = "cpu", base: dict | None = None,
             log: Callable[[str], None] = print) -> list[dict]:
    """Train and score each named run on one task. With out, each run is kept in out/<task>-<name>/,
    and a run that finished earlier with the same settings is read back instead of trained again."""
    hp = hp or TrainHParams()
    configs = grid_configs(base)
    setup = None  # built on first use: a grid whose runs all finished needs no data
    results = []
    for name in names:
        run_dir = None if out is None else out / run_key(name, task)
        if run_dir is not None and setup is None:
            setup = make_setup(task, seed, data, tokens_per_step, out / "cache")
        settings = {"budget_s": budget_s, "clock": clock, "hparams": asdict(hp), "seed": seed,
                    "config": configs[name].to_dict(), "task_params": None if setup is None else setup.params}
        done = None if run_dir is None else load_finished(run_dir, settings)
        if done is not None:
            log(f"{name}/{task}: finished earlier, kept ({run_dir / RESULT_FILE})")
            results.append(done)
            continue
        setup = setup or make_setup(task, seed, data, tokens_per_step)
        log(f"{name}/{task}: {configs[name].layer_pattern()}; budget {budget_s:g} {clock}-seconds "
            f"or {hp.max_tokens / 1e6:g}M tokens, {setup.tokens_per_step} tokens per step")
        results.append(run_one(name, configs[name], setup, budget_s, hp, run_dir, seed, eval_samples, clock, log))
    return results


# ---------------------------------------------------------------------------------------
# The table and the plots
# ---------------------------------------------------------------------------------------
def format_table(results: list[dict]) -> str:
    """The paper-style table: one row per run."""
    if not results:
        return "(no runs)"
    lengths = sorted({int(k) for r in results for k in (r.get("recall_by_length") or {})})
    head = ["run", "task", "params", "active"] + [f"acc@{n}" for n in lengths]
    head += ["recall"] if lengths else []
    head += ["val_loss"]
    head += ["bpb"] if any(r.get("bits_per_byte") is not None for r in results) else []
    head += ["tok/s", "tokens", "steps"]
    rows = []
    for r in results:
        by = r.get("recall_by_length") or {}
        row = [r["name"], r["task"], _count(r["params_total"]), _count(r["params_active"])]
        row += [f"{by[str(n)]:.3f}" if str(n) in by else "-" for n in lengths]
        row += [_num(r.get("recall_accuracy"), 3)] if lengths else []
        row += [_num(r["val_loss"], 4)]
        row += [_num(r.get("bits_per_byte"), 3)] if "bpb" in head else []
        row += [f"{r['tokens_per_s']:.0f}", _count(r["tokens"]), str(r["steps"])]
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _num(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def plot_results(results: list[dict], out: Path) -> list[Path]:
    """One PNG per task: training loss curves, recall accuracy by context length, val loss and throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for task in dict.fromkeys(r["task"] for r in results):
        rs = [r for r in results if r["task"] == task]
        recall = any(r.get("recall_by_length") for r in rs)
        fig, axes = plt.subplots(1, 3 if recall else 2, figsize=(15 if recall else 10, 4))
        _plot_curves(axes[0], rs, task)
        if recall:
            _plot_recall(axes[1], rs, task)
        _plot_summary(axes[-1], rs, task)
        fig.tight_layout()
        path = out / f"ablate-{task}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _plot_curves(ax, rs: list[dict], task: str) -> None:
    for r in rs:
        curve = r.get("train_curve") or []
        ax.plot([c[0] / 1e6 for c in curve], [c[1] for c in curve], label=r["name"])
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("training loss (nats per byte)" if task == "lm" else "training loss on the answers")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(f"{task}: training loss")


def _plot_recall(ax, rs: list[dict], task: str) -> None:
    for r in rs:
        by = r.get("recall_by_length") or {}
        xs = sorted(int(k) for k in by)
        ax.plot(xs, [by[str(x)] for x in xs], marker="o", label=r["name"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("recall accuracy (held out)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    ax.set_title(f"{task}: accuracy by context length")


def _plot_summary(ax, rs: list[dict], task: str) -> None:
    names = [r["name"] for r in rs]
    key = "bits_per_byte" if all(r.get("bits_per_byte") is not None for r in rs) else "val_loss"
    ax.bar(names, [r[key] for r in rs], color="tab:blue")
    ax.set_ylabel(key.replace("_", " "))
    ax.tick_params(axis="x", rotation=30, labelsize=7)
    twin = ax.twinx()
    twin.plot(names, [r["tokens_per_s"] for r in rs], "o", color="tab:orange")
    twin.set_ylabel("training tokens/s", color="tab:orange")
    ax.set_title(f"{task}: {key.replace('_', ' ')} (bars), throughput (dots)")
