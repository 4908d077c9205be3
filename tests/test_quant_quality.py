"""benchmarks/quant_quality.py's core on a tiny model and a short text: every precision is measured
(or skipped with the reason), the numbers are finite and ordered as they must be, and the
transformers-saved checkpoints' drift is reported for every precision."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

import jambalab

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def qq():
    spec = importlib.util.spec_from_file_location("quant_quality", ROOT / "benchmarks" / "quant_quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["quant_quality"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("quant_quality", None)


@pytest.fixture(scope="module")
def text_ids():
    data = (ROOT / "jambalab" / "evaluate.py").read_bytes()[:512]  # byte-level: one token per byte
    return torch.tensor(list(data)), len(data) - 1


@pytest.fixture(scope="module")
def lm_rows(qq, text_ids):
    model = jambalab.from_preset("tiny-hybrid", d_model=128, d_ff=128, vocab_size=256)  # widths divisible by 128
    return qq.measure_lm(model, *text_ids, qq.variants(list(qq.PRECISIONS), ["bf16"]), seq_len=128, drift_windows=1)


def test_variants_quantize_once_per_base(qq):
    labels = [label for label, _, _ in qq.variants(["fp32", "bf16", "int8", "int4-g64"], ["bf16", "fp32"])]
    assert labels == ["fp32", "bf16", "int8/bf16", "int8/fp32", "int4-g64/bf16", "int4-g64/fp32"]


def test_every_precision_is_measured_on_a_tiny_model(qq, text_ids, lm_rows):
    rows = lm_rows
    assert [r["precision"] for r in rows] == ["fp32", "bf16", "bf16w/fp32", "int8/bf16", "int8-g128/bf16", "int4-g32/bf16",
                                              "int4-g64/bf16", "int4-g128/bf16"]
    by = {r["precision"]: r for r in rows}
    for r in rows:
        assert "skipped" not in r, r
        assert r["tokens"] == text_ids[0].numel() - 1
        assert all(math.isfinite(r[k]) for k in ("val_loss", "ppl", "bits_per_byte", "ppl_vs_bf16"))
        drift = r["drift_vs_fp32"]
        if r["precision"] == "fp32":
            assert drift is None
        else:
            assert set(drift) == {"rel_l2", "max_abs", "kl", "top1_agree"}
            assert 0 < drift["rel_l2"] < 1 and drift["kl"] >= 0 and 0 <= drift["top1_agree"] <= 1
        assert ("target" in r) == (r["scheme"] in ("int8", "int4"))
    assert by["bf16"]["ppl_vs_bf16"] == 0
    # fewer bits, larger drift; smaller groups, smaller drift; fewer bytes
    assert by["bf16"]["drift_vs_fp32"]["rel_l2"] < by["int8/bf16"]["drift_vs_fp32"]["rel_l2"]
    assert by["int8/bf16"]["drift_vs_fp32"]["rel_l2"] < by["int4-g32/bf16"]["drift_vs_fp32"]["rel_l2"]
    assert by["int4-g32/bf16"]["drift_vs_fp32"]["rel_l2"] < by["int4-g128/bf16"]["drift_vs_fp32"]["rel_l2"]
    assert by["int4-g32/bf16"]["weight_bytes"] < by["int8/bf16"]["weight_bytes"] < by["bf16"]["weight_bytes"]
    assert by["bf16"]["weight_bytes"] < by["bf16w/fp32"]["weight_bytes"] < by["fp32"]["weight_bytes"]
    assert by["bf16w/fp32"]["drift_vs_fp32"]["rel_l2"] < by["int8/bf16"]["drift_vs_fp32"]["rel_l2"]
    assert any(line.startswith("int4-g32/bf16") for line in qq.format_lm(rows))


def test_a_group_size_that_does_not_divide_is_reported_not_raised(qq, text_ids):
    model = jambalab.from_preset("tiny-hybrid")  # d_model 64: groups of 128 do not fit
    rows = qq.measure_lm(model, *text_ids, qq.variants(["bf16", "int4-g128"], ["bf16"]), seq_len=128)
    assert "ppl" in rows[0] and "does not divide" in rows[1]["skipped"]
    assert "skipped" in qq.format_lm(rows)[-1]


def test_checkpoint_drift_covers_both_families(qq, tmp_path, lm_rows):
    pytest.importorskip("transformers")
    todo = qq.variants(["fp32", "bf16", "int8", "int4-g32"], ["bf16"])
    ckpts = qq.measure_checkpoints(todo, tmp_path, length=16, batch=1)
    assert [c["family"] for c in ckpts] == ["jamba", "falcon_mamba"]
    for c in ckpts:
        assert [r["precision"] for r in c["rows"]] == ["bf16", "int8/bf16", "int4-g32/bf16"]
        for r in c["rows"]:
            assert all(math.isfinite(r[k]) for k in ("rel_l2", "max_abs", "kl", "top1_agree"))
            assert r["weight_bytes"] < c["fp32_weight_bytes"]
        assert c["rows"][1]["rel_l2"] < c["rows"][2]["rel_l2"]  # int8 drifts less than 4-bit
    result = {"model": "tiny", "lm": lm_rows, "checkpoints": ckpts}
    assert len(qq.format_checkpoints(ckpts)) == 2 * (2 + 3)
    qq.plot(result, tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 0
