"""The lm-evaluation-harness model type `jambalab`, offline: tiny local tasks in tests/data/lm_eval_tasks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'jambalab[eval]')")

from lm_eval.api.instance import Instance  # noqa: E402

from jambalab.lm_eval_adapter import JambalabLM  # noqa: E402

TASKS = Path(__file__).parent / "data" / "lm_eval_tasks"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="module")
def lm():
    return JambalabLM(preset="tiny-hybrid", max_length=64, batch_size=4)


def _req(kind, args, i=0):
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


@torch.no_grad()
def _logprob_of(model, ids: list[int], n_cont: int) -> float:
    x = torch.tensor(ids)[None]
    logp = F.log_softmax(model(x).logits[0, :-1], -1)  # (L-1, V) predicts ids[1:]
    target = torch.tensor(ids[1:])
    return float(logp[torch.arange(len(ids) - 1), target][-n_cont:].sum())


def test_loglikelihood_matches_a_plain_forward(lm):
    ctx, cont = "def f(x):", "\n    return x"
    (lp, greedy), = lm.loglikelihood([_req("loglikelihood", (ctx, cont))])
    ids = list(ctx.encode()) + list(cont.encode())
    assert lp == pytest.approx(_logprob_of(lm.model, ids, len(cont.encode())), abs=1e-4)
    assert isinstance(greedy, bool)


def test_batched_scores_equal_one_at_a_time(lm):
    reqs = [_req("loglikelihood", (c, t), i) for i, (c, t) in enumerate(
        [("abc", "def"), ("xyz", "uvw"), ("hello", " world"), ("abc", "d"), ("a longer context", "!")])]
    together = lm.loglikelihood(reqs)
    alone = [lm.loglikelihood([r])[0] for r in reqs]
    for (a, ga), (b, gb) in zip(together, alone):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_rolling_loglikelihood_covers_every_token_once(lm):
    text = "import os\n" * 20  # 200 bytes: several 64-token windows
    (total,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (text,))])
    ids = list(text.encode())
    # Window by window, as lm-eval's rolling windows: each token predicted once, BOS/EOS before the first.
    expect, prefix = 0.0, [lm.prefix_token_id]
    seq = prefix + ids
    for end in range(1, len(seq), 64):
        stop = min(end + 64, len(seq))
        start = max(0, stop - 65)
        expect += _logprob_of(lm.model, seq[start:stop], stop - end)
    assert total == pytest.approx(expect, rel=1e-4)


def test_generate_until_stops_at_the_stop_string(lm):
    (out,) = lm.generate_until([_req("generate_until", ("x = 1\ny =", {"until": ["\n"], "max_gen_toks": 6}))])
    assert isinstance(out, str) and "\n" not in out and len(out.encode()) <= 6 * 4


def test_simple_evaluate_runs_all_three_request_types_offline():
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS), include_defaults=False)
    res = lm_eval.simple_evaluate(model="jambalab", model_args="preset=tiny-hybrid,max_length=64",
                                  tasks=["jambalab_tiny_mc", "jambalab_tiny_ppl", "jambalab_tiny_gen"],
                                  task_manager=tm, batch_size=4, limit=2, log_samples=False)
    r = res["results"]
    assert 0 <= r["jambalab_tiny_mc"]["acc,none"] <= 1
    assert r["jambalab_tiny_ppl"]["bits_per_byte,none"] > 0
    assert 0 <= r["jambalab_tiny_gen"]["exact_match,none"] <= 1


def test_a_saved_checkpoint_loads_as_pretrained(tmp_path):
    import jambalab

    jambalab.from_preset("tiny-hybrid", seed=3).save_pretrained(tmp_path / "ckpt")
    a = JambalabLM(pretrained=str(tmp_path / "ckpt"), max_length=32)
    b = JambalabLM(preset="tiny-hybrid", seed=3, max_length=32)
    req = [_req("loglikelihood", ("ab", "cd"))]
    assert a.loglikelihood(req)[0][0] == pytest.approx(b.loglikelihood(req)[0][0], abs=1e-5)


def test_bad_model_args_are_one_clear_error():
    from jambalab.errors import JambalabError

    with pytest.raises(JambalabError, match="exactly one of"):
        JambalabLM()
    with pytest.raises(JambalabError, match="dtype"):
        JambalabLM(preset="tiny-hybrid", dtype="int4")


@pytest.mark.slow
def test_lm_eval_command_line_with_the_model_registered(tmp_path):
    cmd = [sys.executable, "-m", "jambalab.lm_eval_adapter", "--model", "jambalab", "--model_args",
           "preset=tiny-mamba,max_length=48", "--tasks", "jambalab_tiny_mc", "--include_path", str(TASKS),
           "--limit", "2", "--batch_size", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **OFFLINE}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "jambalab_tiny_mc" in r.stdout and "acc" in r.stdout
