"""Training checkpoints: an HF-format model directory plus everything exact resume needs.

    <root>/step-00000100/
        model/               config.json + model.safetensors (model.save_pretrained): loads in
                             jambalab.from_pretrained and transformers.AutoModelForCausalLM
        trainer_state.pt     optimizer, schedule position, data position, RNG of every rank, and
                             the model config / data / hyperparameters the run was started with

Writes are atomic: everything goes into <root>/.tmp-step-.../, is fsynced, and only then renamed
to step-N (a rename within one directory is atomic on POSIX). A kill at any point leaves either
no step-N or a complete one, and the previous checkpoints are deleted only after the new one is
in place. A model that transformers could not compute identically (e.g. rope=True) is stored in
jambalab's own layout (model.safetensors with jambalab names + jambalab_config.json) instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from jambalab.config import JambaConfig
from jambalab.errors import CheckpointError, ConfigError, JambalabError
from jambalab.model import JambaLM

FORMAT = "jambalab-train-1"
STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"
NATIVE_CONFIG = "jambalab_config.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


# ---------------------------------------------------------------------------------------
# Finding checkpoints
# ---------------------------------------------------------------------------------------
def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under root, oldest first (temporary directories are never listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


# ---------------------------------------------------------------------------------------
# Model directory
# ---------------------------------------------------------------------------------------
def save_model(model: JambaLM, path: Path) -> None:
    """HF format when transformers computes the same function, else jambalab's own layout."""
    from jambalab.hf import to_hf_config

    try:
        to_hf_config(model.config, model.embed.weight.dtype)
    except CheckpointError:
        _save_native(model, path)
        return
    model.save_pretrained(path)


def _save_native(model: JambaLM, path: Path) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
               if not (model.config.tie_embeddings and k == "lm_head.weight")}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / NATIVE_CONFIG).write_text(json.dumps(model.config.to_dict(), indent=1))


def load_model(path: Path) -> JambaLM:
    """The model of a checkpoint's model/ directory (either layout), in training mode."""
    if (path / NATIVE_CONFIG).is_file():
        return _load_native(path).train()
    from jambalab.hf import from_pretrained

    return from_pretrained(path).train()


def _load_native(path: Path) -> JambaLM:
    from safetensors.torch import load_file

    try:
        cfg = JambaConfig.from_dict(json.loads((path / NATIVE_CONFIG).read_text()), source=str(path / NATIVE_CONFIG))
        tensors = load_file(str(path / "model.safetensors"))
    except (OSError, ValueError, ConfigError) as e:
        raise CheckpointError(f"{path} is not a readable model directory: {e}") from None
    model = JambaLM.on_meta(cfg).to_empty(device="cpu")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors missing {missing[:3]} / unexpected {unexpected[:3]}")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model


# ---------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------
def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, state: dict[str, Any], keep: int = 2,
                    extra_files: list[Path] = (),
                    write_model: Callable[[torch.nn.Module, Path], None] | None = None) -> Path:
    """Write step-N atomically; then delete all but the newest `keep` checkpoints. Returns step-N.
    write_model(model, dir) writes model/ (default save_model: a JambaLM; the vision trainer passes its own)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    final, old = step_dir(root, step), root / f".old-step-{step:08d}-{os.getpid()}"
    try:
        (write_model or save_model)(model, tmp / MODEL_DIR)
        for f in extra_files:  # the tokenizer the run was trained with, so the model dir is usable as is
            shutil.copy2(f, tmp / MODEL_DIR / f.name)
        torch.save({"format": FORMAT, **state}, tmp / STATE_FILE)
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again: move it aside, never delete it first
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
    for _, stale in list_checkpoints(root)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _remove_stale_temporaries(root: Path) -> None:
    """Half-written checkpoints of a killed run, and replaced ones it had not deleted yet (put
    back if the kill came between moving one aside and renaming its replacement)."""
    for p in root.glob(".tmp-step-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".old-step-*"):
        final = root / p.name[len(".old-"):].rsplit("-", 1)[0]
        if final.exists():
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.rename(p, final)


def _fsync_tree(path: Path) -> None:
    for dirpath, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------
def load_state(ckpt: Path) -> dict[str, Any]:
    """trainer_state.pt of a checkpoint, checked for its format tag; CheckpointError if unreadable."""
    f = ckpt / STATE_FILE
    if not f.is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no {STATE_FILE}")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or corrupt zip/pickle
        raise CheckpointError(f"checkpoint {ckpt} is corrupt ({STATE_FILE}: {str(e).splitlines()[0]}); "
                              f"delete it to resume from an older one") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {ckpt}: {STATE_FILE} is not a jambalab training state")
    return state


def load_checkpoint_model(ckpt: Path, config: JambaConfig) -> JambaLM:
    """The checkpoint's weights in a model built from `config` (the exact config the run saved:
    config.json cannot carry fields transformers has no use for, e.g. an unused MoE period)."""
    try:
        loaded = load_model(ckpt / MODEL_DIR)
    except JambalabError as e:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt or incomplete: {e}") from None
    model = JambaLM.on_meta(config).to_empty(device="cpu")
    try:
        model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"checkpoint {ckpt}: model/ does not match the saved config: {first}") from None
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.train()
