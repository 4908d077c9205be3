"""Vision Mamba (Vim, arXiv 2401.09417): the bidirectional Mamba image backbone.

    from jambalab import vision
    model = vision.from_preset("vim-tiny")                      # random init
    model = vision.from_official("vim_t_midclstok_76p1acc.pth", "vim-tiny")  # released weights
    logits = model(images)                                     # (B, 3, 224, 224) -> (B, 1000)
"""

from __future__ import annotations

from pathlib import Path

from jambalab.vision.config import PRESETS, VimConfig
from jambalab.vision.model import VisionMamba


def from_preset(name: str, seed: int | None = 0, **overrides) -> VisionMamba:
    """A randomly initialised VisionMamba of a named preset; overrides by field name (e.g. img_size=1248)."""
    return VisionMamba.from_config(VimConfig.from_preset(name, **overrides), seed=seed)


def from_official(path: str | Path, preset: str, **overrides) -> VisionMamba:
    """An official hustvl/Vim checkpoint (.pth holding {"model": state_dict}, or .safetensors) in the
    preset's shape. A different img_size (override) resizes the position embedding as the official
    fine-tuning code does."""
    from jambalab.vision.official import load_official

    return load_official(path, VimConfig.from_preset(preset, **overrides))


__all__ = ["VimConfig", "VisionMamba", "PRESETS", "from_preset", "from_official"]
