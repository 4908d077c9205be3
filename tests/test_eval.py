"""jambalab.evaluate and `jambalab eval`: perplexity windows, needle prompts and scoring, attention maps."""

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import jambalab
from jambalab import evaluate as ev
from jambalab.cli import main
from jambalab.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def hybrid():
    return jambalab.from_preset("tiny-hybrid", seed=1).eval()


def _full_loss(model, ids):
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1]
    return float(F.cross_entropy(logits, ids[1:]))


# ---- perplexity ------------------------------------------------------------------------
def test_one_window_equals_the_plain_loss(hybrid):
    ids = torch.randint(3, 512, (50,))
    r = ev.perplexity(hybrid, ids, n_bytes=49, seq_len=64)
    assert r["tokens"] == 49
    assert r["val_loss"] == pytest.approx(_full_loss(hybrid, ids), abs=1e-5)
    assert r["bits_per_byte"] == pytest.approx(r["val_loss"] / math.log(2), rel=1e-6)
    assert r["ppl"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-6)


@pytest.mark.parametrize("seq_len,stride", [(16, None), (16, 5), (16, 16), (7, 1)])
def test_windows_score_every_token_but_the_first_exactly_once(hybrid, seq_len, stride):
    ids = torch.randint(3, 512, (45,))
    r = ev.perplexity(hybrid, ids, seq_len=seq_len, stride=stride, batch_size=3)
    assert r["tokens"] == 44
    # Reference: token t scored with the context the windows give it, one forward per window.
    nll, done, stride = 0.0, 0, min(stride or seq_len, seq_len - 1)
    while done < 45:
        end = min(45, seq_len if done == 0 else done + stride)
        start = max(0, end - seq_len)
        first = max(1, done - start)
        with torch.no_grad():
            logits = hybrid(ids[start:end][None]).logits[0, first - 1:-1]
        nll += float(F.cross_entropy(logits, ids[start + first:end], reduction="sum"))
        done = end
    assert r["val_loss"] == pytest.approx(nll / 44, rel=1e-5)


def test_text_file_bits_per_byte(tmp_path, hybrid):
    f = tmp_path / "t.txt"
    f.write_text("héllo wörld\n" * 10)
    ids, n_bytes, _ = ev.corpus_eval_text(ByteTokenizer(), str(f))
    assert ids.numel() == len(f.read_bytes()) and n_bytes == ids.numel() - 1


# ---- needle / passkey --------------------------------------------------------------------
class Oracle(nn.Module):
    """Logits that put all mass on the true next token: any scoring bug shows as < 1.0."""

    def __init__(self, vocab=256, offset=0):
        super().__init__()
        self.vocab, self.offset = vocab, offset

    def forward(self, x, logits_to_keep=0):
        nxt = (torch.cat([x[:, 1:], x[:, :1]], 1) + self.offset) % self.vocab
        logits = F.one_hot(nxt, self.vocab).float()
        return type("Out", (), {"logits": logits[:, -logits_to_keep:] if logits_to_keep else logits})


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_cases_have_the_requested_length_and_depth(depth):
    cases = ev.needle_cases(ByteTokenizer(), 300, depth, n=3, seed=0)
    for ctx, ans in cases:
        text = bytes(ctx + ans).decode()
        assert len(ctx) + len(ans) == 300 and len(ans) == 5
        key = bytes(ans).decode()
        assert text.endswith("What is the pass key? The pass key is " + key)
        needle = ev.NEEDLE.format(key=key)
        assert needle in text  # the task's needle is the one the text haystack uses too
        n_hay = 300 - len(needle) - len(ev.QUESTION) - 5
        assert abs(text.index(needle) - depth * n_hay) <= 25  # snapped to a sentence boundary


def test_text_haystack_cases():
    hay = "def f(x):\n    return x\n" * 100
    cases = ev.needle_cases(ByteTokenizer(), 400, 0.5, n=2, seed=1, haystack=hay)
    for ctx, ans in cases:
        assert abs(len(ctx) + len(ans) - 400) <= 8
        assert bytes(ans).decode().isdigit() and ("pass key is " + bytes(ans).decode()).encode() in bytes(ctx)


def test_needle_scoring_is_exact_for_an_oracle_and_chance_for_a_random_model(hybrid):
    cases = ev.needle_cases(ByteTokenizer(), 200, 0.3, n=4)
    assert ev.needle_accuracy(Oracle(), cases) == 1.0
    assert ev.needle_accuracy(Oracle(offset=1), cases) == 0.0  # always one token id off
    grid = ev.needle_grid(jambalab.from_preset("tiny-mamba").eval(), ByteTokenizer(), [150, 200], [0.0, 1.0], 2)
    assert grid.shape == (2, 2) and ((grid >= 0) & (grid <= 1)).all()


# ---- attention maps ------------------------------------------------------------------------
@pytest.mark.parametrize("rope", [False, True])
def test_hooked_attention_maps_reproduce_the_attention_output(rope):
    model = jambalab.from_preset("tiny-hybrid", seed=2, rope=rope).eval()  # GQA: 4 query heads, 2 KV heads
    ids = torch.randint(3, 512, (1, 20))
    outs = {}
    layer = next(i for i, b in enumerate(model.layers) if b.is_attention)
    attn = model.layers[layer].mixer
    h = attn.register_forward_hook(lambda m, a, o: outs.update(x=a[0], o=o))
    maps = ev.attention_maps(model, ids)
    model(ids)
    h.remove()
    p = maps[layer]  # (H, L, L)
    assert set(maps) == {layer} and p.shape == (4, 20, 20)
    assert torch.allclose(p.sum(-1), torch.ones(4, 20)) and torch.all(p.triu(1) == 0)
    v = attn.v_proj(outs["x"]).view(1, 20, 2, 16).transpose(1, 2).repeat_interleave(2, 1)  # (1, H, L, hd)
    y = attn.o_proj((p[None] @ v).transpose(1, 2).reshape(1, 20, -1))
    assert torch.allclose(y, outs["o"], atol=1e-5)


def test_induction_scores_read_the_shifted_diagonal():
    n = 8
    m = torch.zeros(1, 2 * n, 2 * n)
    for q in range(n, 2 * n):
        m[0, q, q - n + 1] = 1.0
    assert ev.induction_scores({3: m}, n) == {3: [1.0]}
    ids = ev.induction_ids(33, 127, n, seed=0)
    assert ids.shape == (1, 2 * n) and torch.equal(ids[0, :n], ids[0, n:])


# ---- command line ---------------------------------------------------------------------------
def test_eval_cli_perplexity_json(tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text("import os\nprint(os.getcwd())\n" * 8)
    assert main(["eval", "--preset", "tiny-mamba", "--data", str(f), "--seq-len", "64", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    ppl = d["perplexity"]
    assert ppl["tokens"] == len(f.read_bytes()) - 1
    assert ppl["bits_per_byte"] == pytest.approx(ppl["val_loss"] / math.log(2))


@pytest.mark.parametrize("flags,dtype,scheme", [(["--dtype", "bf16"], "bfloat16", None), (["--int4"], "float32", "int4"),
                                                (["--int8", "--dtype", "bf16"], "bfloat16", "int8")])
def test_eval_cli_in_low_precision(tmp_path, capsys, flags, dtype, scheme):
    f = tmp_path / "t.txt"
    f.write_text("import os\nprint(os.getcwd())\n" * 8)
    assert main(["eval", "--preset", "tiny-hybrid", "--data", str(f), "--seq-len", "64", "--json", *flags]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["dtype"] == dtype and (d["quantization"] or {}).get("scheme") == scheme
    assert math.isfinite(d["perplexity"]["bits_per_byte"])


def test_eval_cli_needle_heatmap_and_attention_map(tmp_path, capsys):
    assert main(["eval", "--preset", "tiny-hybrid", "--needle", "--lengths", "150,200", "--depths", "0,0.5,1",
                 "--trials", "2", "--attention-map", "--out", str(tmp_path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (tmp_path / "needle-heatmap.png").stat().st_size > 1000
    assert (tmp_path / "attention-map.png").stat().st_size > 1000
    assert len(d["needle"]["accuracy"]) == 3 and len(d["needle"]["accuracy"][0]) == 2
    assert set(d["attention_map"]["induction_scores"]) == {"2"}


def test_eval_cli_loads_ablate_and_train_run_layouts(tmp_path, capsys):
    model = jambalab.from_preset("tiny-mamba", seed=4)
    model.save_pretrained(tmp_path / "plain" / "model")
    for step in (10, 20):
        model.save_pretrained(tmp_path / "train-run" / "checkpoints" / f"step-{step:08d}" / "model")
    assert ev.resolve_model_dir(tmp_path / "plain") == tmp_path / "plain" / "model"
    latest = tmp_path / "train-run" / "checkpoints" / "step-00000020" / "model"
    assert ev.resolve_model_dir(tmp_path / "train-run") == latest
    assert ev.resolve_model_dir(tmp_path / "train-run" / "checkpoints") == latest
    f = tmp_path / "t.txt"
    f.write_text("abc " * 40)
    losses = []
    for run in ("plain", "train-run"):
        assert main(["eval", "--model", str(tmp_path / run), "--data", str(f), "--seq-len", "32", "--json"]) == 0
        losses.append(json.loads(capsys.readouterr().out)["perplexity"]["val_loss"])
    assert losses[0] == pytest.approx(losses[1])


def test_figure_titles_name_the_run_not_its_path(tmp_path):
    assert ev.run_name(tmp_path / "runs" / "needle-hybrid-1_7-seed0") == "needle-hybrid-1_7-seed0"
    assert ev.run_name(tmp_path / "runs" / "needle-mamba-seed2" / "model") == "needle-mamba-seed2"
    assert ev.run_name(tmp_path / "my-run" / "checkpoints" / "step-00000020" / "model") == "my-run step-00000020"
    assert ev.run_name(None, "tiny-hybrid") == "tiny-hybrid (random init)"
    assert str(tmp_path) not in ev.run_name(tmp_path / "x" / "model")


@pytest.mark.parametrize("argv,msg", [
    (["--preset", "tiny-mamba", "--attention-map"], "no attention layers"),
    (["--preset", "tiny-hybrid", "--needle", "--depths", "0,2"], "--depths"),
    (["--preset", "tiny-hybrid", "--data", "/nonexistent/x"], "does not exist"),
    (["--model", "/nonexistent/dir"], "does not exist"),
])
def test_eval_cli_bad_input_is_one_line(argv, msg, capsys, tmp_path):
    assert main(["eval", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
