"""jambalab bench serve: a --quick run prints JSON with every workload and writes a PNG; bad input fails in one line."""

import json

import pytest

from jambalab.bench.serve import matched_transformer_config
from jambalab.cli import main
from jambalab.config import JambaConfig
from jambalab.model import JambaLM


def test_quick_bench_serve_writes_json_and_png(tmp_path, capsys):
    png = tmp_path / "serve.png"
    argv = ["bench", "serve", "--quick", "--json", "--plot", str(png), "--concurrency", "1,2", "--stall-prompt", "64"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [(r["arch"], r["concurrency"]) for r in res["concurrency"]] == [
        ("hybrid", 1), ("hybrid", 2), ("transformer", 1), ("transformer", 2)]
    assert all(r["tok_s"] > 0 and r["ttft_median_s"] > 0 for r in res["concurrency"])
    chat, plan = res["chat"], res["plan"]
    assert set(chat) == {"off", "on", "lru-small", "marconi-small", "small_budget_bytes"}
    assert chat["off"]["hit_rate"] == 0 and chat["on"]["hit_rate"] > 0.5
    # with the cache, a later turn prefills only the new user message + the reply's last token, per conversation
    later = chat["on"]["turns"][1]
    assert later["prefill_computed"] == plan["conversations"] * (plan["user"] + 1)
    assert chat["off"]["turns"][1]["prefill_computed"] == chat["off"]["turns"][1]["prompt_tokens"]
    assert chat["lru-small"]["evictions"] > 0 and chat["marconi-small"]["evictions"] > 0
    # shared documents between one-off requests: LRU lets the one-offs flush the documents, Marconi keeps them
    docs = res["docs"]
    assert docs["lru"]["evictions"] > 0 and docs["marconi"]["evictions"] > 0
    assert docs["marconi"]["doc_hit_rate"] > docs["lru"]["doc_hit_rate"]
    assert docs["marconi"]["prefill"] < docs["lru"]["prefill"]
    assert res["stall"]["prompt"] == 64 and res["stall"]["max_gap_s"] > 0
    assert {t["target"] for t in res["targets"]} >= {"longest stream stall <= one first chunk + one decode step (s)"}


def test_matched_transformer_has_the_hybrids_active_parameters():
    hybrid = JambaLM.on_meta(JambaConfig.from_preset("bench-hybrid")).num_active_parameters()
    cfg = matched_transformer_config("bench-hybrid")
    assert all(cfg.is_attention(i) for i in range(cfg.n_layers)) and cfg.n_experts == 1
    assert abs(JambaLM.on_meta(cfg).num_active_parameters() / hybrid - 1) < 0.005


@pytest.mark.parametrize("argv, needle", [
    (["--workloads", "chat,speed"], "unknown workload"),
    (["--hybrid", "nope"], "unknown preset"),
    (["--concurrency", "1,x"], "--concurrency must be comma-separated integers"),
    (["--concurrency", "0"], "concurrency must be positive"),
    (["--stall-prompt", "-5"], "--stall-prompt must be positive"),
])
def test_bench_serve_bad_input(capsys, argv, needle):
    assert main(["bench", "serve", "--quick", *argv]) != 0
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
