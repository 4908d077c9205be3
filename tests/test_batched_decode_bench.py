"""benchmarks/batched_decode.py: every precision and row count gets a positive figure, the program
prints its table and writes its plot and JSON, and bad arguments are one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "batched_decode.py"


def test_table_json_and_plot_for_each_precision_and_row_count(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny-hybrid", "--precisions", "fp32,bf16,int4",
                          "--rows", "1,6", "--steps", "2", "--plot", str(tmp_path / "p.png"),
                          "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [(r["precision"], r["rows"]) for r in rows] == [(p, n) for p in ("fp32", "bf16", "int4") for n in (1, 6)]
    for r in rows:
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] == pytest.approx(1e3 * r["rows"] / r["ms_per_step"])
    assert "| bf16 | 6 |" in out.stdout and (tmp_path / "p.png").stat().st_size > 5_000


def test_an_unknown_precision_is_one_line():
    out = subprocess.run([sys.executable, str(SCRIPT), "--precisions", "fp8"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "precisions must be among" in out.stderr and "Traceback" not in out.stderr
