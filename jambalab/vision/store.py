"""A trained image classifier on disk: model.safetensors + vision_model.json (architecture, config,
and the preprocessing the model was trained with, so `jambalab vision eval` can feed it images).

    vision_model.json = {"arch": "vim" | "vit", "config": {...}, "preprocess": {"mean": m, "std": s,
                         "invert": bool, "labels": [...]}}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.nn as nn

from jambalab.errors import CheckpointError, ConfigError
from jambalab.vision.config import VimConfig
from jambalab.vision.model import VisionMamba
from jambalab.vision.vit import ViTConfig, VisionTransformer

MODEL_FILE = "model.safetensors"
META_FILE = "vision_model.json"
ARCHS = {"vim": (VimConfig, VisionMamba), "vit": (ViTConfig, VisionTransformer)}


def arch_of(model: nn.Module) -> str:
    return "vim" if isinstance(model, VisionMamba) else "vit"


def build(arch: str, config: dict[str, Any], seed: int | None = None) -> VisionMamba | VisionTransformer:
    """A randomly initialised model of arch ('vim' or 'vit') from a config dict."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown vision architecture {arch!r}; choose from {', '.join(ARCHS)}")
    config_cls, model_cls = ARCHS[arch]
    return model_cls.from_config(config_cls.from_dict(config), seed=seed)


def save_model_dir(model: nn.Module, path: Path, preprocess: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(path / MODEL_FILE),
              metadata={"format": "pt"})
    meta = {"arch": arch_of(model), "config": model.config.to_dict(), "preprocess": preprocess}
    (path / META_FILE).write_text(json.dumps(meta, indent=1))


def load_model_dir(path: str | Path) -> tuple[VisionMamba | VisionTransformer, dict[str, Any]]:
    """(model in eval mode, preprocess) of a model directory."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / META_FILE).is_file():
        raise CheckpointError(f"{path} is not a jambalab vision model directory (no {META_FILE})")
    try:
        meta = json.loads((path / META_FILE).read_text())
        config_cls, model_cls = ARCHS[meta["arch"]]
        config = config_cls.from_dict(meta["config"], source=str(path / META_FILE))
        tensors = load_file(str(path / MODEL_FILE))
        preprocess = meta["preprocess"]
    except (OSError, ValueError, KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path} is not a readable vision model directory: {e}") from None
    model = model_cls.on_meta(config).to_empty(device="cpu")
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: {MODEL_FILE} does not match {META_FILE}: {str(e).splitlines()[0]}") from None
    return model.eval(), preprocess
