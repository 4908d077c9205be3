"""Size facts about a config, computed on the meta device (no memory used)."""

from __future__ import annotations

from jambalab.config import JambaConfig

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}


def kv_bytes_per_token(cfg: JambaConfig, dtype: str = "bf16") -> int:
    """K and V for every attention layer, one token, one sequence."""
    return 2 * cfg.n_attention_layers * cfg.n_kv_heads * cfg.head_dim * DTYPE_BYTES[dtype]


def ssm_state_bytes(cfg: JambaConfig, conv_dtype: str = "bf16") -> int:
    """Mamba state for one sequence, whatever its length: fp32 SSM state + conv state."""
    per_layer = cfg.d_inner * cfg.d_state * 4 + cfg.d_inner * cfg.d_conv * DTYPE_BYTES[conv_dtype]
    return cfg.n_mamba_layers * per_layer


def param_counts(cfg: JambaConfig) -> tuple[int, int]:
    """(total, active per token), counted on the meta device."""
    from jambalab.model import JambaLM

    m = JambaLM.on_meta(cfg)
    return m.num_parameters(), m.num_active_parameters()


# Parameter groups, by how int8 weight-only quantization treats them (see jambalab.memory).
MATRIX_GROUPS = ("attention", "mamba_proj", "mlp", "experts")  # large matrices: int8-able
SMALL_GROUPS = ("embed", "lm_head", "router", "norms", "mamba_small")  # kept in 16-bit


def param_breakdown(cfg: JambaConfig) -> dict[str, int]:
    """Parameter counts per group, in closed form (no model built: fast enough to plan over thousands of configs).

    Agrees with JambaLM.on_meta(cfg).num_parameters() (tests/test_memory.py checks every preset).
    """
    d, D, N, R, F, E = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_ff, cfg.n_experts
    n_attn, n_mamba, n_moe = cfg.n_attention_layers, cfg.n_mamba_layers, cfg.n_moe_layers
    n_mlp = cfg.n_layers - n_moe if F else 0
    q_width, kv_width = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    proj_bias = (2 * D + d) if cfg.mamba_proj_bias else 0
    inner_norms = (R + 2 * N) if cfg.mamba_inner_norm == "learnable" else 0
    return {
        "embed": cfg.vocab_size * d,
        "lm_head": 0 if cfg.tie_embeddings else cfg.vocab_size * d,
        "attention": n_attn * (2 * d * q_width + 2 * d * kv_width),
        "mamba_proj": n_mamba * (d * 2 * D + D * (R + 2 * N) + R * D + D * d),
        "mamba_small": n_mamba * (D * cfg.d_conv + (D if cfg.mamba_conv_bias else 0) + D + D * N + D + proj_bias),
        "mlp": n_mlp * 3 * d * F,
        "experts": n_moe * E * 3 * d * F,
        "router": n_moe * d * E,
        "norms": d + cfg.n_layers * d * (2 if F else 1) + n_mamba * inner_norms,
    }


def param_counts_fast(cfg: JambaConfig) -> tuple[int, int]:
    """(total, active per token) from param_breakdown: the (E - K) unrouted experts of each MoE layer are inactive."""
    total = sum(param_breakdown(cfg).values())
    inactive = cfg.n_moe_layers * (cfg.n_experts - cfg.top_k) * 3 * cfg.d_model * cfg.d_ff
    return total, total - inactive
