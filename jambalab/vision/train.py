"""Training an image classifier on CPU: scikit-learn's bundled 8x8 digits, Vim beside a ViT.

Legend: B batch, C channels, S img_size.

The same trainer features as text training (jambalab.train): its TrainArgs and learning-rate
schedule, a tqdm progress bar, metrics.jsonl, loss.png, atomic checkpoints (step-N directories
written through jambalab.train.checkpoint) and exact resume. Resume is exact without saving random
streams: step s's batch and its augmentation are functions of (seed, s) alone.

    <out>/<arch>/metrics.jsonl, loss.png, checkpoints/step-N/{model/, trainer_state.pt}
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from jambalab.errors import CheckpointError, ConfigError
from jambalab.train import checkpoint as ckpt_io
from jambalab.train.loop import METRICS, PLOT, TrainArgs, TrainingDiverged, _MetricsFile, lr_at
from jambalab.vision import store

NO_DECAY = ("pos_embed", "cls_token", "A_log")  # as the official Vim (no_weight_decay) and Mamba


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------
class DigitsData:
    """sklearn.datasets.load_digits (1,797 8x8 grey images, 10 classes), upscaled bilinearly to
    img_size, split by a seeded permutation into train / validation / test (70 / 10 / 20 %)."""

    labels = [str(i) for i in range(10)]

    def __init__(self, img_size: int, seed: int):
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise ConfigError("the digits data needs scikit-learn: pip install 'jambalab[vision]'") from None
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (n, 1, 8, 8), ink = 1
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)  # (n, 1, S, S)
        y = torch.tensor(digits.target, dtype=torch.long)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        n_test, n_val = len(y) // 5, len(y) // 10
        self.test, self.val, train = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
        self.mean, self.std = float(x[train].mean()), float(x[train].std())
        self.x, self.y, self.train, self.seed = (x - self.mean) / self.std, y, train, seed
        self.pad_value = -self.mean / self.std  # a blank pixel after normalisation

    @property
    def preprocess(self) -> dict[str, Any]:
        """What eval needs to feed a photo of a digit: grey, dark ink on light paper -> inverted."""
        return {"mean": self.mean, "std": self.std, "invert": True, "labels": self.labels}

    def train_batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step `step`'s batch: samples [step*B, (step+1)*B) of a stream of seeded epoch permutations,
        each image shifted by up to one pixel (seeded by step)."""
        n = len(self.train)
        pos = torch.arange(step * batch_size, (step + 1) * batch_size)
        idx = torch.empty(batch_size, dtype=torch.long)
        for epoch in pos.div(n, rounding_mode="floor").unique().tolist():
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            sel = pos // n == epoch
            idx[sel] = self.train[perm[pos[sel] % n]]
        return _shift(self.x[idx], torch.Generator().manual_seed(self.seed * 7_919 + step), self.pad_value), self.y[idx]

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        idx = {"val": self.val, "test": self.test}[name]
        return self.x[idx], self.y[idx]


def _shift(x: torch.Tensor, g: torch.Generator, fill: float, max_shift: int = 1) -> torch.Tensor:
    """Each image translated by a random (dy, dx) in [-max_shift, max_shift]^2 (blank fill). (B, C, S, S)."""
    s = x.shape[-1]
    padded = F.pad(x, (max_shift,) * 4, value=fill)
    offsets = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=g).tolist()
    return torch.stack([padded[i, :, dy:dy + s, dx:dx + s] for i, (dy, dx) in enumerate(offsets)])


# ---------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------
@dataclass
class VisionResult:
    arch: str
    steps: int
    test_accuracy: float
    val_accuracy: float
    parameters: int
    train_seconds: float
    cpu_seconds: float
    checkpoint: Path


class VisionTrainer:
    """One model (arch 'vim' or 'vit', a config dict) on DigitsData, writing under out_dir.

    Uses these TrainArgs fields: max_steps, batch_size, lr, min_lr_ratio, schedule, warmup_steps,
    decay_fraction, weight_decay, betas, grad_clip, val_every, ckpt_every, keep_checkpoints, seed."""

    def __init__(self, arch: str, config: dict[str, Any], args: TrainArgs, data: DigitsData, out_dir: str | Path,
                 resume: bool = False):
        self.arch, self.args, self.data, self.out = arch, args, data, Path(out_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.model = store.build(arch, config, seed=args.seed).train()
        self.optimizer = torch.optim.AdamW(_param_groups(self.model, args.weight_decay), lr=args.lr, betas=args.betas)
        self.step, self.elapsed_before, self.cpu_before = 0, 0.0, 0.0
        if resume:
            self._restore()
        else:
            self._check_fresh()

    # ---- setup ---------------------------------------------------------------------------
    def _check_fresh(self) -> None:
        if ckpt_io.latest_checkpoint(self.ckpt_root) is not None or (self.out / METRICS).is_file():
            raise ConfigError(f"{self.out} already holds a run; pass --resume to continue it, or choose another --out")

    def _identity(self) -> dict[str, Any]:
        """What a resumed run must agree on with its checkpoint."""
        a = self.args
        return {"arch": self.arch, "config": self.model.config.to_dict(), "seed": a.seed, "batch_size": a.batch_size,
                "max_steps": a.max_steps, "lr": a.lr, "warmup_steps": a.warmup_steps}

    def _restore(self) -> None:
        last = ckpt_io.latest_checkpoint(self.ckpt_root)
        if last is None:
            raise CheckpointError(f"--resume: no checkpoint under {self.ckpt_root}")
        state = ckpt_io.load_state(last)
        if state.get("identity") != self._identity():
            saved, now = state.get("identity") or {}, self._identity()
            diff = sorted(k for k in now if saved.get(k) != now[k])
            raise CheckpointError(f"--resume: checkpoint {last} was written by another run (differs in {', '.join(diff)})")
        model, _ = store.load_model_dir(last / ckpt_io.MODEL_DIR)
        self.model.load_state_dict(model.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.elapsed_before, self.cpu_before = state["step"], state["elapsed"], state["cpu_seconds"]

    # ---- steps ------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        a = self.args
        self.model.train()
        images, labels = self.data.train_batch(self.step, a.batch_size)
        lr = lr_at(a, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(self.model(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), a.grad_clip if a.grad_clip > 0 else float("inf")))
        if not (np.isfinite(loss.item()) and np.isfinite(norm)):
            raise TrainingDiverged(f"{self.arch}: loss {loss.item()} / gradient norm {norm} at step {self.step + 1}")
        self.optimizer.step()
        self.step += 1
        return {"step": self.step, "loss": loss.item(), "lr": lr, "grad_norm": norm}

    @torch.no_grad()
    def evaluate(self, split: str, batch_size: int = 256) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) on the validation or test split."""
        self.model.eval()
        x, y = self.data.split(split)
        logits = torch.cat([self.model(x[i:i + batch_size]) for i in range(0, len(y), batch_size)])
        return F.cross_entropy(logits, y).item(), (logits.argmax(-1) == y).float().mean().item()

    def save(self, elapsed: float, cpu: float) -> Path:
        state = {"optimizer": self.optimizer.state_dict(), "step": self.step, "elapsed": elapsed, "cpu_seconds": cpu,
                 "identity": self._identity(), "args": asdict(self.args)}
        write = lambda model, path: store.save_model_dir(model, path, self.data.preprocess)  # noqa: E731
        return ckpt_io.save_checkpoint(self.ckpt_root, self.step, self.model, state, keep=self.args.keep_checkpoints,
                                       write_model=write)

    # ---- the run ------------------------------------------------------------------------------
    def run(self, log: Callable[[str], None] = print) -> VisionResult:
        from tqdm import tqdm

        from jambalab.train.report import plot_losses

        a = self.args
        metrics = _MetricsFile(self.out / METRICS, True, truncate_after=self.step)
        t0, c0 = time.perf_counter(), time.process_time()
        bar = tqdm(total=a.max_steps, initial=self.step, unit="step", desc=self.arch, dynamic_ncols=True, mininterval=1.0)
        elapsed = cpu = 0.0
        last = None
        while self.step < a.max_steps:
            m = self.train_step()
            elapsed, cpu = self.elapsed_before + time.perf_counter() - t0, self.cpu_before + time.process_time() - c0
            metrics.write({**m, "elapsed_s": round(elapsed, 3), "cpu_s": round(cpu, 3)})
            if self.step % a.val_every == 0 or self.step == a.max_steps:
                val_loss, val_acc = self.evaluate("val")
                metrics.write({"step": self.step, "val_loss": val_loss, "val_accuracy": val_acc})
                bar.set_postfix_str(f"loss {m['loss']:.3f} val {val_loss:.3f} acc {val_acc:.1%}")
            if self.step % a.ckpt_every == 0 or self.step == a.max_steps:
                last = self.save(elapsed, cpu)
            bar.update(1)
        bar.close()
        metrics.close()
        plot_losses(self.out / METRICS, self.out / PLOT, ylabel="cross-entropy (nats per image)")
        _, val_acc = self.evaluate("val")
        _, test_acc = self.evaluate("test")
        last = last or ckpt_io.latest_checkpoint(self.ckpt_root)
        if not elapsed:  # nothing left to train: report the checkpoint's own times
            elapsed, cpu = self.elapsed_before, self.cpu_before
        return VisionResult(self.arch, self.step, test_acc, val_acc, sum(p.numel() for p in self.model.parameters()),
                            elapsed, cpu, last)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only; never on norms, biases, tokens, position embedding or A_log."""
    decay, keep = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.endswith(NO_DECAY) else keep).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def write_summary(out: Path, results: list[VisionResult]) -> None:
    rows = [{**asdict(r), "checkpoint": str(r.checkpoint)} for r in results]
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
