"""One flat config for the whole hybrid family, with the Jamba paper's knobs.

Jamba (arXiv 2403.19887, Sec. 2): blocks of l layers, one attention layer per
block (a:m = 1:(l-1)), an MoE in place of the MLP every e layers with n experts
and top-K routing. Layer i is attention iff i % attn_layer_period ==
attn_layer_offset; it has an MoE FFN iff i % expert_layer_period ==
expert_layer_offset (HF's convention). Period 0 means "never" (pure Mamba, or
no MoE). d_ff = 0 gives Mamba-style single-sublayer blocks (HF MambaForCausalLM).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from jambalab.errors import ConfigError

INNER_NORMS = ("none", "weightless", "learnable")  # Mamba, Falcon Mamba, Jamba


@dataclass
class JambaConfig:
    vocab_size: int = 65536
    d_model: int = 4096
    n_layers: int = 32
    # Attention placement: the paper's l (period) and the attention layer's index in the block.
    attn_layer_period: int = 8
    attn_layer_offset: int = 4
    # MoE placement: the paper's e (period) and offset; n experts, top-K.
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    n_experts: int = 16
    top_k: int = 2
    # Attention.
    n_heads: int = 32
    n_kv_heads: int = 8
    rope: bool = False  # the paper uses no positional encoding; Table 8 ablates RoPE
    rope_theta: float = 10000.0
    # Feed-forward (SwiGLU); 0 = no FFN sublayer (pure Mamba blocks).
    d_ff: int = 14336
    # Mamba mixer.
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    d_inner: int | None = None  # explicit size wins over expand * d_model
    dt_rank: int | None = None  # None -> ceil(d_model / 16)
    mamba_inner_norm: str = "learnable"  # RMSNorm on dt, B, C: none | weightless | learnable
    mamba_inner_norm_eps: float = 1e-6
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    # Stack.
    norm_eps: float = 1e-6
    residual_in_fp32: bool = False  # Mamba/Falcon Mamba keep the residual stream in fp32
    tie_embeddings: bool = False
    router_aux_loss_coef: float = 0.001
    init_std: float = 0.02
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if self.d_inner is None:
            self.d_inner = self.expand * self.d_model
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.d_model / 16)
        self.validate()

    # ---- validation ------------------------------------------------------------------
    def validate(self) -> None:
        for f in ("vocab_size", "d_model", "n_layers", "d_state", "d_conv", "d_inner", "dt_rank"):
            _positive(self, f)
        for f in ("attn_layer_period", "expert_layer_period", "d_ff", "n_experts", "top_k"):
            if getattr(self, f) < 0:
                raise ConfigError(f"config field {f}={getattr(self, f)} must be >= 0")
        _offset_in_period(self, "attn_layer_offset", "attn_layer_period")
        _offset_in_period(self, "expert_layer_offset", "expert_layer_period")
        if self.mamba_inner_norm not in INNER_NORMS:
            raise ConfigError(f"config field mamba_inner_norm={self.mamba_inner_norm!r} must be one of {INNER_NORMS}")
        if self.n_attention_layers:
            _positive(self, "n_heads")
            _positive(self, "n_kv_heads")
            if self.d_model % self.n_heads:
                raise ConfigError(f"config field n_heads={self.n_heads} does not divide d_model={self.d_model}")
            if self.n_heads % self.n_kv_heads:
                raise ConfigError(f"config field n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}")
            if self.rope and self.head_dim % 2:
                raise ConfigError(f"rope needs an even head_dim, got {self.head_dim} (d_model / n_heads)")
        if self.n_moe_layers:
            if self.d_ff == 0:
                raise ConfigError("config has MoE layers but d_ff=0: experts need d_ff > 0")
            _positive(self, "top_k")
            if self.top_k > self.n_experts:
                raise ConfigError(f"config field top_k={self.top_k} exceeds n_experts={self.n_experts}")
        if self.d_ff == 0 and self.n_attention_layers:
            raise ConfigError("config field d_ff=0 (Mamba-style blocks) needs attn_layer_period=0 (no attention)")
        for f in ("norm_eps", "mamba_inner_norm_eps"):
            if not getattr(self, f) > 0:
                raise ConfigError(f"config field {f}={getattr(self, f)} must be > 0")
        for f in ("pad_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(self, f)
            if v is not None and not 0 <= v < self.vocab_size:
                raise ConfigError(f"config field {f}={v} is outside the vocabulary [0, {self.vocab_size})")

    # ---- derived ---------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def is_attention(self, i: int) -> bool:
        return self.attn_layer_period > 0 and i % self.attn_layer_period == self.attn_layer_offset

    def is_moe(self, i: int) -> bool:
        return (
            self.d_ff > 0
            and self.n_experts > 1
            and self.expert_layer_period > 0
            and i % self.expert_layer_period == self.expert_layer_offset
        )

    @property
    def layer_types(self) -> list[str]:
        return ["attention" if self.is_attention(i) else "mamba" for i in range(self.n_layers)]

    @property
    def n_attention_layers(self) -> int:
        return sum(self.is_attention(i) for i in range(self.n_layers))

    @property
    def n_mamba_layers(self) -> int:
        return self.n_layers - self.n_attention_layers

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe(i) for i in range(self.n_layers))

    @property
    def family(self) -> str:
        """The HF model_type this config exports to: jamba, mamba or falcon_mamba."""
        if self.d_ff == 0:
            return "falcon_mamba" if self.mamba_inner_norm == "weightless" else "mamba"
        return "jamba"

    def layer_pattern(self) -> str:
        """One letter per layer: A attention, M Mamba; lowercase-e suffix marks MoE (e.g. 'M Me M Me A Me')."""
        return " ".join(("A" if self.is_attention(i) else "M") + ("e" if self.is_moe(i) else "") for i in range(self.n_layers))

    # ---- (de)serialisation -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> JambaConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path) -> JambaConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"config file {path} must hold a JSON object")
        return cls.from_dict(d, source=str(path))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> JambaConfig:
        from jambalab.presets import PRESETS

        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        d = dict(PRESETS[name], name=name)
        d.update(overrides)
        return cls.from_dict(d, source=f"preset {name}")

    def replace(self, **overrides: Any) -> JambaConfig:
        known = {f.name for f in fields(self)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ConfigError(f"unknown config field(s) {bad}")
        d = self.to_dict()
        if "d_model" in overrides or "expand" in overrides:
            # derived sizes follow the new width unless given explicitly
            d.setdefault("d_inner", None)
            if "d_inner" not in overrides:
                d["d_inner"] = None
            if "dt_rank" not in overrides:
                d["dt_rank"] = None
        d.update(overrides)
        return JambaConfig(**d)


def _positive(cfg: JambaConfig, name: str) -> None:
    v = getattr(cfg, name)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"config field {name}={v!r} must be a positive integer")


def _offset_in_period(cfg: JambaConfig, off: str, period: str) -> None:
    o, p = getattr(cfg, off), getattr(cfg, period)
    if p == 0:
        return
    if not 0 <= o < p:
        raise ConfigError(f"config field {off}={o} must lie in [0, {period}={p})")
