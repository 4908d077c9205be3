"""A DeiT-style Vision Transformer: the paper's baseline (Touvron et al., arXiv 2012.12877), in the
shape of timm's deit_*_patch16_224 (class token first, learned position embedding, pre-norm
LayerNorm (eps 1e-6) blocks of multi-head attention and a GELU MLP, final norm, linear head).

Legend: B batch, T tokens (patches + 1), d embed_dim, H heads, hd head dim.

Two attention implementations of the same function: "sdpa" (torch's fused
scaled_dot_product_attention, what timm uses) and "explicit" (softmax(q k^T / sqrt(hd)) v with the
(B, H, T, T) matrix materialised, what the paper's DeiT ran); a test compares them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from jambalab.config import _positive
from jambalab.errors import ConfigError
from jambalab.vision.model import check_images

ATTENTIONS = ("sdpa", "explicit")


@dataclass
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: int = 4
    channels: int = 3
    num_classes: int = 1000
    attention: str = "sdpa"  # sdpa | explicit
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        for f in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "channels", "num_classes"):
            _positive(self, f)
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ConfigError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"attention {self.attention!r} must be one of {ATTENTIONS}")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ViTConfig:
        if name not in VIT_PRESETS:
            raise ConfigError(f"unknown ViT preset {name!r}; choose from {', '.join(VIT_PRESETS)}")
        return cls.from_dict({**VIT_PRESETS[name], "name": name, **overrides}, source=f"preset {name!r} overrides")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "ViT config") -> ViTConfig:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"{source}: unknown ViT config field(s) {', '.join(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


VIT_PRESETS: dict[str, dict[str, Any]] = {
    "deit-tiny": dict(embed_dim=192, depth=12, num_heads=3),  # timm deit_tiny_patch16_224: 5,717,416
    "deit-small": dict(embed_dim=384, depth=12, num_heads=6),  # deit_small_patch16_224: 22,050,664
    "vit-test": dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10),
    # Beside vim-digits in `jambalab vision train`: the same width, about as many parameters.
    "vit-digits": dict(img_size=16, patch_size=4, embed_dim=64, depth=3, num_heads=4, channels=1, num_classes=10),
}


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, H, T, hd) each -> (B, H, T, hd), torch's fused kernel (never holds the T x T matrix on CPU)."""
    return F.scaled_dot_product_attention(q, k, v)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same function with the (B, H, T, T) attention matrix materialised."""
    att = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, T, T)
    return att.softmax(dim=-1) @ v


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.attend = sdpa_attention if cfg.attention == "sdpa" else explicit_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
        y = self.attend(qkv[0], qkv[1], qkv[2])  # (B, H, T, hd)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class ViTBlock(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(), nn.Linear(cfg.mlp_ratio * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """model(images (B, C, H, W)) -> logits (B, num_classes)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = c = config
        self.patch_embed = nn.Conv2d(c.channels, c.embed_dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, c.embed_dim))
        self.blocks = nn.ModuleList(ViTBlock(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.head = nn.Linear(c.embed_dim, c.num_classes)

    @classmethod
    def from_config(cls, config: ViTConfig, seed: int | None = None) -> VisionTransformer:
        if seed is not None:
            torch.manual_seed(seed)
        model = cls(config)
        model.init_weights()
        return model

    @classmethod
    def on_meta(cls, config: ViTConfig) -> VisionTransformer:
        with torch.device("meta"):
            return cls(config)

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's ViT init: truncated normal (0.02) for linears and tokens, zero biases."""
        for p in (self.cls_token, self.pos_embed):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.config.channels, self.config.img_size)
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, M, d)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, T, d)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
