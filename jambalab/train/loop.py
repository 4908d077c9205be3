"""The training loop: MoE-aware loss, AdamW, schedules, accumulation, validation, checkpoints, resume.

Legend: B micro-batch per process, A accumulation steps, W processes, L seq_len.
One optimizer step consumes a global batch of B * A * W samples; process r's micro-step a reads
samples [s + (r * A + a) * B, s + (r * A + a + 1) * B) of the data stream, s the samples before
the step. So 1 process with A = W accumulation steps and W processes with A = 1 see the same
batches and take the same steps, and the data position a checkpoint stores is one integer.

Loss = the model's loss (cross-entropy + router_aux_loss_coef * router aux loss, Jamba Sec. 2)
     + activation_loss * mean square of each block's output (Jamba-1.5, arXiv 2408.12570:
       keeps activations in a range that fp16/bf16 inference can represent).
"""

from __future__ import annotations

import json
import math
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from jambalab.config import JambaConfig
from jambalab.errors import CheckpointError, ConfigError, JambalabError
from jambalab.model import JambaLM
from jambalab.train import checkpoint as ckpt_io
from jambalab.train import parallel as par
from jambalab.train.data import STDLIB, TextData, TokenStream, prepare_corpus, tokenizer_id
from jambalab.train.tasks import TaskData, answer_accuracy, make_task

SCHEDULES = ("cosine", "wsd")
METRICS = "metrics.jsonl"
PLOT = "loss.png"


class TrainingDiverged(JambalabError):
    """The loss or the gradient norm became NaN or infinite."""


# ---------------------------------------------------------------------------------------
# What to train on, and how
# ---------------------------------------------------------------------------------------
@dataclass
class TrainArgs:
    max_steps: int = 1000
    seq_len: int = 256
    batch_size: int = 8  # per process and micro-step (B)
    grad_accum: int = 1  # micro-steps per optimizer step (A)
    lr: float = 5e-3
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay, as Falcon Mamba)
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # wsd: the last fraction of the run decays linearly
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 = no clipping (the norm is still logged)
    activation_loss: float = 0.0  # Jamba-1.5's alpha (they use 1e-5)
    bf16: bool = False  # autocast matmuls to bfloat16; weights and optimizer stay fp32
    val_every: int = 100
    val_batches: int = 8
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    seed: int = 0
    time_budget: float | None = None  # seconds of training; the schedule then decays to fit it
    parallel: str = "auto"  # auto (DDP) | ddp | fsdp, under torchrun

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.validate()

    def validate(self) -> None:
        for f in ("max_steps", "seq_len", "batch_size", "grad_accum", "val_every", "val_batches", "ckpt_every",
                  "keep_checkpoints"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"training setting {f}={v!r} must be a positive integer")
        if self.seq_len < 2:
            raise ConfigError(f"training setting seq_len={self.seq_len} must be >= 2 (one prediction needs two tokens)")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"learning rate {self.lr} must be a positive number")
        checks = {"min_lr_ratio": 0 <= self.min_lr_ratio <= 1, "decay_fraction": 0 < self.decay_fraction <= 1,
                  "weight_decay": self.weight_decay >= 0, "grad_clip": self.grad_clip >= 0,
                  "activation_loss": self.activation_loss >= 0, "warmup_steps": self.warmup_steps >= 0,
                  "betas": all(0 <= b < 1 for b in self.betas)}
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"training setting {name}={getattr(self, name)} is out of range")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule {self.schedule!r} must be one of {SCHEDULES}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ConfigError(f"training setting time_budget={self.time_budget} must be a positive number of seconds")
        if self.parallel not in par.MODES:
            raise ConfigError(f"parallel mode {self.parallel!r} must be one of {par.MODES}")


@dataclass
class DataSpec:
    """Text (a path, or 'stdlib' for the embedded corpus) or a synthetic task, never both."""

    source: str | None = STDLIB
    task: str | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    text_field: str = "text"  # JSONL records
    val_fraction: float = 0.01

    def identity(self, seq_len: int) -> dict[str, Any]:
        """What a resumed run must agree on with the checkpoint, or its batches would differ."""
        src = None if self.source is None else (self.source if self.source == STDLIB else str(Path(self.source).resolve()))
        return {"source": src, "task": self.task, "task_options": self.task_options, "text_field": self.text_field,
                "val_fraction": self.val_fraction, "seq_len": seq_len}


@dataclass
class TrainResult:
    model: JambaLM  # the trained model (unwrapped; on rank 0 a full copy, also under FSDP)
    step: int
    val_loss: float | None
    val_accuracy: float | None
    tokens: int
    elapsed: float  # seconds of training, over all resumed segments
    tokens_per_s: float
    stop_reason: str
    checkpoint: Path | None
    data: TextData | TaskData
    tokenizer: Any = None


# ---------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------
def lr_at(args: TrainArgs, step: int, time_fraction: float = 0.0) -> float:
    """Learning rate of (0-based) step. Linear warmup over warmup_steps, then cosine or WSD over
    the rest of the run; with a time budget, 'the rest of the run' ends at whichever of max_steps
    and the budget comes first, so a timed run still ends at the low learning rate."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    span = max(args.max_steps - args.warmup_steps, 1)
    progress = min(1.0, max((step - args.warmup_steps) / span, time_fraction))
    floor = args.lr * args.min_lr_ratio
    if args.schedule == "cosine":
        return floor + 0.5 * (args.lr - floor) * (1 + math.cos(math.pi * progress))
    start = 1 - args.decay_fraction  # wsd: flat at lr until `start`, then a linear decay to the floor
    return args.lr if progress <= start else args.lr - (args.lr - floor) * (progress - start) / args.decay_fraction


# ---------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------
class Trainer:
    """Set up once (data, model, optimizer, maybe a resumed state), then run() to the end.

    config None with resume=True takes the checkpoint's model config. init_from: a HF checkpoint
    directory to fine-tune (its weights and, if present, its tokenizer.json)."""

    def __init__(self, config: JambaConfig | None, args: TrainArgs, data: DataSpec, out_dir: str | Path,
                 resume: bool = False, init_from: str | Path | None = None, device: str | None = None,
                 log: Callable[[str], None] = print):
        self.args, self.spec, self.out = args, data, Path(out_dir)
        self.unigram_entropy: float | None = None  # text data, rank 0: the no-context baseline
        self.dist = par.init_distributed(device)
        self._log = log
        self.ckpt_root = self.out / "checkpoints"
        resumed = self._find_resume_state() if resume else None
        if not resume:
            self._check_fresh_out_dir()
        config = self._pick_config(config, resumed, init_from)
        # Where the tokenizer comes from: a fine-tuned run copies it into every checkpoint's model/.
        tok_dir = resumed[0] / ckpt_io.MODEL_DIR if resumed is not None else init_from
        self._tok_dir = None if tok_dir is None else Path(tok_dir)
        self.tokenizer = self._tokenizer(config, self._tok_dir)
        self.data = self._make_data(config)
        base = self._base_model(config, resumed, init_from)
        self.act_terms: list[torch.Tensor] = []
        if args.activation_loss > 0:
            _register_activation_hooks(base, self.act_terms)
        self.config = base.config
        self.model = par.parallelize(base, self.dist, args.parallel)
        self.fsdp = self.dist.distributed and args.parallel == "fsdp"
        self.optimizer = _adamw(self.model, args)
        self.step, self.samples, self.tokens, self.elapsed_before = 0, 0, 0, 0.0
        self.t_start = time.perf_counter()
        self.val_set = self._my_val_batches()
        self.last_ckpt: Path | None = None
        if resumed is not None:
            self._restore(*resumed)
        self.elapsed_mean = self.elapsed_before  # training seconds, agreed by all ranks at each step
        self.stop_requested = False

    def log(self, msg: str) -> None:
        if self.dist.is_main:
            self._log(msg)

    # ---- setup -------------------------------------------------------------------------
    def _check_fresh_out_dir(self) -> None:
        last = ckpt_io.latest_checkpoint(self.ckpt_root)
        if last is not None or (self.out / METRICS).is_file() and (self.out / METRICS).stat().st_size:
            where = f"checkpoint {last.name}" if last else METRICS
            raise ConfigError(f"{self.out} already holds a run ({where}); pass --resume to continue it, "
                              f"or choose another --out")

    def _find_resume_state(self) -> tuple[Path, dict]:
        last = ckpt_io.latest_checkpoint(self.ckpt_root)
        if last is None:
            raise CheckpointError(f"--resume: no checkpoint under {self.ckpt_root}")
        return last, ckpt_io.load_state(last)

    def _pick_config(self, config: JambaConfig | None, resumed, init_from) -> JambaConfig:
        if resumed is not None:
            saved = JambaConfig.from_dict(resumed[1]["model_config"], source=f"{resumed[0]}/{ckpt_io.STATE_FILE}")
            if config is not None and config != saved:
                diff = sorted(k for k, v in config.to_dict().items() if saved.to_dict().get(k) != v and k != "name")
                raise CheckpointError(f"--resume: checkpoint {resumed[0]} holds a different model "
                                      f"(config fields differ: {', '.join(diff)})")
            _check_same(resumed, "data", self.spec.identity(self.args.seq_len), "data or sequence length")
            return saved
        if init_from is not None:
            from jambalab.hf import load_config

            loaded = load_config(init_from)
            if config is not None and config != loaded:
                raise ConfigError(f"--model {init_from} has its own config; do not combine it with --preset/--config/--set")
            return loaded
        if config is None:
            raise ConfigError("no model config: give --preset, --config or --model")
        return config

    def _tokenizer(self, config: JambaConfig, tok_dir: Path | None):
        from jambalab.tokenizer import load_tokenizer

        tok = load_tokenizer(tok_dir, config)
        if self.spec.task is None and tok.vocab_size > config.vocab_size:
            raise ConfigError(f"the tokenizer has {tok.vocab_size} ids but the model's vocabulary only "
                              f"{config.vocab_size}; set vocab_size >= {tok.vocab_size}")
        return tok

    def _make_data(self, config: JambaConfig) -> TextData | TaskData:
        a, spec = self.args, self.spec
        if spec.task is not None:
            return TaskData(make_task(spec.task, **spec.task_options), a.seq_len, a.seed, config.vocab_size)
        data_dir = self.out / "data"
        # Rank 0 tokenizes (once); the other ranks then map what it wrote.
        par.on_main(lambda: prepare_corpus(spec.source, data_dir, self.tokenizer, a.seed, spec.text_field,
                                           log=self.log), self.dist)
        stream = TokenStream.open(data_dir)
        meta = stream.meta
        if meta["tokenizer"] != tokenizer_id(self.tokenizer):
            raise CheckpointError(f"{data_dir} was tokenized with {meta['tokenizer']}, this run uses "
                                  f"{tokenizer_id(self.tokenizer)}")
        data = TextData(stream, a.seq_len, a.seed, spec.val_fraction)
        self.log(f"data: {meta['n_documents']} documents, {len(stream):,} tokens "
                 f"({data.n_train:,} training windows of {a.seq_len}, {data.n_val:,} validation windows)")
        if self.dist.is_main:
            self.unigram_entropy = data.unigram_entropy(config.vocab_size)
            self.log(f"data: unigram entropy of the training tokens {self.unigram_entropy:.3f} nats "
                     f"({self.unigram_entropy / math.log(2):.2f} bits): the loss of a model that ignores context")
        return data

    def _base_model(self, config: JambaConfig, resumed, init_from) -> JambaLM:
        if resumed is not None:
            return ckpt_io.load_checkpoint_model(resumed[0], config).float()
        if init_from is not None:
            from jambalab.hf import from_pretrained

            return from_pretrained(init_from, dtype=torch.float32).train()
        return JambaLM.from_config(config, seed=self.args.seed)

    def _my_val_batches(self) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """This rank's share of the fixed validation batches, with weights; every rank gets as many
        (padded with weight-0 repeats) because FSDP needs all ranks in every forward."""
        batches = self.data.val_batches(self.args.val_batches, self.args.batch_size)
        w = self.dist.world_size
        mine = [(i, l, 1.0) for i, l in batches[self.dist.rank::w]]
        n_each = math.ceil(len(batches) / w)
        while len(mine) < n_each:
            mine.append((batches[0][0], batches[0][1], 0.0))
        return mine

    # ---- one optimizer step ---------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """Forward/backward A micro-batches, clip, step. Returns the step's metrics (same on every rank)."""
        a, dev = self.args, self.dist.device
        self.model.train()
        sums = torch.zeros(4, dtype=torch.float64)  # loss, ce, aux, act
        first = self.samples + self.dist.rank * a.grad_accum * a.batch_size
        for m in range(a.grad_accum):
            s = first + m * a.batch_size
            ids, labels = self.data.train_batch(range(s, s + a.batch_size))  # (B, L) each
            with par.grad_sync(self.model, m == a.grad_accum - 1):
                with self._autocast():
                    loss, parts = self._loss(ids.to(dev), labels.to(dev))
                (loss / a.grad_accum).backward()
            sums += torch.tensor(parts, dtype=torch.float64)
        gnorm = _clip(self.model, a.grad_clip)
        elapsed = self.elapsed_before + time.perf_counter() - self.t_start
        means = par.all_mean([*(sums / a.grad_accum).tolist(), elapsed, float(self.stop_requested)], self.dist)
        loss, ce, aux, act, self.elapsed_mean, stop = means
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            raise TrainingDiverged(f"{'loss' if not math.isfinite(loss) else 'gradient norm'} became "
                                   f"{loss if not math.isfinite(loss) else gnorm} at step {self.step + 1}")
        lr = lr_at(a, self.step, self._time_fraction())
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.samples += a.batch_size * a.grad_accum * self.dist.world_size
        self.tokens += a.batch_size * a.grad_accum * self.dist.world_size * a.seq_len
        self.stop_requested = stop > 0  # any rank asked: all stop after this step
        out = {"step": self.step, "loss": loss, "ce_loss": ce, "lr": lr, "grad_norm": gnorm}
        if self.config.n_moe_layers:
            out["aux_loss"] = aux
        if a.activation_loss > 0:
            out["activation_loss"] = act
        return out

    def _loss(self, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        self.act_terms.clear()
        out = self.model(ids, labels=labels, return_logits=False)  # the loss only: no (B, L, V) logits held
        loss = out.loss
        act = torch.stack(self.act_terms).mean() if self.act_terms else None
        if act is not None:
            loss = loss + self.args.activation_loss * act
        aux = 0.0 if out.aux_loss is None else out.aux_loss.item()
        return loss, [loss.item(), out.ce_loss.item(), aux, 0.0 if act is None else act.item()]

    def _autocast(self):
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.args.bf16)

    def _time_fraction(self) -> float:
        return 0.0 if self.args.time_budget is None else self.elapsed_mean / self.args.time_budget

    # ---- validation ------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean cross-entropy (and answer accuracy for tasks) over the fixed validation batches."""
        self.model.eval()
        ce = acc = weight = 0.0
        for ids, labels, w in self.val_set:
            with self._autocast():
                out = self.model(ids.to(self.dist.device), labels=labels.to(self.dist.device))
            ce += w * float(out.ce_loss)
            if isinstance(self.data, TaskData):
                acc += w * answer_accuracy(out.logits, labels.to(self.dist.device))
            weight += w
        self.act_terms.clear()
        if self.fsdp:
            par.reshard(self.model)
        ce, acc, weight = par.all_mean([ce, acc, weight], self.dist)  # the ratios of the means are global means
        out = {"step": self.step, "val_loss": ce / weight}
        if isinstance(self.data, TaskData):
            out["val_accuracy"] = acc / weight
        return out

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self) -> Path | None:
        """A checkpoint of the current step (collective; rank 0 writes). Returns its path on rank 0."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optim = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        model = self._full_model()
        rngs = par.gather_objects(_rng_state(), self.dist)
        path = None
        if self.dist.is_main:
            state = {"step": self.step, "samples": self.samples, "tokens": self.tokens,
                     "elapsed": self.elapsed_mean, "world_size": self.dist.world_size,
                     "model_config": self.config.to_dict(), "args": _plain(asdict(self.args)),
                     "data": self.spec.identity(self.args.seq_len), "optimizer": optim, "rng": rngs}
            path = ckpt_io.save_checkpoint(self.ckpt_root, self.step, model, state, self.args.keep_checkpoints,
                                           self._tokenizer_files())
        par.barrier(self.dist)
        self.last_ckpt = ckpt_io.step_dir(self.ckpt_root, self.step)  # on every rank: they decide alike
        return path

    def _full_model(self) -> JambaLM | None:
        """Rank 0's plain JambaLM with the full weights (a gathered copy under FSDP)."""
        if not self.fsdp:
            return par.unwrap(self.model)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.dist.is_main:
            return None
        copy = JambaLM.on_meta(self.config).to_empty(device="cpu")
        copy.load_state_dict(sd, strict=False, assign=True)
        if self.config.tie_embeddings:
            copy.lm_head.weight = copy.embed.weight
        return copy

    def _tokenizer_files(self) -> list[Path]:
        src = self._tok_dir
        return [] if src is None else [src / f for f in ckpt_io.TOKENIZER_FILES if (src / f).is_file()]

    def _restore(self, path: Path, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        try:
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
            self.step, self.samples, self.tokens = int(state["step"]), int(state["samples"]), int(state["tokens"])
            self.elapsed_before = float(state["elapsed"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {path}: optimizer/trainer state does not fit this run: {e}") from None
        if state["world_size"] == self.dist.world_size:
            _set_rng_state(state["rng"][self.dist.rank])
        else:
            self.log(f"note: checkpoint was written by {state['world_size']} process(es), this run has "
                     f"{self.dist.world_size}; random-number streams restart (data order is unaffected)")
        self.last_ckpt = path
        self.log(f"resumed from {path} (step {self.step}, {self.tokens:,} tokens)")

    # ---- the run ------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train until max_steps, the time budget or Ctrl-C; validate, checkpoint and plot at the end."""
        metrics = _MetricsFile(self.out / METRICS, self.dist.is_main, truncate_after=self.step)
        self.t_start = time.perf_counter()
        self.elapsed_mean = self.elapsed_before
        progress = _Progress(self.args, self.step, self.elapsed_before, self.tokens, self.dist.is_main)
        if self._log is print:
            self._log = progress.bar.write  # messages above the progress bar, not through it
        last_val: dict[str, float] = {}
        reason = None
        with _stop_on_sigint(self):
            try:
                while self.step < self.args.max_steps and reason is None:
                    m, val = self._logged_step(metrics)
                    last_val = val or last_val
                    progress.update(self.step, self.elapsed_mean, m, last_val)
                    if self.step % self.args.ckpt_every == 0:
                        self.save()
                    reason = self._stop_reason()
            except TrainingDiverged as e:
                progress.close()
                raise TrainingDiverged(f"{e}; stopped. Last good checkpoint: {self._save_last_good()}. "
                                       f"Lower --lr or raise --warmup, then --resume") from None
        progress.close()
        if not last_val or last_val["step"] != self.step:
            last_val = self.validate()
            metrics.write(last_val)
        metrics.close()
        if self.last_ckpt != ckpt_io.step_dir(self.ckpt_root, self.step):
            self.save()
        if self.dist.is_main:
            from jambalab.train.report import plot_losses

            plot_losses(self.out / METRICS, self.out / PLOT, self.unigram_entropy)
        return self._result(reason or "max_steps", last_val, progress)

    def _logged_step(self, metrics: _MetricsFile) -> tuple[dict[str, float], dict[str, float] | None]:
        """One optimizer step (and a validation when due), written to metrics.jsonl."""
        a = self.args
        t = time.perf_counter()
        m = self.train_step()
        m["tokens_per_s"] = a.batch_size * a.grad_accum * self.dist.world_size * a.seq_len / (time.perf_counter() - t)
        m["tokens"] = self.tokens
        m["elapsed_s"] = round(self.elapsed_mean, 3)
        metrics.write(m)
        val = None
        if self.step % a.val_every == 0:
            val = self.validate()
            metrics.write(val)
        return m, val

    def _stop_reason(self) -> str | None:
        if self.stop_requested:
            return "interrupted"
        if self.args.time_budget is not None and self.elapsed_mean >= self.args.time_budget:
            return "time_budget"
        return None

    def _save_last_good(self) -> str:
        """After a divergence the weights are still those of the last completed step (the bad step was
        never applied): keep that progress, unless the last checkpoint already is that step."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.last_ckpt is None or self.last_ckpt != ckpt_io.step_dir(self.ckpt_root, self.step):
            if self.step > 0:
                self.save()
        return str(self.last_ckpt) if self.last_ckpt else "none (diverged before the first step)"

    def _result(self, reason: str, val: dict, progress: _Progress) -> TrainResult:
        model = self._full_model() if self.fsdp else par.unwrap(self.model)
        return TrainResult(model=model, step=self.step, val_loss=val.get("val_loss"),
                           val_accuracy=val.get("val_accuracy"), tokens=self.tokens, elapsed=self.elapsed_mean,
                           tokens_per_s=progress.tokens_per_s(self.tokens), stop_reason=reason,
                           checkpoint=self.last_ckpt, data=self.data, tokenizer=self.tokenizer)


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def _check_same(resumed: tuple[Path, dict], key: str, now: dict, what: str) -> None:
    saved = resumed[1].get(key)
    if saved != now:
        diff = sorted(k for k in now if (saved or {}).get(k) != now[k])
        raise CheckpointError(f"--resume: checkpoint {resumed[0]} was trained on other {what} "
                              f"({', '.join(f'{k}: {(saved or {}).get(k)!r} -> {now[k]!r}' for k in diff)})")


def _adamw(model: nn.Module, args: TrainArgs) -> torch.optim.AdamW:
    """Weight decay on matrices only; never on norms, biases, or Mamba's A_log and D (as mamba_ssm)."""
    decay, keep = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and not name.endswith("A_log") else keep).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=args.betas)


def _clip(model: nn.Module, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


def _register_activation_hooks(model: JambaLM, sink: list[torch.Tensor]) -> None:
    """Collect each block's output mean square (the residual stream), from outside the model code."""

    def hook(_module, _inputs, output):
        h = output[0]  # (B, L, d)
        sink.append(h.float().pow(2).mean())

    for block in model.layers:
        block.register_forward_hook(hook)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state((s["numpy"][0], np.array(s["numpy"][1], dtype=np.uint32), *s["numpy"][2:]))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


class _MetricsFile:
    """metrics.jsonl: one line per optimizer step, plus validation lines. A resumed run first drops
    the lines of steps after its checkpoint (the run that wrote them died before saving them)."""

    def __init__(self, path: Path, active: bool, truncate_after: int):
        self.path, self.active = path, active
        if active:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_file():
                keep = [ln for ln in path.read_text().splitlines() if _line_step(ln) <= truncate_after]
                path.write_text("".join(ln + "\n" for ln in keep))
            self.f = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        if self.active:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.active:
            self.f.close()


def _line_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf  # a torn last line of a killed run


_TIMED_BAR = "{l_bar}{bar}| {n_fmt}/{total_fmt} s [{elapsed}<{remaining}{postfix}]"


class _Progress:
    """The tqdm bar: in steps, or in seconds under a time budget (so its ETA is the real one),
    with loss, validation loss, learning rate and tokens/s (this session's, validation included)."""

    def __init__(self, args: TrainArgs, step: int, elapsed: float, tokens: int, enabled: bool):
        from tqdm import tqdm

        self.timed = args.time_budget is not None
        total, initial = (round(args.time_budget), round(elapsed)) if self.timed else (args.max_steps, step)
        self.bar = tqdm(total=total, initial=min(initial, total), unit="s" if self.timed else "step",
                        disable=not enabled, dynamic_ncols=True, mininterval=1.0,
                        bar_format=_TIMED_BAR if self.timed else None)
        self.t0, self.tokens0 = time.perf_counter(), tokens  # this session's start

    def update(self, step: int, elapsed: float, m: dict, val: dict) -> None:
        self.bar.update((min(round(elapsed), self.bar.total) if self.timed else step) - self.bar.n)
        post = f"step {step} loss {m['loss']:.3f}" + (f" val {val['val_loss']:.3f}" if val else "")
        self.bar.set_postfix_str(post + f" lr {m['lr']:.1e} {self.tokens_per_s(m['tokens']):,.0f} tok/s")

    def tokens_per_s(self, tokens: int) -> float:
        return (tokens - self.tokens0) / max(time.perf_counter() - self.t0, 1e-9)

    def close(self) -> None:
        self.bar.close()


class _stop_on_sigint:
    """Ctrl-C asks the loop to stop after the current step and save (a second Ctrl-C aborts);
    a step cut in half would leave weights and optimizer state out of step with each other."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.old = trainer, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_):
        if self.trainer.stop_requested:
            raise KeyboardInterrupt
        self.trainer.stop_requested = True
        self.trainer.log("interrupt: stopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        return False
