"""VimConfig: the Vision Mamba knobs, under the official constructor's names (hustvl/Vim,
vim/models_mamba.py, VisionMamba.__init__), with exact named presets.

Vim (arXiv 2401.09417): an image is cut into patch_size x patch_size patches taken every `stride`
pixels, embedded, given a class token (in the middle of the sequence) and a learned absolute position
embedding, and passed through `depth` bidirectional Mamba blocks. See shared/VIM.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from jambalab.config import _positive
from jambalab.errors import ConfigError


@dataclass
class VimConfig:
    img_size: int = 224
    patch_size: int = 16
    stride: int = 16  # the released "+" models use 8 (overlapping patches, ~4x the tokens)
    depth: int = 24
    embed_dim: int = 192
    channels: int = 3
    num_classes: int = 1000
    # The Mamba mixer (d_inner = expand * embed_dim, dt_rank None -> ceil(embed_dim / 16)).
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None
    norm_epsilon: float = 1e-5  # RMSNorm everywhere (the released models' rms_norm=True)
    # The released models' choices (official names): class token in the middle of the sequence,
    # learned absolute position embedding, the two scan directions averaged (their sum / 2),
    # residual stream kept in fp32.
    use_middle_cls_token: bool = True
    if_abs_pos_embed: bool = True
    if_divide_out: bool = True
    residual_in_fp32: bool = True
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.embed_dim / 16)
        self.validate()

    def validate(self) -> None:
        for f in ("img_size", "patch_size", "stride", "depth", "embed_dim", "channels", "num_classes", "d_state",
                  "d_conv", "expand", "dt_rank"):
            _positive(self, f)
        if not self.norm_epsilon > 0:
            raise ConfigError(f"vision config field norm_epsilon={self.norm_epsilon} must be > 0")
        if self.patch_size > self.img_size:
            raise ConfigError(f"patch_size {self.patch_size} is larger than img_size {self.img_size}")
        if (self.img_size - self.patch_size) % self.stride:
            raise ConfigError(f"img_size {self.img_size} does not fit whole patches: (img_size - patch_size) = "
                              f"{self.img_size - self.patch_size} is not divisible by stride {self.stride}")

    # ---- derived sizes --------------------------------------------------------------------
    @property
    def d_inner(self) -> int:
        return self.expand * self.embed_dim

    @property
    def grid_size(self) -> int:
        """Patches per side: (img_size - patch_size) // stride + 1."""
        return (self.img_size - self.patch_size) // self.stride + 1

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def cls_position(self) -> int:
        """Index of the class token in the token sequence (M // 2 with the middle token, else 0)."""
        return self.num_patches // 2 if self.use_middle_cls_token else 0

    # ---- presets and (de)serialisation -----------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> VimConfig:
        """Exact lookup (an unknown name or override field raises ConfigError)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown vision preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], "name": name, **overrides}, source=f"preset {name!r} overrides")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "vision config") -> VimConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown vision config field(s) {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path) -> VimConfig:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not a readable JSON vision config ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: a vision config must be a JSON object")
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_RELEASED = dict(img_size=224, patch_size=16, depth=24, channels=3, num_classes=1000, d_state=16)

PRESETS: dict[str, dict[str, Any]] = {
    # The released ImageNet-1K models (shared/VIM.md): parameter counts equal the official ones.
    "vim-tiny": dict(_RELEASED, embed_dim=192, stride=16),  # 7,148,008
    "vim-tiny-plus": dict(_RELEASED, embed_dim=192, stride=8),  # 7,250,344 ("Vim-Ti+")
    "vim-small": dict(_RELEASED, embed_dim=384, stride=16),  # 25,796,584
    "vim-small-plus": dict(_RELEASED, embed_dim=384, stride=8),  # 26,001,256 ("Vim-S+")
    "vim-base": dict(_RELEASED, embed_dim=768, stride=16),  # 97,598,440
    # Small ones: tests (seconds on a CPU) and the digits demo (jambalab vision train).
    "vim-test": dict(img_size=32, patch_size=8, stride=8, depth=2, embed_dim=32, num_classes=10),
    "vim-test-stride": dict(img_size=32, patch_size=8, stride=4, depth=2, embed_dim=32, num_classes=10),
    "vim-digits": dict(img_size=16, patch_size=4, stride=4, depth=4, embed_dim=64, channels=1, num_classes=10),
}
