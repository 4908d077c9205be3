"""`jambalab bench kernels --quick --json`: structure and sanity of the figures, never their size.

Benchmarks are programs; tests check that they run and report every figure (positive, finite),
not how fast anything is (STYLE.md habit 12).
"""

from __future__ import annotations

import json
import math

import pytest

from jambalab.bench import kernels as K
from jambalab.cli import main
from jambalab.config import JambaConfig

BENCHES = {"scan", "prefill", "train", "decode"}


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


@pytest.fixture(scope="module")
def quick_json(tmp_path_factory):
    import contextlib
    import io

    png = tmp_path_factory.mktemp("bench") / "kernels.png"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["bench", "kernels", "--quick", "--json", "--threads", "1", "--plot", str(png)])
    assert rc == 0
    return json.loads(buf.getvalue()), png


def test_quick_json_has_every_bench_and_figure(quick_json):
    res, png = quick_json
    m = res["machine"]
    for key in ("gemm_gflops", "read_gbs", "copy_gbs", "threads", "cpus"):
        assert _positive(m[key]), (key, m[key])
    rows = res["rows"]
    assert {r["bench"] for r in rows} == BENCHES
    hf = res["transformers_compared"]
    for r in rows:
        assert _positive(r["jambalab"]) and _positive(r["jambalab_s"]), r
        if r["bench"] == "scan":
            assert _positive(r["reference"]) and _positive(r["speedup_vs_reference"]), r
            assert _positive(r["extra"]["g_updates_per_s"])
        else:
            assert _positive(r["limit"]) and _positive(r["pct_of_limit"]), r
        if hf:
            assert _positive(r["transformers"]) and _positive(r["speedup"]), r
        else:
            assert r["transformers"] is None and r["speedup"] is None
    for preset in res["plan"]["presets"]:
        sizes = {r["size"] for r in rows if r["bench"] == "prefill"}
        assert {f"{preset}/{n}" for n in res["plan"]["prefill_lengths"]} <= sizes
        assert any(r["bench"] == "decode" and r["size"] == preset for r in rows)
        assert any(r["bench"] == "train" and r["size"] == preset for r in rows)
    if hf:
        # same random weights on both sides: the last-token logits agree
        diffs = [r["extra"]["max_abs_logit_diff_vs_hf"] for r in rows if r["bench"] == "prefill"]
        assert diffs and max(diffs) < 1e-3
    assert all(isinstance(t["met"], bool) for t in res["targets"])
    assert m["huge_pages"].startswith(("on (", "off (", "unknown"))
    assert png.is_file() and png.stat().st_size > 0


def test_table_lists_every_row(quick_json):
    res, _ = quick_json
    text = K.table(res)
    for r in res["rows"]:
        assert r["size"] in text
    assert "GFLOP/s" in text and "GB/s" in text and "huge pages" in text


def test_flop_and_byte_counts_follow_the_config():
    cfg = JambaConfig.from_preset("bench-hybrid")
    # matmul FLOPs dominate and grow linearly; attention adds a quadratic term
    f1, f2 = K.model_flops(cfg, 1024), K.model_flops(cfg, 2048)
    assert 2 * f1 < f2 < 2.2 * f1
    assert K.train_flops(cfg, 1, 512) > 3 * K.model_flops(cfg, 512, kept=1)
    # decode reads at least every active weight once (fp32), lm_head included
    assert K.decode_bytes(cfg, 512) > 4 * (K.matmul_params_per_token(cfg) + cfg.vocab_size * cfg.d_model)
    # a pure Mamba model counts no attention
    mamba = JambaConfig.from_preset("bench-mamba")
    assert K.model_flops(mamba, 2048) == pytest.approx(2 * K.model_flops(mamba, 1024) - 2 * mamba.d_model * mamba.vocab_size)


def test_without_transformers_prints_jambalab_only(monkeypatch, capsys):
    plan = K.Plan(presets=("tiny-mamba",), scan_shape=(1, 16, 16, 4), prefill_lengths=(8,), train_shape=(1, 8),
                  decode_prompt=4, decode_tokens=2, repeat=1, gemm_size=128, bandwidth_mib=8)
    res = K.run(plan, with_hf=False, progress=False)
    assert not res["transformers_compared"] and res["targets"] == []
    assert all(r["transformers"] is None for r in res["rows"])
    assert "tiny-mamba" in K.table(res)


def test_bad_arguments_are_one_line_errors(capsys):
    assert main(["bench", "kernels", "--quick", "--repeat", "0"]) == 2
    assert "--repeat" in capsys.readouterr().err
    assert main(["bench", "kernels", "--quick", "--presets", "no-such-preset"]) == 2


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_a_one_line_error(capsys):
    assert main(["bench", "kernels", "--quick", "--device", "cuda"]) == 2
    assert "--device cuda: this torch build or machine has no CUDA device" in capsys.readouterr().err


def test_synced_is_the_function_itself_on_the_cpu():
    from jambalab.bench import machine

    fn = lambda: 3  # noqa: E731
    assert machine.synced(fn, "cpu") is fn and machine.machine_info()["device"] == "cpu"
