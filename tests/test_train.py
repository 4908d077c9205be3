"""The training loop: learning, exact resume, atomic checkpoints, NaN stop, transformers loading, bad input."""

import json
import math
from pathlib import Path

import pytest
import torch

import jambalab
from jambalab.cli import main
from jambalab.config import JambaConfig
from jambalab.errors import CheckpointError, ConfigError
from jambalab.train import DataSpec, TrainArgs, Trainer, TrainingDiverged, lr_at
from jambalab.train import checkpoint as ckpt_io
from jambalab.train.loop import METRICS, PLOT

TINY = JambaConfig.from_preset("tiny-hybrid", vocab_size=256)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes gain nothing from a second thread, and on a busy machine a parallel region
    waits for a descheduled thread at every op (10x slower); exactness does not depend on it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~12 KB of repetitive Python: a tiny model learns it in a few dozen steps."""
    d = tmp_path_factory.mktemp("corpus")
    for k in range(3):
        (d / f"m{k}.py").write_text("".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(130)))
    return d


def _args(**kw) -> TrainArgs:
    base = dict(max_steps=6, seq_len=32, batch_size=2, lr=3e-3, warmup_steps=2, val_every=3, val_batches=2,
                ckpt_every=3)
    return TrainArgs(**{**base, **kw})


def _trainer(out, corpus, config=TINY, resume=False, **kw) -> Trainer:
    return Trainer(config, _args(**kw), DataSpec(source=str(corpus)), out, resume=resume, log=lambda m: None)


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / METRICS).read_text().splitlines()]


def _losses(out) -> dict[int, tuple]:
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in _metrics(out) if "loss" in r}


def test_loss_falls_and_outputs_are_written(tmp_path, corpus):
    result = _trainer(tmp_path, corpus, max_steps=40, batch_size=4, val_every=20, ckpt_every=40, lr=1e-2).run()
    rows = _metrics(tmp_path)
    train = [r["loss"] for r in rows if "loss" in r]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(train) == 40 and len(val) == 2
    assert sum(train[-5:]) / 5 < sum(train[:5]) / 5 - 1.0, train
    assert val[-1] < math.log(256) - 1.5
    first = rows[0]
    assert {"step", "loss", "lr", "tokens_per_s", "aux_loss", "grad_norm"} <= set(first)
    assert (tmp_path / PLOT).stat().st_size > 0
    assert result.checkpoint == tmp_path / "checkpoints" / "step-00000040"
    assert result.val_loss == val[-1] and result.stop_reason == "max_steps"


def test_resume_gives_bitwise_the_same_losses(tmp_path, corpus):
    full, part = tmp_path / "full", tmp_path / "part"
    _trainer(full, corpus, max_steps=6).run()
    _trainer(part, corpus, max_steps=3).run()  # "stopped at step 3", checkpoint step 3
    with open(part / METRICS, "a") as f:  # a killed run may have logged steps it never saved
        f.write(json.dumps({"step": 4, "loss": 123.0, "grad_norm": 1.0}) + "\n{\"step\": 5, \"lo")
    _trainer(part, corpus, max_steps=6, resume=True).run()
    assert _losses(part) == _losses(full)  # exact float equality, steps 1..6
    val = lambda out: [(r["step"], r["val_loss"]) for r in _metrics(out) if "val_loss" in r]
    assert val(part) == val(full)
    a = jambalab.from_pretrained(full / "checkpoints" / "step-00000006" / "model")
    b = jambalab.from_pretrained(part / "checkpoints" / "step-00000006" / "model")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_checkpoint_loads_in_transformers_with_the_same_logits(tmp_path, corpus):
    transformers = pytest.importorskip("transformers")
    result = _trainer(tmp_path, corpus, max_steps=2, val_every=2, ckpt_every=2).run()
    model_dir = result.checkpoint / "model"
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ours = jambalab.from_pretrained(model_dir)
    ids = torch.randint(3, 256, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits.float(), rtol=0, atol=1e-4)
        torch.testing.assert_close(result.model.eval()(ids).logits, ours(ids).logits, rtol=0, atol=0)


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path, corpus, monkeypatch):
    trainer = _trainer(tmp_path, corpus, max_steps=6, ckpt_every=3)
    for _ in range(3):
        trainer.train_step()
    good = trainer.save()
    for _ in range(3):
        trainer.train_step()

    def killed(*args, **kwargs):  # the model directory is written, the state file is half written
        Path(args[1]).write_bytes(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ckpt_io.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.undo()
    assert ckpt_io.latest_checkpoint(tmp_path / "checkpoints") == good
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [good.name]
    resumed = _trainer(tmp_path, corpus, max_steps=6, resume=True)
    assert resumed.step == 3 and resumed.samples == 6
    # saving the same step again replaces it without a moment where it is missing
    resumed.save()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [good.name]


def test_a_real_kill_leaves_a_temporary_that_is_ignored_and_cleaned(tmp_path, corpus):
    _trainer(tmp_path, corpus, max_steps=3).run()
    stale = tmp_path / "checkpoints" / ".tmp-step-00000006-999"
    (stale / "model").mkdir(parents=True)
    assert ckpt_io.latest_checkpoint(tmp_path / "checkpoints").name == "step-00000003"
    _trainer(tmp_path, corpus, max_steps=6, resume=True).run()
    assert not stale.exists()
    assert [s for s, _ in ckpt_io.list_checkpoints(tmp_path / "checkpoints")] == [3, 6]  # keep = 2


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_state(tmp_path, corpus):
    trainer = _trainer(tmp_path, corpus, max_steps=8, ckpt_every=2, val_every=100)

    def poison(_module, _inputs, output):  # step 5's forward produces NaN
        return output * float("nan") if trainer.step == 4 else output

    trainer.model.norm_f.register_forward_hook(poison)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 5.*step-00000004"):
        trainer.run()
    steps = [s for s, _ in ckpt_io.list_checkpoints(tmp_path / "checkpoints")]
    assert steps == [2, 4]
    model = ckpt_io.load_model(tmp_path / "checkpoints" / "step-00000004" / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_activation_loss_bf16_and_accumulation(tmp_path, corpus):
    _trainer(tmp_path, corpus, max_steps=2, grad_accum=2, activation_loss=1e-2, bf16=True, val_every=2).run()
    row = _metrics(tmp_path)[0]
    assert row["activation_loss"] > 0 and math.isfinite(row["loss"])
    assert row["loss"] == pytest.approx(row["ce_loss"] + 0.001 * row["aux_loss"] + 1e-2 * row["activation_loss"],
                                        rel=1e-4)


def test_task_training_reports_answer_accuracy(tmp_path):
    args = _args(max_steps=2, seq_len=48, val_every=2)
    result = Trainer(TINY, args, DataSpec(source=None, task="mqar", task_options={"n_pairs": 4}), tmp_path,
                     log=lambda m: None).run()
    val = [r for r in _metrics(tmp_path) if "val_loss" in r][-1]
    assert 0 <= val["val_accuracy"] <= 1 and result.val_accuracy == val["val_accuracy"]


def test_non_hf_exportable_models_are_checkpointed_in_jambalab_layout(tmp_path, corpus):
    cfg = JambaConfig.from_preset("tiny-mixtral", vocab_size=256)  # rope=True: transformers' Jamba has none
    _trainer(tmp_path, corpus, config=cfg, max_steps=2, val_every=2).run()
    model_dir = tmp_path / "checkpoints" / "step-00000002" / "model"
    assert (model_dir / ckpt_io.NATIVE_CONFIG).is_file() and not (model_dir / "config.json").exists()
    assert _trainer(tmp_path, corpus, config=cfg, max_steps=4, resume=True).step == 2


def test_schedules():
    cos = TrainArgs(max_steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert [lr_at(cos, s) for s in (0, 9)] == [0.1, 1.0]
    assert lr_at(cos, 10) == 1.0 and lr_at(cos, 60) == pytest.approx(0.55) and lr_at(cos, 110) == pytest.approx(0.1)
    wsd = TrainArgs(max_steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert lr_at(wsd, 80) == 1.0 and lr_at(wsd, 100) == pytest.approx(0.5) and lr_at(wsd, 110) == pytest.approx(0.0)
    # a time budget pulls the decay in: half the budget spent = half-way down the cosine
    assert lr_at(cos, 10, time_fraction=0.5) == pytest.approx(0.55)


@pytest.mark.parametrize("field,value", [("lr", -1.0), ("lr", float("nan")), ("batch_size", 0), ("seq_len", 1),
                                         ("schedule", "linear"), ("time_budget", 0.0), ("grad_accum", 1.5)])
def test_invalid_hyperparameters(field, value):
    with pytest.raises(ConfigError, match=field if field != "lr" else "learning rate"):
        TrainArgs(**{field: value})


# ---------------------------------------------------------------------------------------
# The command line: one line on stderr, exit 2, for every bad input
# ---------------------------------------------------------------------------------------
def _cli_error(capsys, argv) -> str:
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jambalab train: error:") and "\n" not in err and "Traceback" not in err
    return err


TINY_CLI = ["--preset", "tiny-hybrid", "--set", "vocab_size=256", "--seq-len", "32", "--batch-size", "2",
            "--val-batches", "1"]


def test_cli_bad_data_and_hyperparameters(tmp_path, capsys, corpus):
    out = ["--out", str(tmp_path / "run")]
    assert "does not exist" in _cli_error(capsys, [*TINY_CLI, *out, "--data", str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    assert "holds no files" in _cli_error(capsys, [*TINY_CLI, *out, "--data", str(tmp_path / "empty")])
    big = [a if a != "32" else "100000" for a in TINY_CLI]
    assert "too few" in _cli_error(capsys, [*big, *out, "--data", str(corpus), "--max-steps", "1"])
    assert "learning rate" in _cli_error(capsys, [*TINY_CLI, *out, "--lr", "0", "--max-steps", "1"])
    assert "unknown config field" in _cli_error(capsys, [*TINY_CLI, *out, "--set", "n_expertz=2"])
    assert "KEY=VALUE" in _cli_error(capsys, [*TINY_CLI, *out, "--set", "n_experts"])
    assert "task mqar" in _cli_error(capsys, [*TINY_CLI, *out, "--task", "mqar", "--task-opt", "bogus=1"])


def test_cli_trains_then_guards_the_run_and_resumes(tmp_path, capsys, corpus):
    run = ["--out", str(tmp_path / "run"), "--data", str(corpus), "--max-steps", "2", "--val-every", "2",
           "--ckpt-every", "2"]
    assert main(["train", *TINY_CLI, *run]) == 0
    printed = capsys.readouterr().out
    assert "validation loss" in printed and "unigram entropy" in printed and "pure Transformer" in printed
    assert "already holds a run" in _cli_error(capsys, [*TINY_CLI, *run])
    other = [a if a != "tiny-hybrid" else "tiny-mamba" for a in TINY_CLI]
    assert "different model" in _cli_error(capsys, [*other, *run, "--resume"])
    longer = [a if a != "32" else "16" for a in TINY_CLI]
    assert "seq_len: 32 -> 16" in _cli_error(capsys, [*longer, *run, "--resume"])
    # resume without naming the model: the checkpoint's config is used
    assert main(["train", "--out", str(tmp_path / "run"), "--data", str(corpus), "--seq-len", "32",
                 "--batch-size", "2", "--val-batches", "1", "--max-steps", "3", "--resume"]) == 0
    assert "step-00000003" in capsys.readouterr().out


def test_cli_resume_errors(tmp_path, capsys, corpus):
    run = ["--out", str(tmp_path / "run"), "--data", str(corpus), "--max-steps", "2", "--val-every", "2"]
    assert "no checkpoint" in _cli_error(capsys, [*TINY_CLI, *run, "--resume"])
    assert main(["train", *TINY_CLI, *run]) == 0
    capsys.readouterr()
    state = tmp_path / "run" / "checkpoints" / "step-00000002" / ckpt_io.STATE_FILE
    state.write_bytes(state.read_bytes()[:1000])  # truncated
    assert "is corrupt" in _cli_error(capsys, [*TINY_CLI, *run, "--resume"])
    with pytest.raises(CheckpointError, match="not a jambalab training state"):
        torch.save({"format": "other"}, state)
        ckpt_io.load_state(state.parent)


def test_fine_tuning_a_checkpoint_uses_its_tokenizer_json(tmp_path, corpus):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train([str(p) for p in sorted(corpus.iterdir())],
              trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"]))
    base = tmp_path / "base"
    jambalab.from_preset("tiny-hybrid").save_pretrained(base)  # vocab 512 >= the tokenizer's <= 300
    tok.save(str(base / "tokenizer.json"))
    (base / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    result = Trainer(None, _args(max_steps=2, val_every=2), DataSpec(source=str(corpus)), tmp_path / "run",
                     init_from=base, log=lambda m: None).run()
    meta = json.loads((tmp_path / "run" / "data" / "meta.json").read_text())
    assert meta["tokenizer"].startswith("tokenizer.json:") and meta["tokenizer"].endswith(f"eos={tok.token_to_id('</s>')}")
    assert meta["n_tokens"] < 0.6 * sum(len(p.read_bytes()) for p in corpus.iterdir())  # BPE, not bytes
    assert (result.checkpoint / "model" / "tokenizer.json").is_file()
    # resuming takes the tokenizer from the checkpoint itself
    assert Trainer(None, _args(max_steps=3), DataSpec(source=str(corpus)), tmp_path / "run", resume=True,
                   log=lambda m: None).tokenizer.vocab_size == tok.get_vocab_size()


def test_set_values_are_parsed():
    from jambalab.commands.train import parse_assignments

    got = parse_assignments(["a=4", "b=1e-3", "c=true", "d=False", "e=none", "f=learnable", "g=-2"], "--set")
    assert got == {"a": 4, "b": 1e-3, "c": True, "d": False, "e": None, "f": "learnable", "g": -2}
    assert isinstance(got["a"], int) and isinstance(got["b"], float)


def test_ctrl_c_finishes_the_step_and_saves(tmp_path, corpus):
    import os
    import signal

    trainer = _trainer(tmp_path, corpus, max_steps=20, ckpt_every=100, val_every=100)

    def interrupt(_module, _inputs, output):  # Ctrl-C arrives in the middle of step 3's forward
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return output

    trainer.model.norm_f.register_forward_hook(interrupt)
    result = trainer.run()
    assert result.stop_reason == "interrupted" and result.step == 3
    assert result.checkpoint == tmp_path / "checkpoints" / "step-00000003"
    assert _trainer(tmp_path, corpus, max_steps=20, resume=True).step == 3
