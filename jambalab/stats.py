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
