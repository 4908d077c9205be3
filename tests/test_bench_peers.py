"""`jambalab bench peers`: the jambalab half on tiny shapes, the skip note without llama.cpp, the
llama-bench parsing and the side-by-side table. (llama.cpp itself is not built in CI.)"""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from jambalab.bench import peers
from jambalab.bench.llamacpp import parse_llama_bench
from jambalab.bench.machine import best_of
from jambalab.cli import main


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    """The quick shapes' checkpoints, built once by transformers (bench peers reuses them from --work)."""
    work = tmp_path_factory.mktemp("peers")
    for shape in QUICK_SHAPES:
        peers.build_checkpoint(shape, work / shape.name)
    return work


QUICK_SHAPES = peers.QUICK.shapes()


def test_checkpoints_are_transformers_bf16_in_the_real_layout(work):
    a, b = (work / s.name for s in QUICK_SHAPES)
    assert json.loads((a / "config.json").read_text())["architectures"] == ["FalconMambaForCausalLM"]
    cfg_b = json.loads((b / "config.json").read_text())
    assert cfg_b["architectures"] == ["JambaForCausalLM"] and cfg_b["num_experts"] == 4
    with safe_open(str(b / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.1.feed_forward.experts.3.down_proj.weight").dtype == torch.bfloat16
    assert peers.build_checkpoint(QUICK_SHAPES[1], b).stat().st_mtime_ns == b.stat().st_mtime_ns  # cached


def _checkpoint_bytes_per_token(path: Path, top_k: int, n_experts: int, vocab: int) -> float:
    """Independent count from the files: all tensors, one embedding row, K/E of the experts."""
    total = 0.0
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for name in f.keys():
            t = f.get_slice(name)
            n = torch.Size(t.get_shape()).numel() * 2  # bf16
            if "embed_tokens" in name or "embeddings" in name:
                n /= vocab
            elif ".experts." in name:
                n *= top_k / n_experts
            total += n
    return total


def test_jambalab_half_measures_the_tiny_hybrid(work):
    shape = QUICK_SHAPES[1]
    got = peers.measure_jambalab({"path": str(work / shape.name), "precision": "bf16", "prompt": 16, "gen": 4,
                                  "repeat": 2, "threads": 1})
    assert got["prefill"]["best"] > 0 and len(got["decode"]["samples"]) == 2
    assert 0 <= got["decode"]["spread_pct"] < 100
    want = _checkpoint_bytes_per_token(work / shape.name, 2, 4, shape.hf["vocab_size"])
    assert got["bytes_per_token"] == pytest.approx(want, rel=1e-3)


def test_without_llama_cpp_prints_a_skip_note_json_and_plot(work, tmp_path, capsys):
    png = tmp_path / "peers.png"
    assert main(["bench", "peers", "--quick", "--work", str(work), "--models", "A", "--precisions", "fp32",
                 "--json", "--plot", str(png)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["llama_cpp"] == {} and any("llama.cpp: skipped" in n for n in res["notes"])
    fp32 = res["jambalab"]["A"]["fp32"]  # measured in a child process, like every figure
    assert fp32["prefill"]["best"] > 0 and fp32["decode"]["best"] > 0 and res["machine"]["read_gbs"] > 0
    assert png.stat().st_size > 1000
    text = peers.table(res)
    assert "llama.cpp: skipped" in text and "| fp32" in text and "A decode 8" in text


def test_a_precision_this_jambalab_cannot_load_is_reported_not_raised(work):
    got = peers.measure_jambalab({"path": str(work / QUICK_SHAPES[0].name), "precision": "int4", "prompt": 8,
                                  "gen": 2, "repeat": 1, "threads": 1})
    assert "decode" in got or "NotImplemented" in got["unsupported"] or "UnsupportedError" in got["unsupported"]


def test_llama_bench_json_is_read_as_best_and_spread():
    records = [{"n_prompt": 512, "n_gen": 0, "samples_ts": [60.0, 62.0, 58.0], "model_size": 10, "model_n_params": 5},
               {"n_prompt": 0, "n_gen": 64, "samples_ts": [5.0, 5.4, 5.2], "model_size": 10, "model_n_params": 5}]
    got = parse_llama_bench(records)
    assert got["prefill"] == [60.0, 62.0, 58.0] and got["decode"] == [5.0, 5.4, 5.2]
    assert got["model_size"] == 10 and got["params"] == 5
    fig = best_of(got["decode"])
    assert fig["best"] == 5.4 and fig["spread_pct"] == pytest.approx(100 * 0.4 / 5.4)


def test_side_by_side_table_gives_ratios_and_bandwidth_shares():
    fig = best_of
    res = {"plan": {"precisions": ["fp32", "int4"], "prompt": 512, "gen": 64, "repeat": 3, "threads": 2},
           "machine": {"cpu": "x", "cpus": 2, "threads": 2, "read_gbs": 20.0},
           "models": {"A": {"name": "a", "path": "p", "params": 1_160_000_000}},
           "jambalab": {"A": {"fp32": {"prefill": fig([150.0]), "decode": fig([5.0]), "bytes_per_token": 2e9},
                              "int4": {"unsupported": "UnsupportedError: no 4-bit"}}},
           "llama_cpp": {"A": {"F32": {"prefill": fig([60.0]), "decode": fig([4.0]), "bytes_per_token": 4e9},
                               "Q4_0": {"prefill": fig([70.0]), "decode": fig([20.0]), "bytes_per_token": 6e8},
                               "Q4_K_M": {"error": "conversion failed"}}},
           "parity": {"A": {"tokens_equal": 32, "tokens": 32, "first_logits_max_abs_diff": 3e-4, "logit_std": 1.0}},
           "notes": []}
    text = peers.table(res)
    assert "150 / 60.0 (2.50x)" in text and "5.00 / 4.00 (1.25x)" in text
    assert "| int4 / Q4_0" in text and "n/a / 70.0" in text
    assert "50% / 80%" in text  # 2e9 B * 5 tok/s / 20 GB/s, 4e9 * 4 / 20e9
    assert "cannot load it (UnsupportedError: no 4-bit)" in text and "Q4_K_M: failed: conversion failed" in text
    assert "greedy tokens equal for 32 of 32" in text
    assert "instruction set held below" not in text
    res["machine"]["isa_limits"] = {"JAMBALAB_MARCH": "x86-64-v3", "ATEN_CPU_CAPABILITY": "avx2"}
    assert "held below this CPU's for jambalab (llama.cpp: as its build): JAMBALAB_MARCH=x86-64-v3, " \
           "ATEN_CPU_CAPABILITY=avx2" in peers.table(res)


def test_isa_limits_are_recorded_with_the_machine(monkeypatch):
    from jambalab.bench import machine

    for k in machine.ISA_LIMIT_ENV:
        monkeypatch.delenv(k, raising=False)
    assert machine.machine_info()["isa_limits"] == {}
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("JAMBALAB_MARCH", "  ")  # blank: not a limit
    assert machine.machine_info()["isa_limits"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_rounds_also_give_the_ratio_of_their_medians(tmp_path):
    """A best of 3 rewards the engine that met the VM's fastest moment; the medians' ratio is printed too,
    and the plot draws each median with its rounds' min-max."""
    fig = best_of
    res = {"plan": {"precisions": ["bf16"], "prompt": 512, "gen": 64, "repeat": 3, "threads": 2},
           "machine": {"cpu": "x", "cpus": 2, "threads": 2, "read_gbs": 20.0},
           "models": {"A": {"name": "a", "path": "p", "params": 1_160_000_000}},
           "jambalab": {"A": {"bf16": {"prefill": fig([300.0, 200.0, 240.0]), "decode": fig([16.0, 15.0, 16.5]),
                                       "bytes_per_token": 2e9}}},
           "llama_cpp": {"A": {"BF16": {"prefill": fig([150.0, 100.0, 120.0]), "decode": fig([22.0, 15.0, 16.0]),
                                        "bytes_per_token": 2e9}}},
           "parity": {}, "notes": []}
    text = peers.table(res)
    assert "16.5 / 22.0 (0.75x)" in text  # best of 3
    assert "ratio of the medians of the 3 rounds" in text
    assert "| bf16 / BF16 | 2.00x     | 1.00x    |" in text  # 240 / 120, 16.0 / 16.0
    assert peers._whiskers([res["jambalab"]["A"]["bf16"], None], "decode") == ([16.0, 0.0], [1.0, 0.0], [0.5, 0.0])
    peers.plot(res, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000
    res["plan"]["repeat"] = 1
    assert "medians" not in peers.table(res)


@pytest.mark.parametrize("argv,match", [
    (["--llama-bench", "/bin/true"], "give both"),
    (["--llama-bench", "/nonexistent/llama-bench", "--llama-cpp-dir", "/tmp"], "not an executable"),
    (["--precisions", "fp8"], "unknown"),
    (["--layers", "0"], "--layers must be >= 1"),
])
def test_bad_arguments_are_one_line(argv, match, capsys):
    assert main(["bench", "peers", "--quick", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err


def test_converter_tokenizer_is_a_working_sentencepiece_model(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from jambalab.bench.llamacpp import write_tokenizer

    path = write_tokenizer(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert sp.vocab_size() == 1000 and sp.bos_id() == 1 and sp.eos_id() == 2
    text = "def forward(self, x): # (B, L, d) ü"
    assert sp.decode(sp.encode(text)) == text  # byte fallback: any text round-trips
    assert write_tokenizer(tmp_path) == path  # kept, not retrained


LLAMA_CPP_DIR = os.environ.get("JAMBALAB_LLAMA_CPP_DIR")  # a built tree: build/bin/llama-bench, llama-quantize


@pytest.mark.slow
@pytest.mark.skipif(not LLAMA_CPP_DIR, reason="set JAMBALAB_LLAMA_CPP_DIR to a llama.cpp tree built as in docs/precision.md")
def test_quick_run_against_llama_cpp_end_to_end(work, capsys):
    tree = Path(LLAMA_CPP_DIR)
    assert main(["bench", "peers", "--quick", "--work", str(work), "--llama-bench", str(tree / "build/bin/llama-bench"),
                 "--llama-cpp-dir", str(tree), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("A", "B"):
        for kind in ("F32", "BF16", "Q8_0", "Q4_0", "Q4_K_M"):
            got = res["llama_cpp"][key][kind]
            assert got["prefill"]["best"] > 0 and got["decode"]["best"] > 0 and got["bytes_per_token"] > 0, got
        assert res["parity"][key].get("tokens_equal") == res["parity"][key].get("tokens", -1), res["parity"][key]


def test_rounds_interleave_the_engines_pair_by_pair(work, monkeypatch):
    """Each round measures a jambalab precision, then its llama.cpp file(s) right after (BF16 once, after
    bf16); each engine keeps the best of its rounds; a failing file is reported, not retried."""
    calls = []

    def fake_child(what, spec, timeout_s):
        if what == "bandwidth":
            return {"read_gbs": 30.0}
        calls.append(("jambalab", spec["precision"]))
        rate = 10.0 + len(calls)
        return {"prefill": best_of([rate]), "decode": best_of([rate / 10]), "bytes_per_token": 1}

    def fake_bench(llama, gguf, threads, prompt, gen, repeat, timeout_s):
        calls.append(("llama.cpp", gguf))
        assert repeat == 1
        if gguf == "Q4_K_M":
            raise RuntimeError("llama-bench failed")
        return {"prefill": [20.0 + len(calls)], "decode": [2.0]}

    monkeypatch.setattr(peers, "run_child", fake_child)
    monkeypatch.setattr(peers, "llama_bench", fake_bench)
    monkeypatch.setattr(peers, "gguf_file", lambda llama, path, out, kind, *a: kind)
    monkeypatch.setattr(peers, "gguf_bytes_per_token", lambda *a: 7)
    monkeypatch.setattr(peers, "_parity", lambda *a: {"skipped": "test"})
    plan = peers.replace(peers.QUICK, models=("B",), repeat=2)
    res = peers.run(plan, work, llama=object(), progress=False)
    one_round = [("jambalab", "fp32"), ("llama.cpp", "F32"), ("jambalab", "bf16"), ("llama.cpp", "BF16"),
                 ("jambalab", "bf16w"), ("jambalab", "int8"), ("llama.cpp", "Q8_0"), ("jambalab", "int4"),
                 ("llama.cpp", "Q4_0"), ("llama.cpp", "Q4_K_M")]
    assert calls == one_round + [c for c in one_round if c != ("llama.cpp", "Q4_K_M")]
    ours, theirs = res["jambalab"]["B"], res["llama_cpp"]["B"]
    assert len(ours["fp32"]["prefill"]["samples"]) == 2 and ours["fp32"]["prefill"]["best"] == max(
        ours["fp32"]["prefill"]["samples"])
    assert theirs["F32"]["prefill"]["samples"] == [22.0, 32.0] and theirs["F32"]["bytes_per_token"] == 7
    assert theirs["Q4_K_M"] == {"error": "llama-bench failed"}
