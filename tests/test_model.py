import json
import subprocess
import sys

import pytest
import torch

import jambalab
from jambalab import JambaConfig, JambaLM


def test_full_size_parameter_counts_on_meta():
    jamba = JambaLM.on_meta(JambaConfig.from_preset("jamba-v0.1"))
    assert round(jamba.num_parameters() / 1e9, 2) == 51.57
    assert round(jamba.num_active_parameters() / 1e9, 1) == 12.1
    falcon = JambaLM.on_meta(JambaConfig.from_preset("falcon-mamba-7b"))
    assert round(falcon.num_parameters() / 1e9, 2) == 7.27
    assert round(JambaLM.on_meta(JambaConfig.from_preset("mixtral-8x7b")).num_parameters() / 1e9, 1) == 46.7


def test_info_json_reports_paper_numbers():
    r = subprocess.run([sys.executable, "-m", "jambalab", "info", "--preset", "jamba-v0.1", "--json"],
                       capture_output=True, text=True, check=True)
    d = json.loads(r.stdout)
    assert round(d["params_total"] / 1e9, 2) == 51.57 and round(d["params_active"] / 1e9, 1) == 12.1
    assert d["kv_bytes_per_token"] == 16 * 1024  # 4 GiB at 256K tokens (paper Table 1)
    assert d["kv_bytes_per_token"] * 262144 == 4 * 2**30
    assert d["layer_types"].count("attention") == 4
    assert 16e6 < d["ssm_state_bytes"] < 17e6  # ~16.5 MB per sequence (REFERENCE.md)


@pytest.mark.parametrize("preset", ["tiny-hybrid", "tiny-mamba", "tiny-falcon-mamba", "tiny-transformer", "tiny-mixtral"])
def test_forward_shapes_loss_and_backward(preset):
    model = jambalab.from_preset(preset)
    ids = torch.randint(0, 512, (2, 13))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 13, 512) and out.logits.dtype == torch.float32
    assert (out.aux_loss is not None) == (model.config.n_moe_layers > 0)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("preset,tie", [("tiny-hybrid", False), ("tiny-mamba", True), ("tiny-mixtral", False)])
def test_training_loss_without_logits_equals_the_logits_path(preset, tie, monkeypatch):
    """return_logits=False (what the trainer and the benchmark's step call): the lm_head and the loss in
    row chunks; same loss, aux loss and gradients (tied embeddings included), no logits."""
    from jambalab import ops
    from jambalab.ops import cpu, fused

    if cpu.kernels() is None or ops.linear_cross_entropy is not fused.linear_cross_entropy:
        pytest.skip(f"fused CPU kernels unavailable or not bound: {cpu.build_error()}")
    monkeypatch.setattr(fused, "_loss_chunk_rows", lambda vocab: 5)  # several chunks, a ragged last one
    calls = []
    real = fused._LinearCrossEntropyFn.apply
    monkeypatch.setattr(fused._LinearCrossEntropyFn, "apply", lambda *a: calls.append(1) or real(*a))
    model = jambalab.from_preset(preset, tie_embeddings=tie)
    ids = torch.randint(0, 512, (2, 13))
    labels = ids.clone()
    labels[0, :4] = -100
    ref = model(ids, labels=labels)
    ref.loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = model(ids, labels=labels, return_logits=False)
    out.loss.backward()
    assert out.logits is None and calls
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.ce_loss, ref.ce_loss, rtol=1e-5, atol=1e-6)
    assert (out.aux_loss is None) == (ref.aux_loss is None)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_moe_dispatch_equals_dense_loop():
    from jambalab.model import MoE

    moe = MoE(16, 24, 5, 2)
    for w in (moe.w_gate, moe.w_up, moe.w_down):
        torch.nn.init.normal_(w, std=0.2)
    x = torch.randn(3, 7, 16)
    y, logits = moe(x)
    # every expert on every token, weighted by its (unrenormalised) top-K softmax weight
    h = x.reshape(-1, 16)
    probs = torch.softmax(logits.float(), -1)
    w, idx = probs.topk(2, -1)
    dense = torch.zeros_like(h)
    for e in range(5):
        ye = torch.nn.functional.linear(torch.nn.functional.silu(h @ moe.w_gate[e].T) * (h @ moe.w_up[e].T), moe.w_down[e])
        dense += ye * (w * (idx == e)).sum(-1, keepdim=True)
    torch.testing.assert_close(y.reshape(-1, 16), dense, rtol=1e-5, atol=1e-6)


def test_balanced_router_aux_loss_is_k():
    from jambalab.model import router_aux_loss

    logits = torch.zeros(64, 4)  # uniform probabilities; topk picks ties deterministically, so use a balanced set
    logits[torch.arange(64), torch.arange(64) % 4] = 5.0
    logits[torch.arange(64), (torch.arange(64) + 1) % 4] = 4.0
    aux = router_aux_loss([logits], top_k=2, mask=None)
    probs = torch.softmax(logits, -1)
    assert abs(aux.item() - 4 * (0.5 * probs.mean(0)).sum().item()) < 1e-6
    assert 1.9 < aux.item() < 2.1


def test_rope_changes_attention_only_when_on():
    cfg = JambaConfig.from_preset("tiny-transformer")
    a = JambaLM.from_config(cfg, seed=0)
    b = JambaLM.from_config(cfg.replace(rope=True), seed=0)
    ids = torch.randint(0, 512, (1, 9))
    assert not torch.allclose(a(ids).logits, b(ids).logits)
    # RoPE preserves the first position's output (rotation by angle 0)
    torch.testing.assert_close(a(ids).logits[:, 0], b(ids).logits[:, 0])


def _masked_attention_fp64(q, k, v, past):
    """Causal attention of L queries at positions past.. over S keys, written out in fp64."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # (B, H, L, S)
    allowed = torch.arange(k.shape[2])[None, :] <= (past + torch.arange(q.shape[2]))[:, None]
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("bsz,heads,kv_heads,past", [(2, 8, 2, 13), (1, 4, 4, 100), (3, 8, 1, 700), (1, 6, 2, 0)])
def test_decode_attention_paths(bsz, heads, kv_heads, past, monkeypatch):
    """One query per head over every cached key, each path against fp64: fp32 through ops.decode_attention
    (the kernel), bf16 through the group-folded flash call, and with autograd through SDPA."""
    from jambalab import model as M
    from jambalab import ops

    torch.manual_seed(0)
    q = torch.randn(bsz, heads, 1, 16)
    k, v = torch.randn(2, bsz, kv_heads, past + 1, 16)
    want = _masked_attention_fp64(q, k, v, past)
    calls = []
    real = ops.decode_attention
    monkeypatch.setattr(ops, "decode_attention", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        assert (M.attend(q, k, v, past, None).double() - want).abs().max() < 1e-5
    assert calls == ([1] if past else [])  # the first token of a prompt is a causal call, not a decode step
    got_bf16 = M._attend_one_query(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert got_bf16.dtype == torch.bfloat16 and (got_bf16.double() - want).abs().max() < 0.05
    q1, q2 = q.clone().requires_grad_(), q.double().requires_grad_()
    M._attend_one_query(q1, k, v).square().sum().backward()
    _masked_attention_fp64(q2, k, v, past).square().sum().backward()
    assert (q1.grad.double() - q2.grad).abs().max() < 1e-4


@pytest.mark.parametrize("B,H,Hk,S,hd", [(1, 8, 2, 513, 32), (2, 8, 1, 5000, 64), (3, 6, 6, 7, 16), (1, 4, 2, 4097, 20),
                                         (2, 64, 1, 2049, 8)])
def test_decode_attention_kernel_matches_its_twin(B, H, Hk, S, hd):
    """csrc/attention.cpp against SDPA in fp64: one split or many (2048 keys each, a ragged last one),
    GQA / MQA / MHA, head dims that are and are not a multiple of the SIMD width, a KV-cache view."""
    from jambalab.ops import cpu, decode_attention_ref, fused

    if cpu.kernels() is None:
        pytest.skip(f"fused CPU kernels unavailable: {cpu.build_error()}")
    g = torch.Generator().manual_seed(S)
    q = torch.randn(B, H, hd, generator=g)
    cache = torch.randn(2, B, Hk, S + 10, hd, generator=g) * 2
    k, v = cache[0][:, :, :S], cache[1][:, :, :S]  # views with capacity beyond S, as the cache passes them
    want = decode_attention_ref(q.double(), k.double(), v.double())
    got = cpu.kernels().decode_attention(q, k, v)
    assert got.shape == (B, H, hd) and (got.double() - want).abs().max() < 1e-5  # |v| ~ 2: fp32 sums over S keys
    assert torch.equal(fused.decode_attention(q, k, v), got)


def test_decode_attention_bad_input():
    from jambalab.errors import InputError
    from jambalab.ops import cpu, fused

    q, k = torch.randn(1, 6, 16), torch.randn(1, 4, 9, 16)
    with pytest.raises(InputError, match="H a multiple of Hk"):
        fused.decode_attention(q, k, k)  # 6 query heads over 4 kv heads
    with pytest.raises(InputError, match=r"got k \(1, 2, 9, 16\), v \(1, 2, 8, 16\)"):
        fused.decode_attention(torch.randn(1, 4, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 8, 16))
    if cpu.kernels() is not None:  # the op itself refuses what the wrapper would have copied
        with pytest.raises(RuntimeError, match="contiguous rows"):
            cpu.kernels().decode_attention(torch.randn(1, 4, 16), torch.randn(1, 2, 16, 9).transpose(2, 3),
                                           torch.randn(1, 2, 9, 16))
    kt = torch.randn(1, 2, 16, 9).transpose(2, 3)  # strided keys: the twin, same numbers
    q4, v4 = torch.randn(1, 4, 16), torch.randn(1, 2, 9, 16)
    torch.testing.assert_close(fused.decode_attention(q4, kt, v4),
                               fused.decode_attention(q4, kt.contiguous(), v4), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bsz,heads,kv_heads,length,past", [(2, 8, 2, 7, 13), (1, 4, 4, 64, 100), (2, 8, 2, 300, 700),
                                                          (1, 8, 1, 33, 1), (3, 6, 2, 5, 0)])
def test_chunk_attention_split_by_past_and_new_keys(bsz, heads, kv_heads, length, past):
    from jambalab.model import _attend_past_and_new, attend

    torch.manual_seed(0)
    q = torch.randn(bsz, heads, length, 16)
    k, v = torch.randn(2, bsz, kv_heads, past + length, 16)
    want = _masked_attention_fp64(q, k, v, past)
    got = _attend_past_and_new(q, k, v, past)
    assert (got.double() - want).abs().max() < 1e-5
    with torch.no_grad():  # attend() takes the split path for a chunk after cached tokens
        assert (attend(q, k, v, past, None).double() - want).abs().max() < 1e-5
    got_bf16 = _attend_past_and_new(q.bfloat16(), k.bfloat16(), v.bfloat16(), past)
    assert got_bf16.dtype == torch.bfloat16 and (got_bf16.double() - want).abs().max() < 0.05
    # With gradients needed attend() keeps the masked path: the split one's log-sum-exp has no backward.
    q1, q2 = q.clone().requires_grad_(), q.double().requires_grad_()
    attend(q1, k, v, past, None).square().sum().backward()
    _masked_attention_fp64(q2, k, v, past).square().sum().backward()
    assert (q1.grad.double() - q2.grad).abs().max() < 1e-4
