"""benchmarks/paired_decode.py: rounds alternate a llama-bench run and the loaded jambalab decoder, the
table, JSON and plot hold every round, and bad arguments are one line. llama-bench is a stand-in script
here (CI builds no llama.cpp) that prints llama-bench's JSON and logs its calls."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import jambalab

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "paired_decode.py"

FAKE_BENCH = """#!{python}
import json, sys
args = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(" ".join(args) + "\\n")
n = int(args[args.index("-n") + 1])
print(json.dumps([{{"n_prompt": 0, "n_gen": n, "samples_ts": [{ts}], "model_size": 1, "model_n_params": 1}}]))
"""


@pytest.fixture
def setup(tmp_path):
    model = tmp_path / "tiny"
    jambalab.from_preset("tiny-hybrid", seed=0).save_pretrained(model)
    gguf = tmp_path / "tiny-q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    log = tmp_path / "calls.log"
    bench = tmp_path / "llama-bench"
    bench.write_text(FAKE_BENCH.format(python=sys.executable, log=str(log), ts=1e9))
    bench.chmod(0o755)
    return model, gguf, bench, log


def test_rounds_alternate_and_every_round_is_kept(setup, tmp_path):
    model, gguf, bench, log = setup
    out = subprocess.run([sys.executable, str(SCRIPT), "--llama-bench", str(bench), "--rounds", "3", "--tokens", "4",
                          "--pair", f"{model}:{gguf}:int8", "--pair", f"{model}:{gguf}:fp32",
                          "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    calls = log.read_text().splitlines()
    assert len(calls) == 6 and all(c.split()[c.split().index("-n") + 1] == "4" and "-p 0" in c and "-r 1" in c
                                   for c in calls)
    results = json.loads((tmp_path / "r.json").read_text())
    assert [r["precision"] for r in results] == ["int8", "fp32"]
    for r in results:
        assert len(r["jambalab"]) == len(r["llama_cpp"]) == len(r["ratios"]) == 3
        assert all(x > 0 for x in r["jambalab"]) and r["llama_cpp"] == [1e9] * 3
        assert r["ratios"] == pytest.approx([a / 1e9 for a in r["jambalab"]]) and r["ahead"] == 0
    assert "| tiny int8 / Q8_0 |" in out.stdout and "0 of 3" in out.stdout
    assert (tmp_path / "p.png").stat().st_size > 5_000


@pytest.mark.parametrize("argv,message", [
    (["--pair", "x:y:int8"], "--llama-bench None is not a file"),
    (["--llama-bench", sys.executable], "at least one --pair"),
    (["--llama-bench", sys.executable, "--pair", "nowhere:y:fp8"], "must be MODEL_DIR:GGUF:PRECISION"),
    (["--llama-bench", sys.executable, "--pair", "/:missing.gguf:int8"], "missing.gguf is not a file"),
    (["--llama-bench", sys.executable, "--rounds", "0", "--pair", "/:/:int8"], "must be >= 1"),
])
def test_bad_arguments_are_one_line(argv, message):
    out = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr


def test_a_model_jambalab_cannot_load_names_it(setup, tmp_path):
    _, gguf, bench, _ = setup
    empty = tmp_path / "empty"
    empty.mkdir()
    out = subprocess.run([sys.executable, str(SCRIPT), "--llama-bench", str(bench), "--rounds", "1",
                          "--pair", f"{empty}:{gguf}:bf16"], capture_output=True, text=True, timeout=120)
    lines = out.stderr.splitlines()
    assert out.returncode != 0 and lines[0] == "empty bf16 / Q8_0:"  # the pair's progress heading, then the error
    assert lines[1].startswith(f"paired_decode: jambalab could not load {empty} as bf16")
