"""jambalab memory: the papers' Table 1 and Figure 2, the planner, budget inversion, bad input."""

import json

import pytest
import torch

from jambalab import JambaConfig, JambaLM
from jambalab.cli import main
from jambalab.errors import ConfigError, InputError
from jambalab.memory import (GiB, UNBOUNDED, activation_bytes, kv_cache_bytes, mamba_state_bytes, max_batch,
                             max_context, memory_report, parse_size, weight_bytes)
from jambalab.memory_paper import CHUNKED, HF_2024, ONE_PASS, figure2, table1
from jambalab.planner import PAPER_CHOICE, hybrid_config, plan
from jambalab.presets import PRESETS
from jambalab.stats import MATRIX_GROUPS, param_breakdown, param_counts_fast


def run_json(capsys, *argv) -> dict:
    assert main(["memory", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ---- the done-when numbers --------------------------------------------------------------
@pytest.mark.parametrize("preset, gib", [("jamba-v0.1", 4), ("llama-2-7b", 128), ("mistral-7b", 32),
                                         ("mixtral-8x7b", 32)])
def test_cli_kv_cache_at_256k(capsys, preset, gib):
    d = run_json(capsys, "--preset", preset, "--context", "262144")
    assert d["kv_cache_bytes"] == gib * GiB
    for key in ("ssm_state_bytes", "weight_bytes", "params_total", "params_active", "total_bytes"):
        assert key in d


def test_table1_rows_exact():
    rows = {r["preset"]: r for r in table1()}
    for preset, gib in [("llama-2-7b", 128), ("mistral-7b", 32), ("mixtral-8x7b", 32), ("jamba-v0.1", 4),
                        ("llama-3.1-8b", 32), ("mixtral-8x22b", 56), ("mistral-large-2", 88),
                        ("llama-3.1-70b", 80), ("jamba-1.5-large", 9)]:
        assert rows[preset]["kv_cache_bytes"] == gib * GiB and rows[preset]["agrees"]
    # The one row that differs, and says why: 126 layers x 8 KV heads x 128 x 2 x 2 bytes x 256K.
    r405 = rows["llama-3.1-405b"]
    assert r405["kv_cache_bytes"] == 126 * GiB and r405["paper_kv_gb"] == 252
    assert not r405["agrees"] and "126" in r405["note"]
    for r in rows.values():  # parameter counts agree with the papers' to 2%
        assert abs(r["params_total"] / 1e9 - r["paper_params_total_b"]) / r["paper_params_total_b"] < 0.02
        assert abs(r["params_active"] / 1e9 - r["paper_params_active_b"]) / r["paper_params_active_b"] < 0.02


# ---- Figure 2 -----------------------------------------------------------------------------
def test_figure2_paper_setting():
    """One-pass prefill (the paper's setting as we read it): the ratios land within a factor 1.5 of
    the paper's, where the KV-only (chunked) reading is 3.5x and 6x off.

    The paper gives only rounded ratios of a measurement of 2024 implementations; docs/memory.md
    explains why no single setting gives exactly 2.0 and 7.0. Ours: 1.41x and 7.48x.
    """
    rows = {r["preset"]: r for r in figure2(ONE_PASS)}
    for preset, paper in [("mixtral-8x7b", 2), ("llama-2-70b", 7)]:
        assert rows[preset]["paper_ratio"] == paper
        assert 1 / 1.5 < rows[preset]["jamba_ratio"] / paper < 1.5, rows[preset]
    assert rows["jamba-v0.1"]["max_context"] > rows["mixtral-8x7b"]["max_context"] > rows["llama-2-70b"]["max_context"]
    # the HF-2024 prompt logits cost the Transformers dearly: Jamba's lead grows
    hf = {r["preset"]: r for r in figure2(HF_2024)}
    assert hf["mixtral-8x7b"]["jamba_ratio"] > rows["mixtral-8x7b"]["jamba_ratio"]


def test_figure2_chunked_is_kv_bound():
    rows = {r["preset"]: r for r in figure2(CHUNKED)}
    # With chunked prefill only the KV cache grows: Jamba's 8x smaller KV shows through.
    assert 6 < rows["mixtral-8x7b"]["jamba_ratio"] < 8
    assert rows["llama-2-70b"]["jamba_ratio"] > 30


def test_paper_cli_prints_both(capsys):
    assert main(["memory", "--paper"]) == 0
    out = capsys.readouterr().out
    assert "DIFFERS" in out and "Figure 2" in out and "one-pass" in out and "chunked" in out


# ---- counting and conventions ---------------------------------------------------------------
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_closed_form_counts_match_meta(preset):
    cfg = JambaConfig.from_preset(preset)
    m = JambaLM.on_meta(cfg)
    assert param_counts_fast(cfg) == (m.num_parameters(), m.num_active_parameters())


def test_closed_form_counts_match_meta_variants():
    cfg = JambaConfig.from_preset("tiny-hybrid", mamba_proj_bias=True, mamba_conv_bias=False, tie_embeddings=True,
                                  mamba_inner_norm="none")
    m = JambaLM.on_meta(cfg)
    assert param_counts_fast(cfg) == (m.num_parameters(), m.num_active_parameters())


def test_int8_convention():
    cfg = JambaConfig.from_preset("jamba-v0.1")
    g = param_breakdown(cfg)
    big = sum(g[k] for k in MATRIX_GROUPS)
    assert weight_bytes(cfg, "int8") == big + 2 * (sum(g.values()) - big)
    assert weight_bytes(cfg, "bf16") == 2 * sum(g.values()) == weight_bytes(cfg, "fp32") // 2
    # int8 KV stays 16-bit (the paper), so int8 and bf16 differ only in the weights
    a, b = memory_report(cfg, 4096, 2, "int8"), memory_report(cfg, 4096, 2, "bf16")
    assert a.kv_cache_bytes == b.kv_cache_bytes and a.weight_bytes < b.weight_bytes


def test_cache_bytes_match_the_model_cache():
    cfg = JambaConfig.from_preset("tiny-hybrid")
    model = JambaLM.from_config(cfg, seed=0)
    cache = model.allocate_cache(3)
    with torch.no_grad():
        model(torch.randint(3, 100, (3, 10)), cache=cache, logits_to_keep=1)
    assert cache.kv_bytes() == kv_cache_bytes(cfg, 10, 3, "fp32")
    assert cache.state_bytes() == mamba_state_bytes(cfg, 3, "fp32")


def test_activation_estimate_against_measured_peak():
    """The estimate against a measured peak (fresh process, peak RSS above the baseline): loose factor."""
    from jambalab.bench.probe import run_in_child

    r = run_in_child({"preset": "small-hybrid", "context": 512, "chunk": 512, "decode": 1}, timeout_s=120)
    assert "error" not in r, r
    measured = r["prefill_peak_bytes"] - r["baseline_bytes"]
    estimate = activation_bytes(JambaConfig.from_preset("small-hybrid"), 512, 1, "fp32")
    assert 0.5 < measured / estimate < 2, (measured, estimate)


# ---- budget inversion ------------------------------------------------------------------------
@pytest.mark.parametrize("preset, dtype, chunk", [("jamba-v0.1", "int8", 2048), ("mixtral-8x7b", "bf16", 2048),
                                                  ("llama-2-70b", "int8", None), ("jamba-v0.1", "bf16", None)])
def test_inversion_consistent_with_forward(preset, dtype, chunk):
    cfg = JambaConfig.from_preset(preset)
    budget = parse_size("160GiB")
    def total(context: int, batch: int) -> int:
        return memory_report(cfg, context, batch, dtype, chunk).total_bytes

    c = max_context(cfg, budget, 2, dtype, chunk)
    assert total(c, 2) <= budget < total(c + 1, 2)
    b = max_batch(cfg, budget, 32768, dtype, chunk)
    assert total(32768, b) <= budget < total(32768, b + 1)


def test_pure_mamba_context_is_unbounded():
    cfg = JambaConfig.from_preset("falcon-mamba-7b")
    assert max_context(cfg, parse_size("80GB"), 1, "bf16") == UNBOUNDED
    # ...but not when the whole prompt goes through one forward call
    assert max_context(cfg, parse_size("80GB"), 1, "bf16", prefill_chunk=None) > 0


def test_cli_budget(capsys):
    d = run_json(capsys, "--preset", "jamba-v0.1", "--dtype", "int8", "--budget", "80GiB")
    assert d["fits"] and d["max_batch"] >= 1 and d["max_context"] > 262144


# ---- the planner -------------------------------------------------------------------------------
def test_planner_includes_the_papers_choice():
    budget = parse_size("80GiB")
    cands = plan(budget, 262144, 12 * 10**9, 1, "int8")
    rank = next(i for i, c in enumerate(cands) if c.is_paper_choice())
    assert rank < 20  # printed by default
    assert all(c.report.total_bytes <= 0.75 * budget for c in cands)  # the default 25% headroom
    assert all(abs(c.report.params_active - 12e9) <= 0.15 * 12e9 for c in cands)
    # with no headroom the paper's choice is still an answer, among bigger ones that fill the GPU
    assert any(c.is_paper_choice() for c in plan(budget, 262144, 12 * 10**9, 1, "int8", headroom=0.0))


def test_planner_paper_choice_is_jamba():
    k = PAPER_CHOICE
    cfg = hybrid_config((k["a"], k["m"]), k["e"], k["n"], k["K"], k["n_layers"], k["d_model"])
    assert cfg.to_dict() | {"name": ""} == JambaConfig.from_preset("jamba-v0.1").to_dict() | {"name": ""}


def test_planner_cli(capsys):
    d = run_json(capsys, "--plan", "--budget", "80GiB", "--context", "256K", "--active", "12B", "--dtype", "int8")
    assert any(r["paper_choice"] for r in d["candidates"])


# ---- bad input ---------------------------------------------------------------------------------
def test_cli_model_dir_reads_config_json(tmp_path, capsys):
    from jambalab.hf import to_hf_config

    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(JambaConfig.from_preset("jamba-v0.1"),
                                                                  torch.bfloat16)))
    d = run_json(capsys, "--model", str(tmp_path), "--context", "256K")
    assert d["kv_cache_bytes"] == 4 * GiB and d["params_total"] == 51570323328


@pytest.mark.parametrize("text", ["80GX", "", "GB", "-5GB", "0", "eighty"])
def test_parse_size_rejects(text):
    with pytest.raises(InputError):
        parse_size(text)


def test_parse_size_units():
    assert parse_size("80GB") == 80 * 10**9 and parse_size("80GiB") == 80 * 2**30 and parse_size("1.5k") == 1500


def test_bad_input_errors():
    cfg = JambaConfig.from_preset("jamba-v0.1")
    with pytest.raises(ConfigError, match="unknown preset"):
        JambaConfig.from_preset("jamba-v9")
    with pytest.raises(InputError, match="smaller than the"):
        max_context(cfg, parse_size("10GiB"), 1, "bf16")
    for context, batch in [(0, 1), (-4, 1), (1024, 0), (1024, -1)]:
        with pytest.raises(InputError):
            memory_report(cfg, context, batch)
    with pytest.raises(InputError):
        memory_report(cfg, 1024, 1, "int4")


@pytest.mark.parametrize("argv, needle", [
    (["--preset", "nope"], "unknown preset"),
    (["--preset", "jamba-v0.1", "--budget", "80GX"], "cannot parse size"),
    (["--preset", "jamba-v0.1", "--budget", "20GB"], "smaller than the"),
    (["--preset", "jamba-v0.1", "--context", "0"], "context must be a positive"),
    (["--preset", "jamba-v0.1", "--context", "-8"], "context must be a positive"),
    (["--preset", "jamba-v0.1", "--batch", "0"], "batch must be a positive"),
    (["--preset", "jamba-v0.1", "--dtype", "fp8"], "dtype"),
    (["--plan", "--context", "1024"], "needs --budget"),
    (["--preset", "jamba-v0.1", "--prefill-chunk", "-1"], "prefill-chunk"),
])
def test_cli_bad_input_one_line(capsys, argv, needle):
    assert main(["memory", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
