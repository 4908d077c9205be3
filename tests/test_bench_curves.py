"""jambalab bench curves: a --quick run writes JSON and PNGs; the group's bad input fails in one line."""

import json

import pytest

from jambalab.cli import main


def test_quick_curves_write_json_and_pngs(tmp_path, capsys):
    out = tmp_path / "curves"
    argv = ["bench", "curves", "--quick", "--models", "tiny-hybrid", "--batch-sizes", "1",
            "--contexts", "16,32", "--mem-limit", "1MiB", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "(a) decode tokens/s vs batch size" in text and "(c) per-token decode ms" in text
    res = json.loads((out / "curves.json").read_text())
    for name in ("curves_batch.png", "curves_context.png", "curves_decode.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["model"] for r in res["batch"]] == ["tiny-hybrid"]
    assert all(r["decode_tok_s"] > 0 and r["peak_bytes"] > r["model_bytes"] > 0 for r in res["batch"])
    # 1 MiB is below any process: each sweep stops after its first context, the rest is skipped
    ctx = {(r["model"], r["context"]): r for r in res["context"]}
    assert ctx[("tiny-hybrid", 16)]["over_limit"] and ctx[("tiny-hybrid", 32)]["skipped"]
    trace = {r["model"]: r for r in res["decode"]}
    assert len(trace["tiny-hybrid"]["step_s"]) == res["plan"]["trace_tokens"]
    # the KV cache of the attention layer grows with every generated token
    steps = trace["tiny-hybrid"]["step_cache_bytes"]
    assert steps == sorted(steps) and steps[-1] > steps[0]


@pytest.mark.parametrize("argv, needle", [
    (["--models", "tiny-hybrid,nope"], "unknown preset"),
    (["--curves", "batch,speed"], "unknown curve"),
    (["--batch-sizes", "1,0"], "batch_sizes must be positive"),
    (["--contexts", "1,x"], "--contexts must be comma-separated integers"),
    (["--mem-limit", "80GX"], "cannot parse size"),
    (["--tokens", "-3"], "trace_tokens must be positive"),
])
def test_bench_curves_bad_input(tmp_path, capsys, argv, needle):
    assert main(["bench", "curves", "--quick", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_bench_is_a_group():
    from jambalab.cli import build_parser
    from jambalab.commands.bench import BENCHES

    assert BENCHES  # each entry adds one `jambalab bench <name>`
    args = build_parser().parse_args(["bench", "curves", "--quick"])
    assert args.bench == "curves" and args.func is not None
