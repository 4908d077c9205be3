"""`jambalab ablate`: the grid (one knob per run), budgets, resumable runs, table, JSON, plots."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from jambalab import ablate
from jambalab.cli import main
from jambalab.errors import JambalabError
from jambalab.train.tasks import FIRST_ID, SEP, Needle

TINY = ["--tokens", "4096", "--eval-samples", "4", "--seeds", "0"]


# ---- the grid -------------------------------------------------------------------------------
def test_grid_names_and_one_knob_each():
    cfgs = ablate.grid_configs()
    assert list(cfgs) == ["attention", "mamba", "hybrid-1:3", "hybrid-1:7", "hybrid-1:7-moe", "hybrid-1:7-rope"]
    base = cfgs["hybrid-1:7"].to_dict()
    for name, cfg in cfgs.items():
        changed = {k for k, v in cfg.to_dict().items() if base[k] != v} - {"name", "d_ff"}
        assert changed == {k for k, v in ablate.KNOBS[name].items() if base[k] != v}, name
        assert changed or name == "hybrid-1:7"
    assert cfgs["hybrid-1:7"].layer_pattern() == "M M M M A M M M"  # the paper's a:m = 1:7, l = 8
    assert cfgs["hybrid-1:3"].n_attention_layers == 2 and cfgs["attention"].n_mamba_layers == 0
    assert cfgs["mamba"].n_attention_layers == 0 and cfgs["hybrid-1:7-rope"].rope


def test_every_run_has_pure_mambas_active_parameters():
    from jambalab.stats import param_counts

    cfgs = ablate.grid_configs()
    target = param_counts(cfgs["mamba"])[1]
    for name, cfg in cfgs.items():
        total, active = param_counts(cfg)
        assert abs(active - target) <= 0.005 * target, name  # d_ff matched: within one d_ff step
        assert (total == active) == (name != "hybrid-1:7-moe")
    moe = cfgs["hybrid-1:7-moe"]
    total, active = param_counts(moe)
    assert total - active == moe.n_moe_layers * (moe.n_experts - 1) * 3 * moe.d_model * moe.d_ff  # unrouted experts
    assert cfgs["attention"].d_ff > cfgs["hybrid-1:7"].d_ff > cfgs["mamba"].d_ff  # attention layers are smaller


def test_only_parses_and_rejects_unknown_names():
    assert ablate.parse_only(None) == list(ablate.GRID)
    assert ablate.parse_only("mamba, attention") == ["attention", "mamba"]  # grid order
    with pytest.raises(JambalabError, match="hybrid-1:5"):
        ablate.parse_only("mamba,hybrid-1:5")


def test_lr_schedule_warms_up_then_decays_with_the_budget():
    hp = ablate.TrainHParams(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert ablate.lr_at(hp, 0, 0.0) == pytest.approx(1e-4)
    assert ablate.lr_at(hp, 9, 0.0) == pytest.approx(1e-3)
    assert ablate.lr_at(hp, 100, 0.5) == pytest.approx(0.55e-3)
    assert ablate.lr_at(hp, 100, 1.0) == pytest.approx(1e-4)


def test_mixed_length_batches_are_deterministic_and_never_repeat():
    setup = ablate.make_setup("mqar", seed=5, tokens_per_step=1024)
    a, b = setup.batch(0), setup.batch(0)
    assert a[0].equal(b[0]) and a[1].equal(b[1])
    n = len(setup.lengths)
    assert [setup.batch(s)[0].shape[1] for s in range(n)] == sorted(ablate.MQAR_POINTS)
    assert all(setup.batch(s)[0].numel() == 1024 for s in range(n))
    assert not setup.batch(0)[0].equal(setup.batch(n)[0])  # same length, later samples
    ids, labels = setup.batch(0)
    answers = (labels[:, 1:] != -100).sum(1)
    assert (answers == ablate.MQAR_POINTS[ids.shape[1]] // 2).all()  # half the keys asked: no elimination


@pytest.mark.parametrize("clock", ["cpu", "wall"])
def test_training_stops_at_the_token_budget(clock):
    from jambalab.model import JambaLM

    setup = ablate.make_setup("mqar", tokens_per_step=512)
    stats = ablate.train_budgeted(JambaLM.from_config(ablate.grid_configs()["mamba"], seed=0), setup.batch,
                                  None if clock == "cpu" else 1e9, ablate.TrainHParams(max_tokens=1500), clock)
    assert stats["tokens"] == 3 * 512 and stats["steps"] == 3  # stops as soon as the budget is spent
    assert stats["train_time_s"] > 0 and stats["tokens_per_s"] > 0


# ---- the command ----------------------------------------------------------------------------
def test_cli_json_table_plots_and_resume(tmp_path, capsys):
    out = tmp_path / "runs"
    argv = ["ablate", "--only", "mamba,hybrid-1:7", "--task", "mqar", "--out", str(out), "--json", *TINY]
    assert main(argv) == 0
    captured = capsys.readouterr()
    runs = json.loads(captured.out)
    assert [r["name"] for r in runs] == ["mamba", "hybrid-1:7"]
    for r in runs:
        assert 0 <= r["recall_accuracy"] <= 1 and r["val_loss"] > 0
        assert r["params_total"] >= r["params_active"] > 0 and r["tokens_per_s"] > 0 and r["seed"] == 0
        assert set(r["recall_by_length"]) == {str(n) for n in ablate.MQAR_POINTS}
        run = out / ablate.run_key(r["name"], "mqar", 0)
        assert (run / "result.json").is_file() and (run / "model" / "config.json").is_file()
    assert (out / "ablate-mqar.png").stat().st_size > 1000
    # Re-run: both runs are finished, so nothing trains and the same results come back.
    assert main(argv) == 0
    again = capsys.readouterr()
    assert json.loads(again.out) == runs and "finished earlier" in again.err
    # Another budget is another experiment: that run trains again.
    assert main([*argv, "--tokens", "2048", "--only", "mamba"]) == 0
    assert "finished earlier" not in capsys.readouterr().err
    # The kept model is what `jambalab eval` reads.
    hybrid = out / ablate.run_key("hybrid-1:7", "mqar", 0)
    assert main(["eval", "--model", str(hybrid), "--attention-map", "--out", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["attention_map"]["layers"] == [4]


def test_cli_lm_task_on_a_text_file_reports_bits_per_byte(tmp_path, capsys):
    f = tmp_path / "corpus.txt"
    f.write_text("def f(x):\n    return x + 1\n\n" * 400)
    assert main(["ablate", "--only", "hybrid-1:7-moe", "--task", "lm", "--data", str(f), *TINY]) == 0
    out = capsys.readouterr().out
    assert "hybrid-1:7-moe" in out and "bpb" in out


def _result(name, seed, recall, by_length):
    return {"name": name, "task": "mqar", "seed": seed, "params_total": 490000, "params_active": 490000,
            "recall_by_length": by_length, "recall_accuracy": recall, "val_loss": 2.0, "bits_per_byte": None,
            "tokens_per_s": 1234.5, "tokens": 2_000_000, "steps": 100, "task_params": {}}


def test_table_gives_mean_and_spread_over_seeds():
    rows = [_result("mamba", 0, 0.3, {"64": 0.4, "128": 0.2}), _result("mamba", 1, 0.5, {"64": 0.6, "128": 0.4}),
            _result("attention", 0, 0.9, {"64": 0.9, "128": 0.9})]
    (mamba, attention) = ablate.summarize(rows)
    assert mamba["seeds"] == [0, 1] and attention["seeds"] == [0]
    assert mamba["recall_accuracy"]["mean"] == pytest.approx(0.4)
    assert mamba["recall_accuracy"]["std"] == pytest.approx(0.1414, abs=1e-4)  # sample sd of 0.3, 0.5
    assert mamba["recall_by_length"]["128"]["min"] == 0.2 and attention["recall_accuracy"]["std"] == 0.0
    table = ablate.format_table(rows)
    assert "acc@64" in table and "0.400±0.141" in table and "0.900" in table and "490.0K" in table
    assert len(table.splitlines()) == 4  # header, rule, one row per run name


class NeedleOracle(torch.nn.Module):
    """Looks every asked key up in the haystack exactly (shift > 0: answers the value of another pair)."""

    def __init__(self, shift: int = 0):
        super().__init__()
        self.shift = shift

    def forward(self, ids, labels=None):
        task = Needle(**ablate.NEEDLE)
        first_key = FIRST_ID + task.n_filler
        logits = torch.zeros(*ids.shape, ablate.BASE["vocab_size"])
        for b, row in enumerate(ids.tolist()):
            sep = row.index(SEP)
            pairs = [(t, row[i + 1]) for i, t in enumerate(row[:sep]) if first_key <= t < first_key + task.n_keys]
            values = dict(pairs)
            for t in range(sep + 1, len(row)):
                if row[t] in values:
                    k = [p[0] for p in pairs].index(row[t])
                    logits[b, t, pairs[(k + self.shift) % len(pairs)][1] if self.shift else values[row[t]]] = 1.0
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        return SimpleNamespace(logits=logits, ce_loss=ce)


def test_needle_grid_scores_the_needles_answer_exactly():
    lengths, depths = (32, 128), (0.0, 0.5, 1.0)
    right = ablate.needle_grid(NeedleOracle(), lengths, depths, n_samples=8, seed=0)
    assert right.shape == (3, 2) and (right == 1.0).all()
    wrong = ablate.needle_grid(NeedleOracle(shift=1), lengths, depths, n_samples=8, seed=0)
    assert wrong.max() < 0.5  # the value of a neighbouring pair is a miss (unless the values coincide)


def test_no_lookup_baseline():
    assert ablate.no_lookup_accuracy(1, 16) == 1.0  # one pair: its value is the answer
    assert ablate.no_lookup_accuracy(2, 16, samples=4000) == pytest.approx(0.5 + 0.5 / 16, abs=0.02)
    assert ablate.no_lookup_accuracy(2, 1) == 1.0  # one value id: always right
    assert ablate.no_lookup_accuracy(32, 16) > 1 / 32 + 0.05  # repeated values lift it above 1/P


def test_cli_needle_task_draws_heatmaps(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["ablate", "--task", "needle", "--only", "mamba,hybrid-1:7", "--out", str(out), "--json",
                 "--tokens", "1024", "--eval-samples", "2", "--seeds", "0,1"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["seed"]) for r in runs] == [("mamba", 0), ("hybrid-1:7", 0), ("mamba", 1), ("hybrid-1:7", 1)]
    grid = runs[0]["needle_grid"]
    assert grid["lengths"] == list(ablate.NEEDLE_LENGTHS)
    assert max(grid["lengths"]) == 8 * max(ablate.NEEDLE_TRAIN_LENGTHS)  # up to 8x the training length
    assert len(grid["accuracy"]) == len(ablate.NEEDLE_DEPTHS)
    for png in ("needle-heatmaps.png", "needle-by-length.png", "ablate-needle.png"):
        assert (out / png).stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert [r["seeds"] for r in summary] == [[0, 1], [0, 1]]


@pytest.mark.parametrize("argv,msg", [
    (["--only", "transformer"], "unknown run name"),
    (["--task", "copy"], "--task"),
    (["--budget", "0"], "--budget"),
    (["--tokens", "0"], "--tokens"),
    (["--seeds", "0,x"], "--seeds"),
    (["--seeds", "1,1"], "--seeds"),
])
def test_cli_bad_input_is_one_line(argv, msg, capsys):
    assert main(["ablate", *argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


@pytest.mark.slow
def test_cli_passkey_task(tmp_path, capsys):
    assert main(["ablate", "--only", "attention", "--task", "passkey", "--json", *TINY]) == 0
    (r,) = json.loads(capsys.readouterr().out)
    assert set(r["recall_by_length"]) == {str(n) for n in ablate.PASSKEY_LENGTHS}
