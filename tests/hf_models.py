"""Tiny HF transformers models of several shapes, saved in the real format for parity tests."""

from __future__ import annotations

import torch

JAMBA_SHAPES = {
    # attention every 2nd layer at 1, MoE on odd layers, GQA 4/2
    "jamba-gqa": dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, attn_layer_period=2,
                      attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8),
    # odd sizes: MQA, head_dim 8 with 5 heads, 3 experts top-1, period 3 offset 2, attention at 0 of 4
    "jamba-mqa-odd": dict(vocab_size=97, hidden_size=40, intermediate_size=52, num_hidden_layers=5, num_attention_heads=5,
                          num_key_value_heads=1, num_experts=3, num_experts_per_tok=1, attn_layer_period=4,
                          attn_layer_offset=0, expert_layer_period=3, expert_layer_offset=2, mamba_d_state=4,
                          mamba_d_conv=3, mamba_expand=3, mamba_dt_rank=5),
    # the paper's block: 8 layers, attention at 4, MoE every 2 at 1, 8 experts top-2
    "jamba-block": dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=8, num_attention_heads=4,
                        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, attn_layer_period=8,
                        attn_layer_offset=4, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8),
    # dense FFN everywhere (num_experts=1), attention every layer: a pure Transformer without RoPE
    "jamba-dense-attn": dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, num_experts=1, num_experts_per_tok=1,
                             attn_layer_period=1, attn_layer_offset=0, expert_layer_period=1, expert_layer_offset=0),
}
MAMBA_SHAPES = {
    "mamba": dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, state_size=8),
    "mamba-odd": dict(vocab_size=101, hidden_size=24, num_hidden_layers=3, state_size=4, conv_kernel=3, expand=3,
                      time_step_rank=5, use_conv_bias=False, tie_word_embeddings=False),
}
FALCON_SHAPES = {
    "falcon": dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, state_size=8, tie_word_embeddings=False),
    "falcon-odd": dict(vocab_size=77, hidden_size=24, num_hidden_layers=3, state_size=16, expand=2, time_step_rank=3,
                       mixer_rms_eps=1e-5),
}


def build_hf(family: str, kwargs: dict, seed: int = 0):
    import transformers as tf

    cls = {"jamba": (tf.JambaConfig, tf.JambaForCausalLM), "mamba": (tf.MambaConfig, tf.MambaForCausalLM),
           "falcon_mamba": (tf.FalconMambaConfig, tf.FalconMambaForCausalLM)}[family]
    torch.manual_seed(seed)
    model = cls[1](cls[0](**kwargs)).eval()
    _perturb(model)
    return model


@torch.no_grad()
def _perturb(model) -> None:
    # HF inits norms to 1, D to 1, biases to 0: randomise them so the test sees every weight.
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if name.endswith(("norm.weight", "layernorm.weight", ".D", "conv1d.bias", "norm_f.weight")):
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def all_shapes():
    return ([("jamba", k, v) for k, v in JAMBA_SHAPES.items()] + [("mamba", k, v) for k, v in MAMBA_SHAPES.items()]
            + [("falcon_mamba", k, v) for k, v in FALCON_SHAPES.items()])
