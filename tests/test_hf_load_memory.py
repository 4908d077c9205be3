"""Loading at size: a checkpoint loaded in its own dtype is memory-mapped (peak resident ~1x the
weights), and loading in another dtype converts tensor by tensor (peak ~1x the converted model, not
the model plus the file). Peaks are measured in a fresh process (VmHWM, see bench.probe.peak_bytes)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import jambalab

ROOT = Path(__file__).resolve().parents[1]
_CHILD = r"""
import sys, torch, jambalab
from jambalab.bench.probe import peak_bytes, reset_peak, rss_bytes
torch.set_num_threads(1)
tiny = jambalab.from_preset("tiny-hybrid").to(getattr(torch, sys.argv[2]))
tiny.save_pretrained(sys.argv[3])
jambalab.from_pretrained(sys.argv[3], dtype=sys.argv[2])  # code paths, thread pool: resident before the baseline
del tiny
base = rss_bytes()
reset_peak()
m = jambalab.from_pretrained(sys.argv[1], dtype=sys.argv[2])
peak = peak_bytes()
size = sum(p.numel() * p.element_size() for p in m.parameters())
largest = max(p.numel() for p in m.parameters())
def swap(mod):  # what a weight-only quantizer does: each matrix replaced by a new 1-byte tensor
    for name, w in list(mod.named_parameters(recurse=False)):
        if w.dim() >= 2:
            mod.register_buffer(name + "_q", torch.ones(w.shape, dtype=torch.int8))
            delattr(mod, name)
if len(sys.argv) > 4:
    for mod in m.modules():
        swap(mod)
    peak = rss_bytes()
print(peak - base, size, largest)
"""
_SLACK = 20e6


def load_growth(path: Path, dtype: str, scratch: Path, swap: bool = False) -> tuple[int, int, int]:
    """(peak resident growth while loading, parameter bytes, largest parameter's elements), measured
    in a fresh process after loading a tiny checkpoint once. swap: the growth after replacing every
    matrix by an int8 tensor instead."""
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), dtype, str(scratch), *(["swap"] * swap)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return tuple(map(int, out.stdout.split()))


@pytest.fixture(scope="module")
def bf16_hybrid(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16-hybrid")
    jambalab.from_preset("bench-hybrid", seed=0).to(torch.bfloat16).save_pretrained(path)  # ~100 MB
    return path


def test_same_dtype_load_maps_the_file_instead_of_copying(bf16_hybrid, tmp_path):
    grown, size, _ = load_growth(bf16_hybrid, "bfloat16", tmp_path)
    assert size > 80e6
    assert grown < 1.1 * size + _SLACK, f"loading grew RSS by {grown / 1e6:.0f} MB for {size / 1e6:.0f} MB of weights"
    w = jambalab.from_pretrained(bf16_hybrid, dtype="bfloat16").layers[0].mixer.in_proj.weight
    with torch.no_grad():
        w.add_(1)  # mapped copy-on-write: writable, and the file is untouched
    assert not torch.equal(jambalab.from_pretrained(bf16_hybrid, dtype="bfloat16").layers[0].mixer.in_proj.weight, w)


def test_replaced_weights_give_their_file_pages_back(bf16_hybrid, tmp_path):
    """Each mapped tensor has a mapping of its own: a quantizer swapping modules one by one frees the
    bf16 pages as it goes, so the model ends near its quantized size, not bf16 + int8."""
    grown, size, _ = load_growth(bf16_hybrid, "bfloat16", tmp_path, swap=True)
    assert grown < 0.6 * size + _SLACK, f"{grown / 1e6:.0f} MB resident after swapping {size / 1e6:.0f} MB of bf16"


def test_converting_load_holds_the_model_plus_one_tensor_not_the_file(bf16_hybrid, tmp_path):
    grown, size, largest = load_growth(bf16_hybrid, "float32", tmp_path)
    assert size > 160e6
    # Converting through one mapping of the whole file would keep the file's pages too: 1.5x here.
    limit = size + 2 * largest + _SLACK  # the model, and the largest tensor as stored (bf16) while it converts
    assert grown < limit, f"loading grew RSS by {grown / 1e6:.0f} MB for {size / 1e6:.0f} MB of weights"


@pytest.fixture(scope="session")
def falcon_mamba_7b_3_layers(tmp_path_factory):
    """Falcon-Mamba-7B's shapes with 3 of its 64 layers (0.85B parameters, 1.7 GB in bf16), saved by
    transformers' own FalconMambaForCausalLM.save_pretrained in 500 MB shards."""
    from jambalab.bench.peers import build_checkpoint, falcon_mamba_shape

    return build_checkpoint(falcon_mamba_shape(layers=3), tmp_path_factory.mktemp("fm7b") / "m",
                            max_shard_size="500MB")


@pytest.mark.slow
@pytest.mark.parametrize("dtype,bytes_per_param", [("bfloat16", 2), ("float32", 4)])
def test_sharded_7b_shaped_checkpoint_loads_in_about_one_model_of_memory(falcon_mamba_7b_3_layers, dtype,
                                                                         bytes_per_param, tmp_path):
    assert len(list(falcon_mamba_7b_3_layers.glob("model-*.safetensors"))) >= 3
    grown, size, largest = load_growth(falcon_mamba_7b_3_layers, dtype, tmp_path)
    assert size == pytest.approx(0.847e9 * bytes_per_param, rel=0.01)
    limit = 1.1 * size if dtype == "bfloat16" else size + 2 * largest + _SLACK
    assert grown < limit, f"loading grew RSS by {grown / 1e9:.2f} GB for {size / 1e9:.2f} GB of weights"
