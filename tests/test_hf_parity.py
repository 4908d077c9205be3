"""Same weights in, same logits out: jambalab against HF transformers (the reference)."""

import pytest
import torch

import jambalab
from hf_models import all_shapes, build_hf

pytest.importorskip("transformers")
SHAPES = all_shapes()


def _hf_forward(hf, ids, labels=None):
    # HF's aux-loss code fails on a Jamba without MoE layers, so ask for it only when there are experts.
    has_moe = hf.config.model_type == "jamba" and hf.config.num_experts > 1
    kw = {"output_router_logits": True} if has_moe else {}
    with torch.no_grad():
        return hf(ids, labels=labels, **kw)


@pytest.mark.parametrize("family,name,kwargs", SHAPES, ids=[s[1] for s in SHAPES])
def test_fp32_logits_and_loss_match_transformers(tmp_path, family, name, kwargs):
    hf = build_hf(family, kwargs)
    hf.save_pretrained(tmp_path)
    model = jambalab.from_pretrained(tmp_path)
    assert model.config.family == family
    ids = torch.randint(1, kwargs["vocab_size"], (3, 23))
    ref = _hf_forward(hf, ids, labels=ids)
    with torch.no_grad():
        out = model(ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits.float(), rtol=0, atol=1e-4)
    # loss includes the router aux loss for MoE models (HF adds it when output_router_logits=True)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    if getattr(ref, "aux_loss", None) is not None and out.aux_loss is not None:
        torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family,name,kwargs", [s for s in SHAPES if s[1] in ("jamba-gqa", "mamba", "falcon")],
                         ids=["jamba", "mamba", "falcon"])
def test_bf16_logits_close_to_transformers(tmp_path, family, name, kwargs):
    hf = build_hf(family, kwargs)
    hf.save_pretrained(tmp_path)
    hf = hf.to(torch.bfloat16)
    model = jambalab.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    ids = torch.randint(1, kwargs["vocab_size"], (2, 17))
    ref = _hf_forward(hf, ids).logits.float()
    with torch.no_grad():
        out = model(ids).logits
    err = (out - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item(), err
    # and the bf16 model tracks the fp32 one
    fp32 = jambalab.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        full = fp32(ids).logits
    assert (out - full).abs().max().item() < 0.05 * full.abs().max().item()


@pytest.mark.parametrize("preset", ["tiny-hybrid", "tiny-mamba", "tiny-falcon-mamba", "tiny-mixtral"])
def test_our_save_loads_in_transformers_with_same_logits(tmp_path, preset):
    from transformers import AutoModelForCausalLM

    cfg = jambalab.JambaConfig.from_preset(preset)
    if cfg.rope:
        cfg = cfg.replace(rope=False)
    model = jambalab.JambaLM.from_config(cfg, seed=3)
    model.save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits.float(), model(ids).logits, rtol=0, atol=1e-4)
    again = jambalab.from_pretrained(tmp_path)
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_sharded_checkpoint_roundtrip(tmp_path):
    from transformers import AutoModelForCausalLM

    model = jambalab.from_preset("tiny-hybrid", seed=1)
    from jambalab.hf import save_pretrained

    save_pretrained(model, tmp_path, max_shard_bytes=100_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    again = jambalab.from_pretrained(tmp_path)
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(hf(ids).logits.float(), model(ids).logits, rtol=0, atol=1e-4)
