"""The hybrid prefix-state cache: a resumed request gives what a cold run gives, checkpoints land
where the next request needs them (end of prompt, end of output, every C tokens, branch points),
and eviction keeps the byte budget (Marconi-style vs LRU)."""

import pytest
import torch

import jambalab
from jambalab.generate import prefill
from jambalab.serve.engine import SamplingParams
from jambalab.serve.prefix_cache import PrefixCache
from serve_util import stopped_after



@pytest.fixture(scope="module")
def models():
    return {name: jambalab.from_preset(name).eval() for name in ("tiny-hybrid", "tiny-mamba", "tiny-transformer")}


@pytest.fixture
def engines():
    with stopped_after(chunk_size=16, max_seq_len=512) as make:
        yield make


def _ids(n, seed):
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _serve(engine, prompt, n):
    h = engine.submit(prompt, SamplingParams(max_tokens=n, logprobs=1))
    while engine.step():
        pass
    return h, list(h)


def _check_cold_equal(model, prompt, events):
    """Greedy tokens equal the one-shot generate's; each logprob equals a full forward's within 1e-5."""
    tokens = [e.token_id for e in events]
    assert tokens == model.generate(torch.tensor([prompt]), len(tokens))[0, len(prompt):].tolist()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:]
    want = torch.log_softmax(logits, -1)[torch.arange(len(tokens)), torch.tensor(tokens)]
    torch.testing.assert_close(torch.tensor([e.logprob for e in events]), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-hybrid", "tiny-mamba", "tiny-transformer"])
def test_multi_turn_chat_resumes_from_the_last_turn(models, engines, name):
    model = models[name]
    engine = engines(model)
    system, history = _ids(40, 0), []
    for turn in range(3):
        prompt = system + history + _ids(7, turn + 1)
        h, events = _serve(engine, prompt, 6)
        _check_cold_equal(model, prompt, events)
        if turn:  # the previous turn's prompt + output (less its last, never-fed token) came from the cache
            assert h.cached_tokens == len(prev_prompt) + 5
        prev_prompt, history = prompt, prompt[len(system):] + [e.token_id for e in events]
    s = engine.stats()
    assert s["prefix_lookups"] == 3 and s["prefix_hits"] == 2 and s["prefix_tokens_reused"] > 0
    assert 0 < s["prefix_bytes"] <= engine.config.prefix_cache_bytes


def test_branch_point_is_checkpointed_for_the_next_request(models, engines):
    model = models["tiny-hybrid"]
    engine = engines(model, prefix_checkpoint_every=512)
    shared = _ids(30, 0)
    h1, _ = _serve(engine, shared + _ids(5, 1), 2)
    h2, _ = _serve(engine, shared + _ids(5, 2), 2)  # branches off request 1's path after 30 tokens
    h3, ev3 = _serve(engine, shared + _ids(5, 3), 3)
    assert (h1.cached_tokens, h2.cached_tokens, h3.cached_tokens) == (0, 0, 30)
    _check_cold_equal(model, shared + _ids(5, 3), ev3)


def test_long_prompts_are_checkpointed_every_c_tokens(models, engines):
    model = models["tiny-transformer"]
    engine = engines(model, prefix_checkpoint_every=16)
    long = _ids(50, 0)
    _serve(engine, long, 1)
    h, events = _serve(engine, long[:40] + _ids(4, 9), 4)
    assert h.cached_tokens == 32
    _check_cold_equal(model, long[:40] + _ids(4, 9), events)
    assert engine.stats()["prefill_tokens_computed"] == 50 + 12


def test_repeated_prompt_never_resumes_past_its_last_token(models, engines):
    """A checkpoint at the very end of a prompt cannot serve that prompt (its last token's logits are
    needed): the same prompt again resumes from an earlier checkpoint and still matches a cold run."""
    model = models["tiny-mamba"]
    engine = engines(model, prefix_checkpoint_every=8)
    prompt = _ids(20, 4)
    _, first = _serve(engine, prompt, 4)
    h, again = _serve(engine, prompt, 4)
    assert h.cached_tokens == 16 and [e.token_id for e in again] == [e.token_id for e in first]


# ---- the cache alone: budget and eviction -----------------------------------------------------------
def _state(model, tokens):
    cache = model.allocate_cache(1, max_length=len(tokens))
    prefill(model, torch.tensor([tokens]), cache)
    return cache


@pytest.mark.parametrize("eviction, survivor", [("lru", "short"), ("marconi", "long")])
def test_eviction_weighs_flops_saved_per_byte_against_recency(models, eviction, survivor):
    """A long checkpoint (old) and two short ones (recent), in a budget for two: LRU drops the old
    long one; Marconi's score keeps it (it saves far more prefill FLOPs per byte) and drops a short one."""
    model = models["tiny-hybrid"]
    long_t, s1, s2 = _ids(200, 1), _ids(4, 2), _ids(4, 3)
    states = {k: _state(model, t) for k, t in (("long", long_t), ("s1", s1), ("s2", s2))}
    budget = states["long"].nbytes() + states["s1"].nbytes() + 1
    cache = PrefixCache(model, budget, eviction)
    for k, t in (("long", long_t), ("s1", s1), ("s2", s2)):
        cache.insert(t, states[k])
    assert cache.evictions == 1 and cache.bytes <= budget and cache.checkpoints == 2
    kept_long = cache.lookup(long_t + [5], 10**9)[0] == 200
    assert kept_long == (survivor == "long")
    assert cache.lookup(s2 + [5], 10**9)[0] == 4  # the newest is kept by both


def test_eviction_frees_the_tree_and_rejects_a_checkpoint_over_budget(models):
    model = models["tiny-mamba"]
    one = _state(model, _ids(5, 1))
    cache = PrefixCache(model, one.nbytes() * 3, "lru")
    for seed in range(10):
        t = _ids(5, seed)
        cache.insert(t, _state(model, t))
    assert cache.checkpoints == 3 and cache.evictions == 7 and cache.bytes == 3 * one.nbytes()
    assert len([n for n in cache._nodes() if n is not cache.root]) == 3  # evicted leaves are pruned
    tiny = PrefixCache(model, one.nbytes() - 1, "marconi")
    tiny.insert(_ids(5, 1), one)
    assert tiny.checkpoints == 0 and tiny.bytes == 0


def test_snapshot_size_is_known_before_copying(models, engines):
    for name, model in models.items():
        engine = engines(model)
        engine.slots.open(0, 40)
        engine.slots.lengths[0] = 23
        assert engine.slots.snapshot_nbytes(0) == engine.slots.snapshot(0).nbytes(), name
