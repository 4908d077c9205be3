"""Loading streams tensors one at a time: peak memory stays near the model's size, not twice it."""

import subprocess
import sys

import jambalab

_CHILD = r"""
import resource, sys, torch, jambalab
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m = jambalab.from_pretrained(sys.argv[1])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
size = sum(p.numel() * p.element_size() for p in m.parameters())
print(base * 1024, peak * 1024, size)
"""


def test_peak_load_memory_is_about_one_model(tmp_path):
    model = jambalab.from_preset("bench-hybrid", seed=0)  # ~ 200 MB in fp32
    model.save_pretrained(tmp_path)
    del model
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)], capture_output=True, text=True, check=True)
    base, peak, size = map(int, out.stdout.split())
    assert size > 150e6
    grown = peak - base
    assert grown < 1.4 * size, f"loading grew RSS by {grown / 1e6:.0f} MB for a {size / 1e6:.0f} MB model"
