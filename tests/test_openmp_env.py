"""jambalab shortens libgomp's idle spin (GOMP_SPINCOUNT) when it is imported before torch, never over
the user's own OpenMP settings, and bench peers runs llama.cpp without it."""

import os
import subprocess
import sys

import pytest

import jambalab
from jambalab.bench import llamacpp

_PROBE = "import os, sys; {first}; print(os.environ.get('GOMP_SPINCOUNT'), dict(jambalab.SET_ENV))"


def _run(first: str, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", _PROBE.format(first=first)], capture_output=True, text=True,
                         env={**clean, **env}, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("first,env,want", [
    ("import jambalab", {}, "10000 {'GOMP_SPINCOUNT': '10000'}"),
    ("import torch; import jambalab", {}, "None {}"),  # libgomp already read its settings
    ("import jambalab", {"GOMP_SPINCOUNT": "5"}, "5 {}"),
    ("import jambalab", {"OMP_WAIT_POLICY": "active"}, "None {}"),
])
def test_the_spin_count_is_set_only_before_torch_and_never_over_the_users(first, env, want):
    assert _run(first, **env) == want


def test_llama_cpp_runs_without_what_jambalab_set(monkeypatch, tmp_path):
    monkeypatch.setattr(jambalab, "SET_ENV", {"GOMP_SPINCOUNT": "10000"})
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")
    monkeypatch.setenv("JAMBALAB_PROBE_KEEP", "1")
    script = tmp_path / "tool.py"
    script.write_text("import os; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('JAMBALAB_PROBE_KEEP'))")
    assert llamacpp.run_tool([sys.executable, str(script)], 60, "probe").strip() == "None 1"
