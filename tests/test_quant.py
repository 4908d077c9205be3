"""Int8 weight-only quantization: what is swapped, the memory it saves, and a loose bound on drift."""

import copy

import pytest
import torch

import jambalab
from jambalab import JambaConfig, JambaLM
from jambalab.generate import generate
from jambalab.model import Linear, MambaMixer, MoE
from jambalab.quant import Int8Linear, Int8MoE, load_int8, logit_drift, quantize_int8, quantize_per_channel, weight_bytes


@pytest.fixture(scope="module")
def pair():
    ref = jambalab.from_preset("tiny-hybrid").eval()
    return ref, quantize_int8(copy.deepcopy(ref))


def test_per_channel_round_trip_error_is_half_a_step():
    w = torch.randn(2, 16, 40) * torch.logspace(-3, 1, 16)[:, None]  # rows of very different scales
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (2, 16) and q.abs().max() <= 127
    err = (q.float() * scale[..., None] - w).abs()
    assert (err <= scale[..., None] / 2 + 1e-7).all()


def test_zero_rows_stay_zero():
    q, scale = quantize_per_channel(torch.zeros(3, 5))
    assert (q == 0).all() and torch.isfinite(scale).all()


def test_int8_linear_is_close_to_the_float_linear():
    lin = torch.nn.Linear(64, 32, bias=True)
    x = torch.randn(4, 64)
    q = Int8Linear(lin)
    rel = (q(x) - lin(x)).norm() / lin(x).norm()
    assert rel < 0.01


def test_swaps_exactly_the_intended_modules(pair):
    _, q = pair
    assert type(q.lm_head) is Linear and type(q.embed) is torch.nn.Embedding
    for m in q.modules():
        if isinstance(m, MambaMixer):
            assert isinstance(m.in_proj, Int8Linear) and isinstance(m.out_proj, Int8Linear)
            assert type(m.x_proj) is Linear and type(m.dt_proj) is Linear
            assert m.A_log.dtype == torch.float32 and m.D.dtype == torch.float32
            assert m.conv1d.weight.dtype == torch.float32
        if isinstance(m, MoE):
            assert isinstance(m, Int8MoE) and type(m.router) is Linear
            assert m.w_gate.dtype == torch.int8 and m.w_gate_scale.shape == m.w_gate.shape[:2]
    attn = next(b.mixer for b in q.layers if b.is_attention)
    assert all(isinstance(getattr(attn, n), Int8Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))


@pytest.mark.parametrize("preset", ["jamba-v0.1"])
def test_weights_take_about_half_of_bf16(preset):
    model = JambaLM.on_meta(JambaConfig.from_preset(preset)).to(torch.bfloat16)
    bf16 = weight_bytes(model)
    ratio = weight_bytes(quantize_int8(model)) / bf16
    assert 0.45 < ratio < 0.55, ratio


def test_logit_drift_is_small(pair):
    ref, q = pair
    drift = logit_drift(ref, q, torch.randint(3, 512, (2, 48)))
    assert drift["rel_l2"] < 0.05 and drift["kl"] < 1e-3 and drift["top1_agree"] >= 0.9, drift


def test_quantized_model_decodes_exactly_like_its_own_forward(pair):
    _, q = pair
    ids = torch.randint(3, 512, (2, 16))
    cache = q.allocate_cache(2)
    with torch.no_grad():
        want = q(ids).logits
        got = torch.cat([q(ids[:, t:t + 1], cache=cache).logits for t in range(16)], dim=1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert generate(q, ids, 4, chunk_size=5).shape == (2, 20)


def test_bf16_model_quantizes_and_runs():
    q = quantize_int8(jambalab.from_preset("tiny-mixtral").to(torch.bfloat16).eval())
    lin = q.layers[0].mixer.q_proj
    assert lin.weight.dtype == torch.int8 and lin.scale.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(q(torch.randint(3, 512, (1, 8))).logits).all()


def test_load_int8_from_a_checkpoint(tmp_path, pair):
    ref, q = pair
    ref.save_pretrained(tmp_path)
    loaded = load_int8(tmp_path)
    ids = torch.randint(3, 512, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, q(ids).logits, rtol=0, atol=1e-6)
