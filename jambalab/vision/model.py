"""Vision Mamba (Vim), in plain single-device PyTorch.

Legend: B batch, C channels, H/W image height/width, G patches per side, M = G * G patches,
T = M + 1 tokens, d embed_dim, E d_inner, N d_state, R dt_rank, K d_conv.

Paper: Zhu et al., "Vision Mamba", arXiv 2401.09417 (Sec. 3.2 Vim block, Algorithm 1).
Numerics follow the official hustvl/Vim code as documented in shared/VIM.md: same state dict
(through jambalab.vision.official's key map), same images, same logits.

The scans run through jambalab.ops (fused CPU kernels, forward and backward, each beside its
pure-PyTorch *_ref twin). The backward direction is the same computation on the flipped sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from jambalab import ops
from jambalab.errors import InputError
from jambalab.model import Linear, RMSNorm, _init_mamba
from jambalab.vision.config import VimConfig


class ScanBranch(nn.Module):
    """One scan direction of a Vim block: its own conv, x_proj, dt_proj, A and D (Algorithm 1,
    lines 5-14). Attribute names as MambaMixer's, so jambalab.model's Mamba init applies."""

    def __init__(self, cfg: VimConfig):
        super().__init__()
        E, N, R = cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.d_inner, self.d_state, self.dt_rank = E, N, R
        self.conv1d = nn.Conv1d(E, E, cfg.d_conv, groups=E, padding=cfg.d_conv - 1, bias=True)
        self.x_proj = Linear(E, R + 2 * N, bias=False)
        self.dt_proj = Linear(R, E, bias=True)
        self.A_log = nn.Parameter(torch.empty(E, N))
        self.D = nn.Parameter(torch.empty(E))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x, z (B, T, E) in scan order -> y * silu(z) (B, T, E)."""
        u = ops.causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias)  # silu(conv(x)): (B, T, E)
        dt, B, C = torch.split(self.x_proj(u), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = ops.dt_softplus(ops.linear(dt, self.dt_proj.weight), self.dt_proj.bias)  # (B, T, E)
        y, _ = ops.selective_scan(u, dt, -torch.exp(self.A_log.float()), B, C, self.D, z)
        return y


class BiMambaMixer(nn.Module):
    """The "v2" bidirectional mixer: one in_proj, a forward and a backward ScanBranch over the
    same projected sequence, their outputs combined (averaged by default), then out_proj."""

    def __init__(self, cfg: VimConfig):
        super().__init__()
        self.divide_out = cfg.if_divide_out
        self.in_proj = Linear(cfg.embed_dim, 2 * cfg.d_inner, bias=False)
        self.fwd = ScanBranch(cfg)
        self.bwd = ScanBranch(cfg)
        self.out_proj = Linear(cfg.d_inner, cfg.embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, T, E) each
        y = self.fwd(xs, z)
        y = y + self.bwd(xs.flip(1), z.flip(1)).flip(1)  # the backward scan, back in token order
        if self.divide_out:
            y = y / 2
        return self.out_proj(y)


class VimBlock(nn.Module):
    """Add -> RMSNorm -> mixer (the official fused add-norm order): returns (mixer output, residual)."""

    def __init__(self, cfg: VimConfig):
        super().__init__()
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.norm = RMSNorm(cfg.embed_dim, cfg.norm_epsilon)
        self.mixer = BiMambaMixer(cfg)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        residual = x if residual is None else residual + x
        if self.residual_in_fp32:
            residual = residual.float()
        return self.mixer(self.norm(residual.to(self.norm.weight.dtype))), residual


class VisionMamba(nn.Module):
    """model(images (B, C, H, W)) -> logits (B, num_classes) fp32."""

    def __init__(self, config: VimConfig):
        super().__init__()
        self.config = c = config
        self.patch_embed = nn.Conv2d(c.channels, c.embed_dim, kernel_size=c.patch_size, stride=c.stride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, c.embed_dim)) if c.if_abs_pos_embed else None
        self.layers = nn.ModuleList(VimBlock(c) for _ in range(c.depth))
        self.norm_f = RMSNorm(c.embed_dim, c.norm_epsilon)
        self.head = nn.Linear(c.embed_dim, c.num_classes)

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: VimConfig, seed: int | None = None) -> VisionMamba:
        """A randomly initialised model (fp32)."""
        if seed is not None:
            torch.manual_seed(seed)
        model = cls(config)
        model.init_weights()
        return model

    @classmethod
    def on_meta(cls, config: VimConfig) -> VisionMamba:
        """Shapes only, no memory: for counting parameters."""
        with torch.device("meta"):
            return cls(config)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official init: truncated normal (0.02) for tokens, position embedding and head, Mamba's
        S4D-real init in each scan branch, out_proj scaled by 1/sqrt(depth) (GPT-2 scheme)."""
        for p in (self.cls_token, self.pos_embed, self.head.weight):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        nn.init.zeros_(self.head.bias)
        fan_in = self.patch_embed.weight[0].numel()
        nn.init.trunc_normal_(self.patch_embed.weight, std=math.sqrt(1 / fan_in))  # lecun normal
        nn.init.zeros_(self.patch_embed.bias)
        for layer in self.layers:
            nn.init.ones_(layer.norm.weight)
            mixer = layer.mixer
            for lin in (mixer.in_proj, mixer.out_proj, mixer.fwd.x_proj, mixer.bwd.x_proj):
                nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5))
            mixer.out_proj.weight /= math.sqrt(self.config.depth)
            _init_mamba(mixer.fwd)
            _init_mamba(mixer.bwd)
        nn.init.ones_(self.norm_f.weight)

    # ---- forward -------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The normalised class-token feature (B, d) fp32."""
        x = self.embed(images)  # (B, T, d)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual)
        h = self.norm_f((residual + x).to(self.norm_f.weight.dtype))  # (B, T, d)
        return h[:, self.config.cls_position].float()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patches, the class token inserted at cls_position, plus the position embedding: (B, T, d)."""
        check_images(images, self.config.channels, self.config.img_size)
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype))  # (B, d, G, G)
        x = x.flatten(2).transpose(1, 2)  # (B, M, d), patches in row-major order
        p = self.config.cls_position
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, d)
        x = torch.cat([x[:, :p], cls, x[:, p:]], dim=1)  # (B, T, d)
        return x if self.pos_embed is None else x + self.pos_embed

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def check_images(images: torch.Tensor, channels: int, img_size: int) -> None:
    """InputError unless images is a float (B, channels, img_size, img_size) tensor."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise InputError(f"images must be a (batch, channels, height, width) tensor, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if not images.is_floating_point():
        raise InputError(f"images must be a float tensor (normalised pixels), got dtype {images.dtype}")
    b, c, h, w = images.shape
    if c != channels:
        raise InputError(f"images have {c} channel(s), the model takes {channels} (shape {tuple(images.shape)})")
    if (h, w) != (img_size, img_size):
        raise InputError(f"images are {h}x{w} pixels, the model takes {img_size}x{img_size}: resize them, or "
                         f"build the model with img_size={h} (from_official interpolates the position embedding)")


def softmax_top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, class indices), each (B, k), most likely first."""
    return F.softmax(logits.float(), dim=-1).topk(min(k, logits.shape[-1]), dim=-1)
