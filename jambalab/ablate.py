"""The Jamba paper's ablations (arXiv 2403.19887, Sec. 6) at CPU scale: one knob per run.

    configs = grid_configs()                        # name -> JambaConfig: hybrid-1:7 with one knob changed
    setup = make_setup("needle")                    # training batches + held-out scoring points
    result = run_one("mamba", configs["mamba"], setup, hp=TrainHParams(max_tokens=10**6), seed=0)
    results = run_grid(["attention", "mamba", "hybrid-1:7"], "needle", seeds=[0, 1, 2], out=Path("runs"))
    print(format_table(summarize(results)))       # mean and spread over the seeds

Every run gets the same data, the same number of training tokens and the same active parameter
count, and a cosine schedule that decays over that token budget, so no run is judged
half-trained and a faster or slower machine trains the same steps. An optional time budget
(CPU seconds of this process by default) can end a run earlier. docs/ablations.md explains the
task sizes.

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
from jambalab.stats import param_counts_fast
from jambalab.train.tasks import IGNORE, MQAR, TRAIN, VAL, FirstAnswer, Needle, Passkey, Task

GRID = ("attention", "mamba", "hybrid-1:3", "hybrid-1:7", "hybrid-1:7-moe", "hybrid-1:7-rope")
TASKS = ("mqar", "needle", "passkey", "lm")
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
    """name -> config, in GRID order. Each run's d_ff is set so that its active parameters equal pure
    Mamba's (to within one d_ff step, < 0.5%): an attention layer has half a Mamba layer's weights, so
    without this the pure Transformer would be a quarter smaller and the comparison would be of sizes."""
    base = dict(BASE if base is None else base)
    configs = {name: JambaConfig(**{**base, **KNOBS[name], "name": name}) for name in GRID}
    target = param_counts_fast(configs["mamba"])[1]
    return {name: cfg.replace(d_ff=matched_d_ff(cfg, target)) for name, cfg in configs.items()}


def matched_d_ff(cfg: JambaConfig, target: int) -> int:
    """The d_ff that brings cfg's active parameter count nearest to target (the count is linear in d_ff)."""
    a1, a2 = param_counts_fast(cfg.replace(d_ff=1))[1], param_counts_fast(cfg.replace(d_ff=2))[1]
    return max(1, round(1 + (target - a1) / (a2 - a1)))


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
# context), and K / 2 of the keys asked, each once, in the other half. Asking every key would let a
# model that never looks a key up score H_K / K (0.52, 0.34, 0.21 at K = 4, 8, 16) by answering with
# a value of a pair not yet asked. Training cycles through the lengths, one length per step; each
# length is scored on held-out samples. docs/ablations.md says why.
MQAR_POINTS = {32: 4, 64: 8, 128: 16}
MQAR_VOCAB = 35  # ids 3..34: 16 keys, 16 values
PASSKEY_LENGTHS = (128, 256, 512)
# Needle: trained on 16- and 32-token contexts (cycled), scored on a depth x length grid up to 8x the
# training length, one key-value pair per 8 tokens (so the facts to hold grow with the haystack).
NEEDLE = dict(n_filler=16, n_keys=32, n_values=16, pair_every=8)
NEEDLE_TRAIN_LENGTHS = (16, 32)
NEEDLE_LENGTHS = (16, 32, 64, 128, 256)
NEEDLE_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
TOKENS_PER_STEP = {"mqar": 2048, "needle": 1024, "passkey": 2048, "lm": 2048}
NEEDLE_GRID = "attention,mamba,hybrid-1:7"  # the needle task's default runs: the paper's Fig. 4 comparison
LM_SEQ_LEN = 256
# Training tokens per run by default: what the grid's budget is, the same on every machine.
DEFAULT_TOKENS = {"mqar": 2_000_000, "needle": 4_800_000, "passkey": 2_000_000, "lm": 2_000_000}


@dataclass
class Setup:
    """One task: step -> training batch, and the held-out evaluation."""

    task: str
    lengths: list[int]  # training lengths, cycled one per step
    tokens_per_step: int
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # step -> (input_ids, labels), (B, L)
    evaluate: Callable[[JambaLM, int], dict]  # (model, eval samples per length) -> scores
    params: dict = field(default_factory=dict)  # task sizes, recorded with each result


def make_setup(task: str, seed: int = 0, data: str | None = None, tokens_per_step: int | None = None,
               cache_dir: Path | None = None) -> Setup:
    if task in TOKENS_PER_STEP:
        tokens_per_step = tokens_per_step or TOKENS_PER_STEP[task]
    if task == "mqar":
        points = {n: MQAR(n_pairs=k, n_queries=k // 2, vocab_size=MQAR_VOCAB) for n, k in MQAR_POINTS.items()}
        params = {"pairs_by_length": {str(n): k for n, k in MQAR_POINTS.items()}, "queries": "half",
                  "key_value_ids": MQAR_VOCAB - 3}
        return _recall_setup("mqar", points, seed, tokens_per_step, params)
    if task == "needle":
        return _needle_setup(seed, tokens_per_step)
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


def _needle_setup(seed: int, tokens_per_step: int) -> Setup:
    """Train on the Needle task at NEEDLE_TRAIN_LENGTHS; score the needle (the first key asked) on the
    depth x length grid, NEEDLE_LENGTHS reaching 8x the longest training length."""
    task = Needle(**NEEDLE)
    for n in NEEDLE_LENGTHS:
        task.check(n, BASE["vocab_size"])
    setup = _recall_setup("needle", {n: task for n in NEEDLE_TRAIN_LENGTHS}, seed, tokens_per_step,
                          {**NEEDLE, "train_lengths": list(NEEDLE_TRAIN_LENGTHS), "lengths": list(NEEDLE_LENGTHS),
                           "depths": list(NEEDLE_DEPTHS)})

    def evaluate(model: JambaLM, n_samples: int) -> dict:
        grid = needle_grid(model, NEEDLE_LENGTHS, NEEDLE_DEPTHS, n_samples, seed)  # (depths, lengths)
        by_len = {str(n): float(grid[:, j].mean()) for j, n in enumerate(NEEDLE_LENGTHS)}
        inside = [by_len[str(n)] for n in NEEDLE_LENGTHS if n <= max(NEEDLE_TRAIN_LENGTHS)]
        _, loss = recall_scores(model, task, max(NEEDLE_TRAIN_LENGTHS), n_samples, seed)
        return {"recall_by_length": by_len, "recall_accuracy": sum(inside) / len(inside), "val_loss": loss,
                "needle_grid": {"lengths": list(NEEDLE_LENGTHS), "depths": list(NEEDLE_DEPTHS),
                                "accuracy": grid.tolist()}}

    setup.evaluate = evaluate
    return setup


def needle_grid(model: JambaLM, lengths: tuple[int, ...], depths: tuple[float, ...], n_samples: int,
                seed: int) -> np.ndarray:
    """Accuracy of the needle's answer, (len(depths), len(lengths)), n_samples held-out samples per cell."""
    grid = np.zeros((len(depths), len(lengths)))
    for i, d in enumerate(depths):
        task = FirstAnswer(Needle(**NEEDLE, depth=d))
        for j, n in enumerate(lengths):
            grid[i, j] = recall_scores(model, task, n, n_samples, seed)[0]
    return grid


def no_lookup_accuracy(n_pairs: int, n_values: int, samples: int = 20000, seed: int = 0) -> float:
    """What a model that never looks the key up scores on the needle: it answers with the commonest
    value of the context's pairs (values drawn uniformly from n_values, repeats allowed), by simulation."""
    values = np.random.default_rng(seed).integers(0, n_values, size=(samples, n_pairs))  # (S, P); [:, 0] the needle's
    counts = (values[:, :, None] == np.arange(n_values)).sum(1)  # (S, V)
    best = counts == counts.max(1, keepdims=True)  # (S, V): the commonest value(s), ties split evenly
    return float((best[np.arange(samples), values[:, 0]] / best.sum(1)).mean())


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


def train_budgeted(model: JambaLM, batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]], budget_s: float | None,
                   hp: TrainHParams, clock: str = "cpu", log: Callable[[dict], None] | None = None,
                   log_every: int = 20) -> dict:
    """Train until hp.max_tokens tokens, or budget_s seconds (CPU seconds of this process, or wall-clock)
    if one is given and it ends first.

    The schedule's progress is whichever budget is further along, so the learning rate reaches its
    floor exactly when the run ends."""
    if clock not in CLOCKS:
        raise InputError(f"--clock must be one of {CLOCKS}, got {clock!r}")
    now = time.process_time if clock == "cpu" else time.perf_counter
    opt = _optimizer(model, hp)
    model.train()
    step, tokens, used, window = 0, 0, 0.0, []
    t0, wall0 = now(), time.perf_counter()
    while (progress := max(used / budget_s if budget_s else 0.0, tokens / hp.max_tokens)) < 1.0:
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
def run_one(name: str, cfg: JambaConfig, setup: Setup, hp: TrainHParams, budget_s: float | None = None,
            run_dir: Path | None = None, seed: int = 0, eval_samples: int = 256, clock: str = "cpu",
            log: Callable[[str], None] = print) -> dict:
    """Train and score one grid entry; with run_dir, keep the model, metrics.jsonl and result.json there."""
    model = JambaLM.from_config(cfg, seed=seed)
    metrics: list[dict] = []

    def on_log(m: dict) -> None:
        metrics.append(m)
        log(f"  [{name}/{setup.task}/seed {seed}] step {m['step']:5d}  {m['tokens'] / 1e6:6.2f}M tokens  "
            f"{m['time_s']:6.1f} {clock}-s  lr {m['lr']:.2e}  loss {m['loss']:.4f}")

    stats = train_budgeted(model, setup.batch, budget_s, hp, clock, on_log)
    t = time.perf_counter()
    scores = setup.evaluate(model, eval_samples)
    result = {
        "name": name, "task": setup.task, "seed": seed,
        "recall_accuracy": scores.get("recall_accuracy"), "recall_by_length": scores.get("recall_by_length"),
        "needle_grid": scores.get("needle_grid"),
        "val_loss": scores["val_loss"], "bits_per_byte": scores.get("bits_per_byte"),
        "params_total": model.num_parameters(), "params_active": model.num_active_parameters(),
        "tokens_per_s": stats["tokens_per_s"], "tokens": stats["tokens"], "steps": stats["steps"],
        "train_time_s": stats["train_time_s"], "wall_time_s": stats["wall_time_s"], "clock": clock,
        "eval_time_s": time.perf_counter() - t, "budget_s": budget_s, "eval_samples": eval_samples,
        "threads": torch.get_num_threads(), "layer_pattern": cfg.layer_pattern(), "hparams": asdict(hp),
        "task_params": setup.params, "config": cfg.to_dict(), "machine": machine_info(),
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


def run_key(name: str, task: str, seed: int = 0) -> str:
    return f"{task}-{name.replace(':', '_')}-seed{seed}"


def load_finished(run_dir: Path, settings: dict) -> dict | None:
    """The run's result if it finished with the same settings (budget, clock, hyperparameters, seed, task)."""
    try:
        r = json.loads((run_dir / RESULT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return r if all(r.get(k) == v for k, v in settings.items()) else None


def run_grid(names: list[str], task: str, hp: TrainHParams, seeds: list[int], out: Path | None = None,
             budget_s: float | None = None, data: str | None = None, tokens_per_step: int | None = None,
             eval_samples: int = 256, clock: str = "cpu", base: dict | None = None,
             log: Callable[[str], None] = print) -> list[dict]:
    """Train and score each named run on one task, once per seed (seed: model init and data). With out,
    each run is kept in out/<task>-<name>-seed<k>/, and a run that finished earlier with the same
    settings is read back instead of trained again."""
    configs = grid_configs(base)
    results = []
    for seed in seeds:
        setup = None  # built on first use: a grid whose runs all finished needs no data
        for name in names:
            run_dir = None if out is None else out / run_key(name, task, seed)
            if run_dir is not None and setup is None:
                setup = make_setup(task, seed, data, tokens_per_step, out / "cache")
            settings = {"budget_s": budget_s, "clock": clock, "hparams": asdict(hp), "seed": seed,
                        "eval_samples": eval_samples, "config": configs[name].to_dict(),
                        "task_params": None if setup is None else setup.params}
            done = None if run_dir is None else load_finished(run_dir, settings)
            if done is not None:
                log(f"{name}/{task}/seed {seed}: finished earlier, kept ({run_dir / RESULT_FILE})")
                results.append(done)
                continue
            setup = setup or make_setup(task, seed, data, tokens_per_step)
            time_cap = "" if budget_s is None else f" or {budget_s:g} {clock}-seconds"
            log(f"{name}/{task}/seed {seed}: {configs[name].layer_pattern()}; budget {hp.max_tokens / 1e6:g}M "
                f"tokens{time_cap}, {setup.tokens_per_step} tokens per step")
            results.append(run_one(name, configs[name], setup, hp, budget_s, run_dir, seed, eval_samples, clock, log))
    return results


# ---------------------------------------------------------------------------------------
# The table and the plots
# ---------------------------------------------------------------------------------------
def summarize(results: list[dict]) -> list[dict]:
    """One row per (task, run name): each score's mean, spread (sample standard deviation, 0 for one
    seed), min and max over the seeds, and the needle grid averaged over them."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["task"], r["name"]), []).append(r)
    rows = []
    for (task, name), rs in groups.items():
        row = {"name": name, "task": task, "seeds": [r["seed"] for r in rs], "params_total": rs[0]["params_total"],
               "params_active": rs[0]["params_active"], "tokens": rs[0]["tokens"],
               "task_params": rs[0]["task_params"],
               "steps": round(float(np.mean([r["steps"] for r in rs]))),
               "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in rs]))}
        for key in ("recall_accuracy", "val_loss", "bits_per_byte"):
            row[key] = _spread([r.get(key) for r in rs])
        lengths = rs[0].get("recall_by_length") or {}
        row["recall_by_length"] = {n: _spread([r["recall_by_length"][n] for r in rs]) for n in lengths}
        if rs[0].get("needle_grid"):
            g = rs[0]["needle_grid"]
            row["needle_grid"] = {**g, "accuracy": np.mean([r["needle_grid"]["accuracy"] for r in rs], 0).tolist()}
        rows.append(row)
    return rows


def _spread(xs: list[float | None]) -> dict | None:
    if any(x is None for x in xs):
        return None
    a = np.asarray(xs, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max()), "n": len(a)}


def format_table(results: list[dict]) -> str:
    """The paper-style table: one row per run name, each score as mean ± spread over the seeds."""
    if not results:
        return "(no runs)"
    rows_in = summarize(results)
    lengths = sorted({int(k) for r in rows_in for k in r["recall_by_length"]})
    head = ["run", "task", "seeds", "active"] + [f"acc@{n}" for n in lengths]
    head += ["recall"] if lengths else []
    head += ["val_loss"]
    head += ["bpb"] if any(r["bits_per_byte"] is not None for r in rows_in) else []
    head += ["tokens", "tok/s"]
    rows = []
    for r in rows_in:
        by = r["recall_by_length"]
        row = [r["name"], r["task"], str(len(r["seeds"])), _count(r["params_active"])]
        row += [_pm(by.get(str(n)), 2) for n in lengths]
        row += [_pm(r["recall_accuracy"], 3)] if lengths else []
        row += [_pm(r["val_loss"], 3)]
        row += [_pm(r["bits_per_byte"], 3)] if "bpb" in head else []
        row += [_count(r["tokens"]), f"{r['tokens_per_s']:.0f}"]
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _pm(s: dict | None, digits: int) -> str:
    """mean ± spread, or the mean alone for one seed."""
    if s is None:
        return "-"
    return f"{s['mean']:.{digits}f}" + (f"±{s['std']:.{digits}f}" if s["n"] > 1 else "")


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"
