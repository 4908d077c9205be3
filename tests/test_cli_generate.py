"""`jambalab generate`: streamed output, stats, long prompt files, chat, and one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import jambalab
from jambalab.cli import main
from jambalab.generate import generate
from jambalab.tokenizer import ByteTokenizer
from test_tokenizer import build_tokenizer_json


def _run(capsys, *argv):
    rc = main(["generate", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_greedy_output_is_the_library_generation(capsys):
    rc, out, err = _run(capsys, "--preset", "tiny-mamba", "--prompt", "Hello", "--max-new-tokens", "6")
    assert rc == 0 and err == ""
    model, tok = jambalab.from_preset("tiny-mamba", seed=0).eval(), ByteTokenizer(eos_token_id=0)
    ids = torch.tensor([tok.encode("Hello")])
    new = generate(model, ids, 6, eos_token_id=0)[0, 5:].tolist()
    assert out == tok.decode(new) + "\n"


def test_stats_and_int8(capsys):
    rc, out, err = _run(capsys, "--preset", "tiny-hybrid", "--prompt", "Hi", "--max-new-tokens", "4", "--int8",
                        "--stats", "--temperature", "0.7", "--top-k", "20", "--top-p", "0.9", "--seed", "1")
    assert rc == 0
    for word in ("prefill:", "decode:", "peak memory:", "cache:", "weights:"):
        assert word in err


@pytest.mark.parametrize("flags", [["--int4"], ["--int8", "--dtype", "bf16"], ["--int8", "--group-size", "32"]])
def test_low_precision_greedy_output_is_the_library_generation(capsys, flags):
    from jambalab.quant import quantize_model

    rc, out, err = _run(capsys, "--preset", "tiny-hybrid", "--prompt", "Hello", "--max-new-tokens", "6", *flags)
    assert rc == 0 and err == ""
    model = jambalab.from_preset("tiny-hybrid", seed=0).eval()
    if "--dtype" in flags:
        model = model.to(torch.bfloat16)
    group = int(flags[-1]) if "--group-size" in flags else None
    model = quantize_model(model, flags[0][2:], group)
    tok = ByteTokenizer(eos_token_id=0)
    new = generate(model, torch.tensor([tok.encode("Hello")]), 6, eos_token_id=0)[0, 5:].tolist()
    assert out == tok.decode(new) + "\n"


def test_bad_group_sizes_are_one_line_errors(capsys):
    rc, out, err = _run(capsys, "--preset", "tiny-hybrid", "--prompt", "Hi", "--group-size", "64")
    assert rc != 0 and "--group-size goes with --int8 or --int4" in err
    rc, out, err = _run(capsys, "--preset", "tiny-hybrid", "--prompt", "Hi", "--int4", "--group-size", "64")
    assert rc != 0 and "layers.0.ffn.down_proj: group size 64 does not divide its in_features 96" in err


def test_long_prompt_file_is_prefilled_in_chunks_with_a_progress_bar(capsys, tmp_path):
    prompt = tmp_path / "long.txt"
    prompt.write_text("the quick brown fox jumps over the lazy dog. " * 200)  # 9000 byte tokens
    rc, out, err = _run(capsys, "--preset", "tiny-mamba", "--prompt-file", str(prompt), "--chunk-size", "1024",
                        "--max-new-tokens", "3", "--stats")
    assert rc == 0 and "prefill" in err and "9.00k" in err and "9000 tokens" in err


def test_checkpoint_with_tokenizer_and_chat_template(capsys, tmp_path):
    jambalab.from_preset("tiny-hybrid", seed=0).save_pretrained(tmp_path)
    build_tokenizer_json(tmp_path)
    rc, out, err = _run(capsys, "--model", str(tmp_path), "--prompt", "hello world", "--chat", "--max-new-tokens", "5")
    assert rc == 0 and out.endswith("\n")


def test_training_checkpoint_directory_is_accepted_as_model(capsys, tmp_path):
    """`jambalab train` prints checkpoints/step-N; its model (and tokenizer) live in step-N/model/."""
    model_dir = tmp_path / "run" / "checkpoints" / "step-00000373" / "model"
    jambalab.from_preset("tiny-hybrid", seed=3).save_pretrained(model_dir)
    build_tokenizer_json(model_dir)
    outs = []
    for where in (model_dir, model_dir.parent, tmp_path / "run"):
        rc, out, err = _run(capsys, "--model", str(where), "--prompt", "hello world", "--max-new-tokens", "5")
        assert rc == 0, err
        outs.append(out)
    assert outs[0] == outs[1] == outs[2] and outs[0].strip()


@pytest.mark.parametrize("argv,match", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "x", "--max-new-tokens", "0"], "max-new-tokens"),
    (["--prompt", "x", "--temperature", "-1"], "temperature"),
    (["--prompt", "x", "--top-p", "1.5"], "top-p"),
    (["--prompt", "x", "--top-k", "0"], "top-k"),
    (["--prompt", "x", "--chunk-size", "0"], "chunk-size"),
    (["--prompt", "x", "--chat"], "chat template"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, match):
    rc, out, err = _run(capsys, "--preset", "tiny-mamba", *argv)
    assert rc == 2 and match in err and err.count("\n") == 1


@pytest.mark.parametrize("data,match", [(b"\x89PNG\r\n\x1a\n\x00\x00", "not text"), (b"caf\xe9", "not UTF-8")])
def test_prompt_file_that_is_not_text(capsys, tmp_path, data, match):
    (tmp_path / "p").write_bytes(data)
    rc, _, err = _run(capsys, "--preset", "tiny-mamba", "--prompt-file", str(tmp_path / "p"))
    assert rc == 2 and match in err


def test_token_ids_outside_the_model_vocabulary(capsys, tmp_path):
    cfg = jambalab.JambaConfig.from_preset("tiny-mamba", vocab_size=100).to_dict()
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    rc, _, err = _run(capsys, "--config", str(tmp_path / "c.json"), "--prompt", "~~")  # byte 126 >= 100
    assert rc == 2 and "outside the vocabulary" in err


def test_console_entry_exits_nonzero_with_one_line():
    r = subprocess.run([sys.executable, "-m", "jambalab", "generate", "--preset", "tiny-mamba", "--prompt", "x",
                        "--top-p", "0"], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "top-p" in r.stderr


def _peak_mib(prompt_file, tmp_path) -> float:
    r = subprocess.run([sys.executable, "-m", "jambalab", "generate", "--preset", "tiny-mamba", "--prompt-file",
                        str(prompt_file), "--chunk-size", "8192", "--max-new-tokens", "2", "--stats"],
                       capture_output=True, text=True, cwd=Path(__file__).parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-500:]
    line = next(l for l in r.stderr.splitlines() if l.startswith("peak memory:"))
    return float(line.split()[2])


@pytest.mark.slow
def test_million_token_prompt_file_runs_in_bounded_memory(tmp_path):
    text = "a hybrid reads a long book, one chunk at a time.\n"
    small, big = tmp_path / "small.txt", tmp_path / "big.txt"
    small.write_text((text * (100_000 // len(text) + 1))[:100_000])
    big.write_text((text * (1_000_000 // len(text) + 1))[:1_000_000])  # 1M byte tokens
    # Beyond the prompt's own ids (8 MB per million), memory does not grow with the length.
    assert _peak_mib(big, tmp_path) - _peak_mib(small, tmp_path) < 64
