"""Weight-only quantization (int8, 4-bit): the formats, what is swapped, the memory it saves, drift,
decode = forward, and the saved-quantized checkpoint format."""

import copy
import json

import pytest
import torch

import jambalab
from jambalab import JambaConfig, JambaLM
from jambalab.errors import InputError
from jambalab.generate import generate
from jambalab.model import Linear, MambaMixer, MoE
from jambalab.ops import lowp
from jambalab.ops.quant_ref import dequantize, pack_int4, quantize_weight, unpack_int4
from jambalab.quant import (QuantLinear, QuantMoE, load_quantized, logit_drift, quantize_model, save_quantized,
                            weight_bytes)


@pytest.fixture(scope="module")
def ref():
    return jambalab.from_preset("tiny-hybrid").eval()


@pytest.fixture(scope="module", params=["int8", "int4"])
def pair(request, ref):
    return ref, quantize_model(copy.deepcopy(ref), request.param)


# ---------------------------------------------------------------- the formats


@pytest.mark.parametrize("bits,group", [(8, None), (8, 16), (4, 32), (4, 64)])
def test_round_trip_error_is_half_a_step(bits, group):
    w = torch.randn(2, 16, 128) * torch.logspace(-3, 1, 16)[:, None]  # rows of very different scales
    qw = quantize_weight(w, bits, group)
    G = 128 if group is None else group
    assert qw.scales.shape == (2, 16, 128 // G) and qw.scales.dtype == torch.float16
    err = (dequantize(qw) - w).abs().reshape(2, 16, -1, G)
    step = qw.scales.float()[..., None]
    assert (err <= step / 2 + 1e-6 * step + 1e-9).all()


def test_int4_packing_is_llama_cpp_order_and_round_trips():
    q = torch.randint(-8, 8, (3, 64), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.shape == (3, 32) and packed.dtype == torch.uint8
    # byte j of a run of 32 holds weight j (low nibble) and weight j + 16 (high nibble)
    assert int(packed[1, 5]) == (int(q[1, 5]) + 8) | ((int(q[1, 21]) + 8) << 4)
    assert int(packed[2, 16 + 3]) == (int(q[2, 32 + 3]) + 8) | ((int(q[2, 32 + 19]) + 8) << 4)
    assert torch.equal(unpack_int4(packed), q)


def test_zero_groups_stay_zero():
    qw = quantize_weight(torch.zeros(3, 64), 4, 32)
    assert (dequantize(qw) == 0).all() and torch.isfinite(qw.scales.float()).all()


@pytest.mark.parametrize("bad,match", [
    (dict(bits=4, group_size=16), "multiple of 32"),
    (dict(bits=8, group_size=24), "does not divide"),
    (dict(bits=3, group_size=32), "8 or 4"),
])
def test_bad_formats_are_named(bad, match):
    with pytest.raises(InputError, match=match):
        quantize_weight(torch.randn(4, 64), bad["bits"], bad["group_size"], name="layers.0.w")


def test_nan_weights_are_refused_by_name():
    w = torch.randn(4, 64)
    w[1, 3] = float("nan")
    with pytest.raises(InputError, match="layers.3.q_proj.*NaN"):
        quantize_weight(w, 8, None, name="layers.3.q_proj")


# ---------------------------------------------------------------- the swap


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quant_linear_is_close_to_the_float_linear(scheme):
    lin = torch.nn.Linear(64, 32, bias=True)
    q = QuantLinear.from_linear(lin, 8 if scheme == "int8" else 4, None if scheme == "int8" else 32, "lin")
    with torch.no_grad():
        for rows in (1, 3, 9):  # the decode GEMV and the prefill tiles
            x = torch.randn(rows, 64)
            rel = (q(x) - lin(x)).norm() / lin(x).norm()
            assert rel < (0.01 if scheme == "int8" else 0.1), (rows, rel)


def test_swaps_exactly_the_intended_modules(pair):
    ref, q = pair
    assert isinstance(q.lm_head, QuantLinear) and type(q.embed) is torch.nn.Embedding  # untied head: quantized
    for m in q.modules():
        if isinstance(m, MambaMixer):
            assert isinstance(m.in_proj, QuantLinear) and isinstance(m.out_proj, QuantLinear)
            assert type(m.x_proj) is Linear and type(m.dt_proj) is Linear  # the selection path: bf16, not int8 / 4-bit
            assert m.x_proj.weight.dtype == m.dt_proj.weight.dtype == torch.bfloat16
            assert m.dt_proj.bias.dtype == torch.float32
            assert m.A_log.dtype == torch.float32 and m.D.dtype == torch.float32
            assert m.conv1d.weight.dtype == torch.float32
        if isinstance(m, MoE):
            assert isinstance(m, QuantMoE) and type(m.router) is Linear
            assert m.w_gate.dtype in (torch.int8, torch.uint8) and m.w_gate_scales.shape[:2] == m.w_gate.shape[:2]
    attn = next(b.mixer for b in q.layers if b.is_attention)
    assert all(isinstance(getattr(attn, n), QuantLinear) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))


def test_a_tied_head_stays_float_and_tied():
    q = quantize_model(jambalab.from_preset("tiny-mamba").eval(), "int8")
    assert q.config.tie_embeddings and type(q.lm_head) is Linear and q.lm_head.weight is q.embed.weight


@pytest.mark.parametrize("scheme,lo,hi", [("int8", 0.25, 0.30), ("int4", 0.13, 0.16)])
def test_weights_shrink_like_the_format(scheme, lo, hi):
    """jamba-v0.1 on the meta device: int8 ~1 byte / 4-bit ~0.56 byte per weight against fp32's 4."""
    model = JambaLM.on_meta(JambaConfig.from_preset("jamba-v0.1"))
    fp32 = weight_bytes(model)
    ratio = weight_bytes(quantize_model(model, scheme)) / fp32
    assert lo < ratio < hi, ratio


def test_bad_group_size_leaves_the_model_untouched(ref):
    model = copy.deepcopy(ref)
    with pytest.raises(InputError, match="does not divide"):
        quantize_model(model, "int8", group_size=48)  # d_model 64 is not a multiple of 48
    assert not any(isinstance(m, (QuantLinear, QuantMoE)) for m in model.modules())
    with pytest.raises(InputError, match="quantize must be one of"):
        quantize_model(model, "int3")


def test_logit_drift_is_small(ref):
    ids = torch.randint(3, 512, (2, 48))
    for scheme, bound in (("int8", 0.02), ("int4", 0.25)):
        drift = logit_drift(ref, quantize_model(copy.deepcopy(ref), scheme), ids)
        assert drift["rel_l2"] < bound and drift["kl"] < 1e-2, (scheme, drift)


def _forward_and_decode(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits (B, L, V) of one forward over ids (B, L), and of decoding ids one token at a time."""
    cache = model.allocate_cache(ids.shape[0])
    with torch.no_grad():
        want = model(ids).logits
        got = torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(ids.shape[1])], dim=1)
    return want, got


@pytest.mark.parametrize("native", [False, True])
def test_quantized_model_decodes_exactly_like_its_own_forward(pair, native, monkeypatch):
    """With a float32 prefill GEMM, exactly at most positions: x is rounded before a quantized matrix (to
    int8 per block) and before the bf16 selection path, and a sum whose last bit differs between the
    prefill GEMM and the decode GEMV can round one value the other way, which moves the logits ~1e-3
    from there. Within bf16 rounding where the CPU's native bf16 GEMM runs the prefill
    (lowp.quant_gemm_dtype)."""
    monkeypatch.setattr(lowp, "native_bf16", lambda: native)
    _, q = pair
    ids = torch.randint(3, 512, (2, 16))
    want, got = _forward_and_decode(q, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=5e-2 if native else 1e-2)
    if not native:
        exact = (got - want).abs().amax(-1) <= 1e-5  # (B, L)
        assert exact.float().mean() >= 0.75, exact
    assert generate(q, ids, 4, chunk_size=5).shape == (2, 20)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_bf16_model_quantizes_and_runs(scheme):
    q = quantize_model(jambalab.from_preset("tiny-mixtral").to(torch.bfloat16).eval(), scheme)
    lin = q.layers[0].mixer.q_proj
    assert lin.scales.dtype == torch.float16
    with torch.no_grad():
        out = q(torch.randint(3, 512, (1, 8))).logits
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- saved-quantized checkpoints


@pytest.mark.parametrize("preset,dtype", [("tiny-hybrid", torch.float32), ("tiny-mamba", torch.bfloat16),
                                          ("tiny-mixtral", torch.float32)])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_saved_quantized_checkpoint_loads_without_requantizing(tmp_path, preset, dtype, scheme, monkeypatch):
    q = quantize_model(jambalab.from_preset(preset).to(dtype).eval(), scheme)
    save_quantized(q, tmp_path / "q")
    monkeypatch.setattr("jambalab.quant.quantize_weight", lambda *a, **k: pytest.fail("re-quantized on load"))
    loaded = load_quantized(tmp_path / "q")
    ids = torch.randint(3, 512, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, q(ids).logits)
    assert loaded.quantization == q.quantization
    assert not (tmp_path / "q.partial").exists()


def test_a_format_1_checkpoint_still_loads_with_its_float_selection_path(tmp_path, ref):
    """Version 1 kept Mamba's x_proj / dt_proj in the float dtype; version 2 stores them in bf16."""
    q = quantize_model(copy.deepcopy(ref), "int8")
    for m in q.modules():
        if isinstance(m, MambaMixer):
            for lin in (m.x_proj, m.dt_proj):
                lin.weight = torch.nn.Parameter(lin.weight.float(), requires_grad=False)
    save_quantized(q, tmp_path / "v1")
    cfg = json.loads((tmp_path / "v1" / "config.json").read_text())
    assert cfg["quantization_config"]["format_version"] == 2
    with pytest.raises(InputError, match=r"mixer\.(x|dt)_proj\.weight is .*float32, the config expects .*bfloat16"):
        load_quantized(tmp_path / "v1")
    cfg["quantization_config"]["format_version"] = 1
    (tmp_path / "v1" / "config.json").write_text(json.dumps(cfg))
    loaded = load_quantized(tmp_path / "v1")
    mixer = next(m for m in loaded.modules() if isinstance(m, MambaMixer))
    assert mixer.x_proj.weight.dtype == mixer.dt_proj.weight.dtype == torch.float32
    ids = torch.randint(3, 512, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, q(ids).logits)
    cfg["quantization_config"]["format_version"] = 3
    (tmp_path / "v1" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="format version 3, this jambalab reads 1 and 2"):
        load_quantized(tmp_path / "v1")


def test_quantized_checkpoint_errors_name_the_problem(tmp_path, ref):
    q = quantize_model(copy.deepcopy(ref), "int4")
    save_quantized(q, tmp_path / "q")
    with pytest.raises(InputError, match="group_size=32, asked for 64"):
        load_quantized(tmp_path / "q", group_size=64)
    with pytest.raises(InputError, match="scheme='int4', asked for 'int8'"):
        load_quantized(tmp_path / "q", scheme="int8")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["quantization_config"]["group_size"] = 64  # the tensors were written for groups of 32
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="tensor .*scales is .* the config expects"):
        load_quantized(tmp_path / "q")
    ref.save_pretrained(tmp_path / "float")
    with pytest.raises(InputError, match="not a jambalab quantized checkpoint"):
        load_quantized(tmp_path / "float")
    with pytest.raises(InputError, match="not quantized"):
        save_quantized(ref, tmp_path / "x")


def test_from_pretrained_quantizes_and_reads_a_saved_quantized_checkpoint(tmp_path, ref):
    ref.save_pretrained(tmp_path / "float")
    q = jambalab.from_pretrained(tmp_path / "float", quantize="int4")
    assert isinstance(q.lm_head, QuantLinear) and q.quantization["group_size"] == 32
    save_quantized(q, tmp_path / "q4")
    again = jambalab.from_pretrained(tmp_path / "q4")  # as stored: no float weights, no re-quantizing
    ids = torch.randint(3, 512, (1, 10))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, q(ids).logits)
    with pytest.raises(InputError, match="asked for 'int8'"):
        jambalab.from_pretrained(tmp_path / "q4", quantize="int8")
    with pytest.raises(InputError, match="asked for dtype"):
        jambalab.from_pretrained(tmp_path / "q4", dtype=torch.bfloat16)


def test_generate_cli_runs_a_saved_quantized_checkpoint(tmp_path, ref, capsys):
    from jambalab.cli import main

    save_quantized(quantize_model(copy.deepcopy(ref), "int8"), tmp_path / "q8")
    assert main(["generate", "--model", str(tmp_path / "q8"), "--prompt", "Hi", "--max-new-tokens", "3"]) == 0
    assert main(["generate", "--model", str(tmp_path / "q8"), "--prompt", "Hi", "--int4"]) != 0
    assert "asked for 'int4'" in capsys.readouterr().err


# ---------------------------------------------------------------- weight-only bf16


def test_weight_only_bf16_casts_the_matrices_and_nothing_else(ref):
    q = quantize_model(copy.deepcopy(ref), "bf16")
    assert q.quantization == {"scheme": "bf16", "bits": 16, "group_size": None}
    assert type(q.lm_head) is Linear and q.lm_head.weight.dtype == torch.bfloat16
    moe = next(m for m in q.modules() if isinstance(m, MoE))
    assert moe.w_gate.dtype == moe.w_down.dtype == torch.bfloat16 and moe.router.weight.dtype == torch.float32
    mixer = next(m for m in q.modules() if isinstance(m, MambaMixer))
    assert mixer.in_proj.weight.dtype == mixer.x_proj.weight.dtype == mixer.dt_proj.weight.dtype == torch.bfloat16
    assert mixer.A_log.dtype == mixer.conv1d.weight.dtype == mixer.dt_proj.bias.dtype == torch.float32
    assert q.embed.weight.dtype == torch.float32
    assert abs(weight_bytes(q) / weight_bytes(ref) - 0.5) < 0.2
    ids = torch.randint(3, 512, (2, 24))
    drift = logit_drift(ref, q, ids)
    assert drift["rel_l2"] < 0.01 and drift["top1_agree"] > 0.9, drift
    with torch.no_grad():
        assert q(ids).logits.dtype == torch.float32


def test_weight_only_bf16_refuses_a_group_size_and_a_second_quantization(ref):
    with pytest.raises(InputError, match="takes no group size"):
        quantize_model(copy.deepcopy(ref), "bf16", group_size=32)
    q = quantize_model(copy.deepcopy(ref), "bf16")
    with pytest.raises(InputError, match=r"already quantized \(bf16\)"):
        quantize_model(q, "int8")


@pytest.mark.parametrize("native", [False, True])
def test_weight_only_bf16_decodes_like_its_own_forward(ref, native, monkeypatch):
    """Decode (the step: x rounded to bf16, fp32 out) and the prefill GEMM (bf16 out where native) agree
    within bf16 rounding."""
    monkeypatch.setattr(lowp, "native_bf16", lambda: native)
    q = quantize_model(copy.deepcopy(ref), "bf16")
    want, got = _forward_and_decode(q, torch.randint(3, 512, (2, 16)))
    torch.testing.assert_close(got, want, rtol=0, atol=5e-2 if native else 1e-2)


def test_from_pretrained_loads_weight_only_bf16_straight_and_saves_it(tmp_path, ref, monkeypatch):
    """The matrices of a bf16 checkpoint are read as bf16 (never through fp32), the rest as float32; the
    same model as quantize_model on the float load; saved and loaded back as stored."""
    import jambalab.hf as hf

    ref.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    ref.float()
    reads, real = {}, hf._converted
    monkeypatch.setattr(hf, "_converted", lambda src, name, shape, dtype: reads.setdefault(name, dtype) and
                        real(src, name, shape, dtype))
    q = jambalab.from_pretrained(tmp_path / "bf16", quantize="bf16")
    monkeypatch.undo()
    assert {n for n, d in reads.items() if d == torch.bfloat16} >= {"lm_head.weight", "model.layers.0.mamba.in_proj.weight"}
    assert reads["model.layers.0.mamba.x_proj.weight"] == torch.bfloat16
    assert reads["model.layers.0.mamba.A_log"] == reads["model.final_layernorm.weight"] == torch.float32
    want = quantize_model(jambalab.from_pretrained(tmp_path / "bf16", dtype=torch.float32), "bf16")
    assert q.quantization == want.quantization
    for (n, a), (_, b) in zip(q.state_dict().items(), want.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), n
    with pytest.raises(InputError, match="takes no group size"):
        jambalab.from_pretrained(tmp_path / "bf16", quantize="bf16", group_size=32)
    save_quantized(q, tmp_path / "w16")
    again = jambalab.from_pretrained(tmp_path / "w16")
    ids = torch.randint(3, 512, (1, 10))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, q(ids).logits)
    assert again.quantization == q.quantization and again.lm_head.weight.dtype == torch.bfloat16


def test_generate_cli_takes_bf16_weights(tmp_path, ref, capsys):
    from jambalab.cli import main

    ref.save_pretrained(tmp_path / "float")
    assert main(["generate", "--model", str(tmp_path / "float"), "--prompt", "Hi", "--max-new-tokens", "3",
                 "--bf16-weights"]) == 0
    assert main(["generate", "--model", str(tmp_path / "float"), "--prompt", "Hi", "--bf16-weights",
                 "--group-size", "32"]) != 0
    assert "no group size" in capsys.readouterr().err
