"""`jambalab vision train|eval` and `jambalab bench vision`: exact resume, the CLI's outputs and
errors, the DeiT baseline's shape, and the benchmark's quick mode (in seconds: tiny sizes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jambalab.cli import main
from jambalab.train.loop import TrainArgs
from jambalab.vision.config import VimConfig
from jambalab.vision.vit import ViTConfig, VisionTransformer, explicit_attention, sdpa_attention

def test_deit_tiny_has_timms_parameter_count():
    assert VisionTransformer.on_meta(ViTConfig.from_preset("deit-tiny")).num_parameters() == 5_717_416


def test_explicit_attention_equals_sdpa():
    q, k, v = torch.randn(3, 2, 3, 17, 8).unbind(0)
    torch.testing.assert_close(explicit_attention(q, k, v), sdpa_attention(q, k, v), atol=1e-5, rtol=1e-5)
    images = torch.randn(2, 3, 32, 32)
    a = VisionTransformer.from_config(ViTConfig.from_preset("vit-test"), seed=0).eval()
    b = VisionTransformer.from_config(ViTConfig.from_preset("vit-test", attention="explicit"), seed=0).eval()
    torch.testing.assert_close(a(images), b(images), atol=1e-5, rtol=1e-5)


_DATA = {}


def _trainer(out, resume=False):
    from jambalab.vision.train import DigitsData, VisionTrainer

    args = TrainArgs(max_steps=4, batch_size=8, lr=2e-3, warmup_steps=2, val_every=2, ckpt_every=2)
    config = VimConfig.from_preset("vim-digits", depth=1, embed_dim=16).to_dict()
    if "digits" not in _DATA:
        _DATA["digits"] = DigitsData(16, seed=0)
    data = _DATA["digits"]
    return VisionTrainer("vim", config, args, data, out, resume=resume)


def test_resume_is_exact(tmp_path):
    straight = _trainer(tmp_path / "a")
    straight.run(log=lambda _: None)
    cut = _trainer(tmp_path / "b")
    for _ in range(2):
        cut.train_step()
    cut.save(elapsed=1.0, cpu=1.0)  # the run dies here, after its step-2 checkpoint
    resumed = _trainer(tmp_path / "b", resume=True)
    assert resumed.step == 2
    resumed.run(log=lambda _: None)
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    losses = lambda d: [r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses(tmp_path / "a")[2:] == losses(tmp_path / "b")
    with pytest.raises(Exception, match="already holds a run"):
        _trainer(tmp_path / "a")


def test_train_then_eval_on_the_command_line(tmp_path, capsys):
    from PIL import Image
    from sklearn.datasets import load_digits

    out = tmp_path / "run"
    assert main(["vision", "train", "--out", str(out), "--steps", "3", "--val-every", "2", "--ckpt-every", "2",
                 "--threads", "1", "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert [r["arch"] for r in summary] == ["vim", "vit"] and all(r["steps"] == 3 for r in summary)
    for arch in ("vim", "vit"):
        assert (out / arch / "loss.png").is_file() and (out / arch / "checkpoints" / "step-00000003").is_dir()
        assert len((out / arch / "metrics.jsonl").read_text().splitlines()) == 3 + 2  # 3 steps, 2 validations
    # A digit drawn the way people do (dark ink on light paper), 64x64: eval inverts and resizes it.
    digit = 255 - (load_digits().images[0] * 255 / 16).astype(np.uint8)
    Image.fromarray(digit).resize((64, 64)).save(tmp_path / "zero.png")
    assert main(["vision", "eval", "--model", str(out / "vim"), "--images", str(tmp_path / "zero.png")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(tmp_path / "zero.png")) and line.count("%") == 5
    (tmp_path / "notes.png").write_text("not an image")
    for argv, message in (
        (["--model", str(out / "vim"), "--images", str(tmp_path / "notes.png")], "notes.png: not a readable image"),
        (["--model", str(tmp_path), "--images", str(tmp_path / "zero.png")], "neither a vision model directory"),
        (["--model", str(out / "vim"), "--images", str(tmp_path / "missing.png")], "no such file"),
    ):
        assert main(["vision", "eval", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert main(["vision", "train", "--out", str(out), "--steps", "3"]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_bench_vision_quick(tmp_path, capsys, monkeypatch):
    """--quick end to end, with each point measured in this process (the subprocess path is the next test)."""
    import jambalab.bench.probe as probe
    from jambalab.bench.vision import measure

    monkeypatch.setattr(probe, "run_in_child", lambda spec, timeout_s, module: measure(**spec))
    assert main(["bench", "vision", "--quick", "--sizes", "32", "--out", str(tmp_path), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "Vim vs DeiT" in printed and (tmp_path / "vision.png").stat().st_size > 0
    results = json.loads((tmp_path / "vision.json").read_text())
    assert {(p["model"], p["size"]) for p in results["points"]} == {(m, 32) for m in ("vim", "deit-sdpa", "deit-explicit")}
    assert all(p["images_per_s"] > 0 and p["parameters"] in (7_148_008 - 196 * 192 + 4 * 192, 5_717_416 - 196 * 192 + 4 * 192)
               for p in results["points"])
    assert main(["bench", "vision", "--sizes", "8"]) == 2
    assert "at least the patch size 16" in capsys.readouterr().err


def test_bench_vision_point_in_a_fresh_process():
    from jambalab.bench.probe import run_in_child

    r = run_in_child({"model": "vim", "size": 32, "batch": 1, "repeats": 1, "threads": 1}, 300,
                     module="jambalab.bench.vision")
    assert "error" not in r, r
    assert r["images_per_s"] > 0 and r["memory_bytes"] >= 0 and r["baseline_bytes"] > 0


def test_eval_an_official_checkpoint(tmp_path, capsys):
    from PIL import Image

    from test_vision import random_official_state_dict

    torch.save({"model": random_official_state_dict(VimConfig.from_preset("vim-test"))}, tmp_path / "vim.pth")
    rgb = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.jpg")
    argv = ["vision", "eval", "--preset", "vim-test", "--images", str(tmp_path / "photo.jpg")]
    assert main([*argv, "--official", str(tmp_path / "vim.pth")]) == 0
    assert capsys.readouterr().out.count("class ") == 5
    torch.save({"model": {"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}}, tmp_path / "deit.pth")
    assert main([*argv, "--official", str(tmp_path / "deit.pth")]) == 2
    assert "not a Vision Mamba checkpoint" in capsys.readouterr().err
