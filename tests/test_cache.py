"""The hybrid cache: sizes, batch surgery, copies for prefix reuse, files, mismatches."""

import pytest
import torch

import jambalab
from jambalab import HybridCache, JambaConfig
from jambalab.cache import AttentionState, MambaState
from jambalab.errors import CheckpointError, InputError

ATOL = 1e-5


@pytest.fixture(scope="module")
def hybrid():
    return jambalab.from_preset("tiny-hybrid").eval()


def _ids(bsz, length, vocab=512):
    return torch.randint(3, vocab, (bsz, length))


def test_layers_hold_kv_only_for_attention(hybrid):
    cfg = hybrid.config
    cache = hybrid.allocate_cache(2)
    kinds = ["attention" if isinstance(s, AttentionState) else "mamba" for s in cache.layers]
    assert kinds == cfg.layer_types
    for s in cache.layers:
        if isinstance(s, MambaState):
            assert s.conv.shape == (2, cfg.d_inner, cfg.d_conv)
            assert s.ssm.shape == (2, cfg.d_inner, cfg.d_state) and s.ssm.dtype == torch.float32


def test_nbytes_kv_grows_with_length_mamba_state_does_not(hybrid):
    cfg = hybrid.config
    cache = hybrid.allocate_cache(2)
    with torch.no_grad():
        hybrid(_ids(2, 10), cache=cache)
    kv10, state10 = cache.kv_bytes(), cache.state_bytes()
    with torch.no_grad():
        hybrid(_ids(2, 10), cache=cache)
    assert cache.kv_bytes() == 2 * kv10
    assert cache.state_bytes() == state10
    per_token = 2 * cfg.n_attention_layers * cfg.n_kv_heads * cfg.head_dim * 4  # K and V, fp32
    assert kv10 == 2 * 10 * per_token
    mamba = cfg.n_mamba_layers * 2 * cfg.d_inner * (cfg.d_state * 4 + cfg.d_conv * 4)
    assert state10 == mamba and cache.nbytes() == kv10 * 2 + mamba


def test_bf16_cache_keeps_fp32_ssm_state():
    model = jambalab.from_preset("tiny-mamba").to(torch.bfloat16)
    cache = model.allocate_cache(1)
    assert cache.layers[0].conv.dtype == torch.bfloat16 and cache.layers[0].ssm.dtype == torch.float32


def test_select_reorders_rows(hybrid):
    ids, nxt = _ids(3, 9), _ids(3, 1)
    cache = hybrid.allocate_cache(3)
    with torch.no_grad():
        hybrid(ids, cache=cache)
        sub = cache.select([2, 0])
        got = hybrid(nxt[[2, 0]], cache=sub).logits
        want = hybrid(torch.cat([ids, nxt], 1)[[2, 0]]).logits[:, -1:]
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    assert sub.batch_size == 2 and cache.batch_size == 3


def test_select_rejects_rows_out_of_range(hybrid):
    with pytest.raises(InputError, match="out of range"):
        hybrid.allocate_cache(2).select([0, 2])


def test_prefix_state_reuse_equals_recomputing(hybrid):
    """Prefill a shared prefix once; continue two continuations from copies of its state."""
    prefix, conts = _ids(1, 12), [_ids(1, 5), _ids(1, 3)]
    cache = hybrid.allocate_cache(1)
    with torch.no_grad():
        hybrid(prefix, cache=cache)
        before = [t.clone() for s in cache.layers for t in ((s.k, s.v) if isinstance(s, AttentionState) else (s.conv, s.ssm))]
        for cont in conts:
            got = hybrid(cont, cache=cache.copy()).logits
            want = hybrid(torch.cat([prefix, cont], 1)).logits[:, prefix.shape[1]:]
            torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    after = [t for s in cache.layers for t in ((s.k, s.v) if isinstance(s, AttentionState) else (s.conv, s.ssm))]
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "continuing a copy changed the original"
    assert cache.length == 12


def test_expand_one_prefix_to_a_batch(hybrid):
    prefix, conts = _ids(1, 8), _ids(3, 4)
    cache = hybrid.allocate_cache(1)
    with torch.no_grad():
        hybrid(prefix, cache=cache)
        got = hybrid(conts, cache=cache.expand(3)).logits
        want = hybrid(torch.cat([prefix.expand(3, -1), conts], 1)).logits[:, 8:]
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    with pytest.raises(InputError, match="batch-1"):
        cache.expand(2).expand(2)


@pytest.mark.parametrize("preset", ["tiny-hybrid", "tiny-mamba", "tiny-mixtral"])
def test_saved_prefix_state_equals_recomputed(tmp_path, preset):
    model = jambalab.from_preset(preset).eval()
    # left-padded batch, so the key mask travels through the file too
    ids, mask = _ids(2, 10), torch.ones(2, 10, dtype=torch.bool)
    mask[0, :4] = False
    cont = _ids(2, 3)
    cache = model.allocate_cache(2)
    with torch.no_grad():
        model(ids, cache=cache, attention_mask=mask)
        cache.save(tmp_path / "prefix.pt")
        loaded = HybridCache.load(tmp_path / "prefix.pt", model.config)
        assert loaded.length == 10 and loaded.nbytes() == cache.nbytes()
        got = model(cont, cache=loaded).logits
        want = model(cont, cache=cache).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_load_rejects_another_model_and_bad_files(tmp_path, hybrid):
    cache = hybrid.allocate_cache(1)
    with torch.no_grad():
        hybrid(_ids(1, 4), cache=cache)
    cache.save(tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="another model"):
        HybridCache.load(tmp_path / "c.pt", JambaConfig.from_preset("tiny-mamba"))
    with pytest.raises(CheckpointError, match="does not exist"):
        HybridCache.load(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a cache")
    with pytest.raises(CheckpointError, match="corrupt"):
        HybridCache.load(tmp_path / "bad.pt")
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a jambalab cache"):
        HybridCache.load(tmp_path / "other.pt")


def test_model_rejects_cache_of_another_model_or_batch_size(hybrid):
    other = jambalab.from_preset("tiny-mamba")
    with pytest.raises(InputError, match="another model"):
        hybrid(_ids(1, 3), cache=other.allocate_cache(1))
    with pytest.raises(InputError, match="batch size"):
        hybrid(_ids(2, 3), cache=hybrid.allocate_cache(3))
    with pytest.raises(InputError, match="positive"):
        hybrid.allocate_cache(0)


def test_kv_grows_past_preallocated_length(hybrid):
    ids = _ids(1, 40)
    cache = hybrid.allocate_cache(1, max_length=4)
    with torch.no_grad():
        for s in range(0, 40, 6):
            out = hybrid(ids[:, s:s + 6], cache=cache).logits
        want = hybrid(ids).logits[:, -out.shape[1]:]
    torch.testing.assert_close(out, want, rtol=0, atol=ATOL)
    assert cache.length == 40
