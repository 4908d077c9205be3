import pytest

from jambalab import JambaConfig
from jambalab.errors import ConfigError
from jambalab.presets import PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid(name):
    cfg = JambaConfig.from_preset(name)
    assert cfg.name == name and len(cfg.layer_types) == cfg.n_layers


def test_unknown_preset_is_an_error():
    with pytest.raises(ConfigError, match="unknown preset 'jamba'"):
        JambaConfig.from_preset("jamba")


def test_jamba_layout_matches_paper():
    cfg = JambaConfig.from_preset("jamba-v0.1")
    assert [i for i, t in enumerate(cfg.layer_types) if t == "attention"] == [4, 12, 20, 28]  # a:m = 1:7
    assert [i for i in range(32) if cfg.is_moe(i)] == list(range(1, 32, 2))  # e = 2
    assert (cfg.n_experts, cfg.top_k, cfg.rope, cfg.d_inner, cfg.dt_rank) == (16, 2, False, 8192, 256)


def test_bench_hybrid_is_the_reference_baseline_config():
    cfg = JambaConfig.from_preset("bench-hybrid")
    assert (cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.layer_types.index("attention")) == (256, 1024, 8, 4)
    assert [i for i in range(8) if cfg.is_moe(i)] == [1, 3, 5, 7]
    assert (cfg.n_experts, cfg.top_k, cfg.d_state, cfg.expand, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (
        4, 2, 16, 2, 8, 2, 65536)


def test_family_configs():
    assert JambaConfig.from_preset("falcon-mamba-7b").family == "falcon_mamba"
    assert JambaConfig.from_preset("mamba-130m").family == "mamba"
    mixtral = JambaConfig.from_preset("mixtral-8x7b")
    assert mixtral.n_attention_layers == 32 and mixtral.n_moe_layers == 32 and mixtral.n_mamba_layers == 0


@pytest.mark.parametrize("overrides,field", [
    (dict(top_k=5, n_experts=4), "top_k"),
    (dict(n_heads=5), "n_heads"),
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(attn_layer_offset=8), "attn_layer_offset"),
    (dict(expert_layer_offset=-1), "expert_layer_offset"),
    (dict(mamba_inner_norm="layer"), "mamba_inner_norm"),
    (dict(d_model=0), "d_model"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(eos_token_id=70000), "eos_token_id"),
    (dict(d_ff=0), "d_ff"),
])
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        JambaConfig.from_preset("jamba-v0.1", **overrides)


def test_unknown_field_and_roundtrip(tmp_path):
    with pytest.raises(ConfigError, match="unknown config field"):
        JambaConfig.from_dict({"d_modle": 3})
    cfg = JambaConfig.from_preset("tiny-hybrid")
    p = tmp_path / "c.json"
    import json

    p.write_text(json.dumps(cfg.to_dict()))
    assert JambaConfig.from_file(p) == cfg


def test_replace_rederives_sizes():
    cfg = JambaConfig.from_preset("tiny-hybrid").replace(d_model=128)
    assert cfg.d_inner == 256 and cfg.dt_rank == 8
