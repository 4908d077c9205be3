"""The serving engine is exact: each request's greedy tokens equal `model.generate`'s alone,
whatever else is in the batch (staggered arrivals, different lengths, different finishing times)."""

import threading

import pytest
import torch

import jambalab
from jambalab.errors import ConfigError, InputError
from jambalab.serve.engine import Engine, EngineConfig, EngineFullError, SamplingParams, TokenEvent
from serve_util import TIMEOUT, stopped_after

CHUNK = 16


@pytest.fixture(scope="module")
def models():
    return {(name, dtype): jambalab.from_preset(name).eval().to(dtype)
            for name in ("tiny-hybrid", "tiny-mamba", "tiny-transformer")
            for dtype in (torch.float32, torch.bfloat16)}


@pytest.fixture
def engines():
    """Engines made through this fixture are always stopped, even when a test fails."""
    with stopped_after(chunk_size=CHUNK, max_seq_len=256, prefix_cache_bytes=0) as make:
        yield make


def _prompts(lengths, seed=1, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _alone(model, prompt, n, chunk=CHUNK):
    return model.generate(torch.tensor([prompt]), n, chunk_size=chunk)[0, len(prompt):].tolist()


def _run(engine, arrivals):
    """Step an un-started engine by hand: arrivals is [(step, prompt, params)]; returns handles."""
    handles, step = [], 0
    pending = sorted(arrivals, key=lambda a: a[0])
    while pending or not engine.idle():
        while pending and pending[0][0] <= step:
            _, prompt, params = pending.pop(0)
            handles.append(engine.submit(prompt, params))
        engine.step()
        step += 1
        assert step < 2000
    return handles


# ---- exactness ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-hybrid", "tiny-mamba", "tiny-transformer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_tokens_equal_generate_alone(models, engines, name, dtype):
    """Staggered arrivals, prompts from 3 to 40 tokens (some prefilled over several steps while
    others decode), and max_tokens so that requests finish at different steps."""
    model = models[name, dtype]
    prompts = _prompts([9, 40, 3, 23, 17])
    max_tokens = [10, 4, 14, 7, 9]
    engine = engines(model, max_batch=4)  # 5 requests, 4 slots: one waits for a free slot
    arrivals = [(step, p, SamplingParams(max_tokens=m)) for step, p, m in zip([0, 0, 2, 3, 5], prompts, max_tokens)]
    handles = _run(engine, arrivals)
    for p, m, h in zip(prompts, max_tokens, handles):
        assert h.result(0) == _alone(model, p, m), f"prompt of {len(p)} tokens"
        assert h.finish_reason == "length"


def test_wide_decode_batch_matches_forward_logits(models, engines):
    """8 rows decode together (wider than the fused 4-row kernels): the greedy tokens still equal
    the lone run's, and each token's log-probability is the full forward's within 1e-5."""
    model = models["tiny-hybrid", torch.float32]
    prompts = _prompts([5, 12, 7, 30, 9, 3, 18, 11], seed=2)
    engine = engines(model, max_batch=8, chunk_size=64)
    handles = _run(engine, [(0, p, SamplingParams(max_tokens=8, logprobs=2)) for p in prompts])
    for p, h in zip(prompts, handles):
        events = list(h)
        tokens = [e.token_id for e in events]
        assert tokens == _alone(model, p, 8, chunk=None)
        with torch.no_grad():
            logits = model(torch.tensor([p + tokens[:-1]])).logits[0, len(p) - 1:]  # (8, V)
        want = torch.log_softmax(logits, -1)[torch.arange(8), torch.tensor(tokens)]
        torch.testing.assert_close(torch.tensor([e.logprob for e in events]), want, rtol=0, atol=1e-5)
        assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0][1] >= e.top_logprobs[1][1] for e in events)


def test_threads_submit_while_engine_runs(models, engines):
    model = models["tiny-hybrid", torch.float32]
    engine = engines(model, max_batch=3).start()
    prompts = _prompts([6, 25, 11, 4, 33, 8], seed=3)
    results, seen = {}, {}

    def client(i):
        events = []
        h = engine.submit(prompts[i], SamplingParams(max_tokens=6 + i), on_event=events.append)
        results[i] = [e.token_id for e in h]
        seen[i] = events

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads)
    for i, p in enumerate(prompts):
        assert results[i] == _alone(model, p, 6 + i)
        assert [e.token_id for e in seen[i]] == results[i] and seen[i][-1].finish_reason == "length"
    s = engine.stats()
    assert s["requests_finished"] == 6 and s["running"] == 0 and s["free_slots"] == 3
    assert s["generated_tokens"] == sum(6 + i for i in range(6)) and s["prompt_tokens"] == sum(map(len, prompts))


# ---- sampling, stopping, cancelling ---------------------------------------------------------------
def test_seeded_sampling_is_the_same_alone_and_in_a_batch(models, engines):
    model = models["tiny-hybrid", torch.float32]
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=7)
    alone = _run(engines(model), [(0, _prompts([10])[0], params)])[0].result(0)
    others = [(0, p, SamplingParams(max_tokens=9, temperature=1.0, seed=i)) for i, p in enumerate(_prompts([4, 20]))]
    batched = _run(engines(model), others + [(1, _prompts([10])[0], params)])[-1].result(0)
    assert batched == alone
    unseeded = _run(engines(model), [(0, _prompts([10])[0], SamplingParams(max_tokens=12, temperature=0.9))])
    assert len(unseeded[0].result(0)) == 12


def test_stop_token_ends_the_request(models, engines):
    model = models["tiny-mamba", torch.float32]
    prompt = _prompts([8])[0]
    free_run = _alone(model, prompt, 10)
    h = _run(engines(model), [(0, prompt, SamplingParams(max_tokens=10, stop_token_ids=(free_run[3],)))])[0]
    cut = free_run.index(free_run[3]) + 1
    assert h.result(0) == free_run[:cut] and h.finish_reason == "stop"


def test_cancel_frees_the_slot_and_leaves_others_exact(models, engines):
    model = models["tiny-hybrid", torch.float32]
    engine = engines(model, max_batch=2)
    a, b, c = _prompts([7, 12, 5], seed=4)
    ha = engine.submit(a, SamplingParams(max_tokens=50))
    hb = engine.submit(b, SamplingParams(max_tokens=6))
    hc = engine.submit(c, SamplingParams(max_tokens=6))  # waits: both slots are taken
    for _ in range(3):
        engine.step()
    ha.cancel()
    while engine.step():
        pass
    assert ha.finish_reason == "cancelled" and list(ha)[-1].token_id is None
    assert hb.result(0) == _alone(model, b, 6) and hc.result(0) == _alone(model, c, 6)
    assert engine.stats()["free_slots"] == 2


def test_stop_without_drain_cancels_everything(models, engines):
    engine = engines(models["tiny-mamba", torch.float32]).start()
    hs = [engine.submit(p, SamplingParams(max_tokens=200)) for p in _prompts([5, 6])]
    engine.stop(drain=False, timeout=TIMEOUT)
    assert all(h.result(TIMEOUT) is not None and h.finish_reason in ("cancelled", "length") for h in hs)
    with pytest.raises(EngineFullError):
        engine.submit([5], SamplingParams(max_tokens=1))


def test_stop_with_drain_finishes_everything(models, engines):
    engine = engines(models["tiny-mamba", torch.float32]).start()
    hs = [engine.submit(p, SamplingParams(max_tokens=5)) for p in _prompts([5, 6, 7])]
    engine.stop(drain=True, timeout=TIMEOUT)
    assert [len(h.result(0)) for h in hs] == [5, 5, 5]


# ---- budgets and bad input ------------------------------------------------------------------------
def test_kv_budget_queues_requests_and_never_exceeds_it(models, engines):
    model = models["tiny-transformer", torch.float32]
    engine = engines(model, max_batch=4, kv_budget_tokens=40)
    prompts = _prompts([10, 12, 9, 14], seed=5)
    handles = [engine.submit(p, SamplingParams(max_tokens=8)) for p in prompts]
    peak = 0
    while engine.step():
        peak = max(peak, engine.stats()["kv_tokens_reserved"])
    assert 0 < peak <= 40
    for p, h in zip(prompts, handles):
        assert h.result(0) == _alone(model, p, 8)


def test_waiting_queue_limit_raises_engine_full(models, engines):
    engine = engines(models["tiny-mamba", torch.float32], max_waiting=2)
    engine.submit([3], SamplingParams(max_tokens=1))
    engine.submit([4], SamplingParams(max_tokens=1))
    with pytest.raises(EngineFullError, match="waiting queue is full"):
        engine.submit([5], SamplingParams(max_tokens=1))


@pytest.mark.parametrize("prompt, params, match", [
    ([], SamplingParams(max_tokens=4), "empty"),
    ([3, 512], SamplingParams(max_tokens=4), "512"),
    ([3, -1], SamplingParams(max_tokens=4), "-1"),
    ([3, 1.5], SamplingParams(max_tokens=4), "1.5"),
    ([3], SamplingParams(max_tokens=0), "max_tokens"),
    ([3] * 250, SamplingParams(max_tokens=10), "max_seq_len"),
    ([3], SamplingParams(max_tokens=4, temperature=-1), "temperature"),
    ([3], SamplingParams(max_tokens=4, top_p=0), "top_p"),
    ([3], SamplingParams(max_tokens=4, top_k=-2), "top_k"),
    ([3], SamplingParams(max_tokens=4, logprobs=21), "logprobs"),
    ([3], SamplingParams(max_tokens=4, stop_token_ids=(600,)), "stop_token_ids"),
    ([3] * 30, SamplingParams(max_tokens=20), "kv_budget_tokens"),
])
def test_bad_request_is_refused_alone(models, engines, prompt, params, match):
    model = models["tiny-hybrid", torch.float32]
    engine = engines(model, kv_budget_tokens=48)
    good = engine.submit(_prompts([6])[0], SamplingParams(max_tokens=5))
    engine.step()
    with pytest.raises(InputError, match=match):
        engine.submit(prompt, params)
    while engine.step():
        pass
    assert good.result(0) == _alone(model, _prompts([6])[0], 5)


def test_bad_engine_config_is_a_config_error(models):
    with pytest.raises(ConfigError, match="max_batch"):
        Engine(models["tiny-mamba", torch.float32], EngineConfig(max_batch=0))
    with pytest.raises(ConfigError, match="eviction"):
        Engine(models["tiny-mamba", torch.float32], EngineConfig(eviction="fifo"))


def test_result_times_out_and_event_type(models, engines):
    engine = engines(models["tiny-mamba", torch.float32])  # never started, never stepped
    h = engine.submit([3, 4], SamplingParams(max_tokens=2))
    with pytest.raises(TimeoutError):
        h.result(timeout=0.01)
    engine.step()
    assert isinstance(h._events.get(timeout=TIMEOUT), TokenEvent)


def test_a_failing_prefill_fails_that_request_alone(models, engines, monkeypatch):
    """An error inside the model (here: injected into one request's prefill) ends that request with
    finish_reason "error"; the engine keeps serving the others, exactly."""
    model = models["tiny-hybrid", torch.float32]
    engine = engines(model)
    a, bad = _prompts([6, 9], seed=6)
    forward = type(model).forward

    def flaky(self, input_ids, *args, **kwargs):
        if input_ids.shape[1] == len(bad) and input_ids[0].tolist() == bad:
            raise RuntimeError("injected failure")
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", flaky)
    ha = engine.submit(a, SamplingParams(max_tokens=6))
    hb = engine.submit(bad, SamplingParams(max_tokens=6))
    while engine.step():
        pass
    monkeypatch.undo()
    assert hb.finish_reason == "error" and "injected failure" in hb.error
    with pytest.raises(InputError, match="injected failure"):
        hb.result(0)
    assert ha.result(0) == _alone(model, a, 6) and engine.stats()["free_slots"] == engine.config.max_batch


# ---- cost-aware chunked prefill -----------------------------------------------------------------
def test_chunks_deep_into_a_prompt_shrink_to_the_first_chunks_flops(models, engines):
    """A step prefills at most the estimated FLOPs of a first chunk: once attention over the cached
    prefix makes a token dear, the chunks get shorter (never longer than chunk_size), each within the
    budget; the streams decode one token every step meanwhile, and the long request stays exact."""
    model = models["tiny-transformer", torch.float32]
    engine = engines(model, max_seq_len=2048)
    cost = engine.cost
    assert cost.attention > 0 and cost.linear > 0
    long_len = int(3 * cost.linear // cost.attention)  # deep enough that attention dominates a token's cost
    stream, long_prompt = _prompts([5, long_len], seed=7)
    s = engine.submit(stream, SamplingParams(max_tokens=600))
    while len(s.tokens) < 2:
        engine.step()
    h = engine.submit(long_prompt, SamplingParams(max_tokens=3))
    chunks, base = [], engine.stats()["prefill_tokens_computed"]
    before = 0
    while h.finish_reason is None:
        n_stream = len(s.tokens)
        engine.step()
        after = engine.stats()["prefill_tokens_computed"] - base  # the long prompt's position
        chunks.append((before, after))
        before = after
        assert len(s.tokens) == n_stream + 1  # no step skipped the stream's decode
    s.cancel()
    engine.step()
    sizes = [b - a for a, b in chunks if b > a]
    assert sizes[0] == CHUNK and max(sizes) == CHUNK and min(sizes[:-1]) < CHUNK // 2
    assert all(x >= y for x, y in zip(sizes[:-2], sizes[1:-1]))  # shrinking with depth (the last is the rest)
    assert all(cost(a, b) <= engine.step_flops for a, b in chunks if b > a)
    assert sum(sizes) == long_len
    assert h.tokens == _alone(model, long_prompt, 3, chunk=None)


def test_prefill_cost_chunk_end():
    from jambalab.serve.cost import PrefillCost

    cost = PrefillCost(jambalab.from_preset("tiny-hybrid"))
    budget = cost(0, 64)
    assert cost.chunk_end(0, 64, budget) == 64
    for start in (500, 5_000, 50_000):
        end = cost.chunk_end(start, 64, budget)
        assert start < end < start + 64 and cost(start, end) <= budget < cost(start, end + 1)
    assert cost.chunk_end(10**9, 64, budget) == 10**9 + 1  # never less than one token


def test_the_attention_weight_makes_deep_chunks_shorter():
    """EngineConfig.attention_cost weighs attention FLOPs against GEMM ones: deep in a prompt, where attention
    dominates, a heavier weight cuts shorter chunks; at position 0 the chunk stays whole."""
    from jambalab.serve.cost import PrefillCost

    model = jambalab.from_preset("tiny-hybrid")
    plain, heavy = PrefillCost(model), PrefillCost(model, 2.0)
    assert heavy.attention == 2 * plain.attention and heavy.linear == plain.linear
    assert heavy.chunk_end(0, 64, heavy(0, 64)) == 64
    assert heavy.chunk_end(50_000, 64, heavy(0, 64)) < plain.chunk_end(50_000, 64, plain(0, 64))
    engine = Engine(model, EngineConfig(attention_cost=2.0, prefix_cache_bytes=0))
    assert engine.cost.attention == heavy.attention
    for bad in (0, -1, True, "1.4", 1e3):
        with pytest.raises(ConfigError, match="attention_cost"):
            EngineConfig(attention_cost=bad).validate()
