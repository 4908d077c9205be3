"""Named configs: full-size shapes (for counting and memory planning) and small
ones (tests, benchmarks, training on a CPU). Lookup is exact; see
JambaConfig.from_preset.
"""

from __future__ import annotations

from typing import Any

# Shared shapes --------------------------------------------------------------------------
_JAMBA = dict(attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2, expert_layer_offset=1,
              n_experts=16, top_k=2, vocab_size=65536, d_state=16, d_conv=4, expand=2,
              mamba_inner_norm="learnable", norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Pure Transformers: every layer attention, dense FFN, RoPE (the Llama/Mistral family).
_DENSE = dict(attn_layer_period=1, attn_layer_offset=0, expert_layer_period=0, expert_layer_offset=0,
              n_experts=1, top_k=1, rope=True, norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_MIXTRAL = dict(_DENSE, expert_layer_period=1, expert_layer_offset=0, n_experts=8, top_k=2)
# Pure Mamba (HF MambaForCausalLM): single-sublayer blocks, fp32 residual stream.
_MAMBA = dict(attn_layer_period=0, attn_layer_offset=0, expert_layer_period=0, expert_layer_offset=0,
              n_experts=1, top_k=1, d_ff=0, d_state=16, d_conv=4, expand=2, mamba_inner_norm="none",
              norm_eps=1e-5, residual_in_fp32=True, tie_embeddings=True,
              pad_token_id=0, bos_token_id=0, eos_token_id=0)

PRESETS: dict[str, dict[str, Any]] = {
    # ---- full-size shapes ---------------------------------------------------------------
    "jamba-v0.1": dict(_JAMBA, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336),
    "jamba-1.5-mini": dict(_JAMBA, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336),
    "jamba-1.5-large": dict(_JAMBA, d_model=8192, n_layers=72, n_heads=64, n_kv_heads=8, d_ff=24576),
    "falcon-mamba-7b": dict(_MAMBA, vocab_size=65024, d_model=4096, n_layers=64, d_inner=8192, dt_rank=256,
                            mamba_inner_norm="weightless", tie_embeddings=False, pad_token_id=0,
                            bos_token_id=0, eos_token_id=11),
    "mamba-130m": dict(_MAMBA, vocab_size=50280, d_model=768, n_layers=24),
    "llama-2-7b": dict(_DENSE, vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008),
    "llama-2-70b": dict(_DENSE, vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672),
    "llama-3.1-8b": dict(_DENSE, vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                         d_ff=14336, rope_theta=500000.0),
    "llama-3.1-70b": dict(_DENSE, vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                          d_ff=28672, rope_theta=500000.0),
    "llama-3.1-405b": dict(_DENSE, vocab_size=128256, d_model=16384, n_layers=126, n_heads=128, n_kv_heads=8,
                           d_ff=53248, rope_theta=500000.0),
    "mistral-7b": dict(_DENSE, vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336),
    "mistral-large-2": dict(_DENSE, vocab_size=32768, d_model=12288, n_layers=88, n_heads=96, n_kv_heads=8,
                            d_ff=28672, rope_theta=1000000.0),
    "mixtral-8x7b": dict(_MIXTRAL, vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                         d_ff=14336, rope_theta=1000000.0),
    "mixtral-8x22b": dict(_MIXTRAL, vocab_size=32768, d_model=6144, n_layers=56, n_heads=48, n_kv_heads=8,
                          d_ff=16384, rope_theta=1000000.0),
    # ---- benchmark shapes (REFERENCE.md baseline config) ---------------------------------
    "bench-hybrid": dict(_JAMBA, vocab_size=65536, d_model=256, n_layers=8, n_heads=8, n_kv_heads=2, d_ff=1024,
                         n_experts=4, top_k=2),
    "bench-mamba": dict(_MAMBA, vocab_size=65536, d_model=256, n_layers=8),
    # ---- `jambalab bench curves`: four architectures with EQUAL ACTIVE parameters (12.4M +-0.5%) ----
    # d_model 256, 8 layers, vocab 4096 (a small vocab keeps the layers, not lm_head, the cost);
    # the FFN width (or d_inner for pure Mamba) is what equalises the active counts.
    "curves-hybrid": dict(_JAMBA, vocab_size=4096, d_model=256, n_layers=8, n_heads=8, n_kv_heads=2, d_ff=768,
                          n_experts=8, top_k=2),
    "curves-transformer": dict(_DENSE, vocab_size=4096, d_model=256, n_layers=8, n_heads=8, n_kv_heads=2,
                               d_ff=1472),
    "curves-mixtral": dict(_MIXTRAL, vocab_size=4096, d_model=256, n_layers=8, n_heads=8, n_kv_heads=2,
                           d_ff=736),
    "curves-mamba": dict(_MAMBA, vocab_size=4096, d_model=256, n_layers=8, d_inner=1664),
    # ---- small shapes for training on a CPU ----------------------------------------------
    "small-hybrid": dict(_JAMBA, vocab_size=256, d_model=256, n_layers=8, n_heads=8, n_kv_heads=2, d_ff=768,
                         n_experts=4, top_k=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "small-transformer": dict(_JAMBA, attn_layer_period=1, attn_layer_offset=0, vocab_size=256, d_model=256,
                              n_layers=8, n_heads=8, n_kv_heads=2, d_ff=768, n_experts=4, top_k=2),
    # The main job's model (`jambalab train`): the paper's 8-layer block (1 attention : 7 Mamba, MoE
    # every 2nd layer, 4 experts top-2) at width 128, sized so a few CPU minutes see ~1M bytes.
    "cpu-hybrid": dict(_JAMBA, vocab_size=256, d_model=128, n_layers=8, n_heads=4, n_kv_heads=2, d_ff=384,
                       n_experts=4, top_k=2),
    # ---- tiny shapes for tests -------------------------------------------------------------
    "tiny-hybrid": dict(_JAMBA, vocab_size=512, d_model=64, n_layers=4, attn_layer_period=4, attn_layer_offset=2,
                        n_heads=4, n_kv_heads=2, d_ff=96, n_experts=4, top_k=2, d_state=8),
    "tiny-transformer": dict(_DENSE, rope=False, vocab_size=512, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2,
                             d_ff=96),
    "tiny-mixtral": dict(_MIXTRAL, vocab_size=512, d_model=64, n_layers=3, n_heads=4, n_kv_heads=1, d_ff=96,
                         n_experts=4),
    "tiny-mamba": dict(_MAMBA, vocab_size=512, d_model=64, n_layers=3, d_state=8),
    "tiny-falcon-mamba": dict(_MAMBA, vocab_size=512, d_model=64, n_layers=3, d_state=8,
                              mamba_inner_norm="weightless", tie_embeddings=False),
}
