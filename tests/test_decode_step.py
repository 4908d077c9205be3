"""The whole-token decode op (ops.decode_step, csrc/step.cpp and step_bf16.cpp) against its twin, the
model's layer-by-layer decode: bitwise equal logits and states (float32 weights, int8 / 4-bit ones in
the int8-activation mode, weight-only bf16, and a bf16 model), and a fall back wherever it does not apply."""

import pytest
import torch

import jambalab
import jambalab.model as model_module
from jambalab import decode_step as ds
from jambalab import ops
from jambalab.generate import generate, prefill
from jambalab.ops import cpu
from jambalab.quant import quantize_model, set_activations


def needs_kernels():
    if cpu.kernels() is None or ops.decode_step is None:
        pytest.skip("fused kernels unavailable")


def _decode(model, ids, fast: bool, monkeypatch, steps: int = 5):
    """Prefill ids, then greedy-decode `steps` tokens; (stacked logits, final cache, op calls)."""
    calls = []
    real = ops.decode_step
    monkeypatch.setattr(ops, "decode_step", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(model_module, "decode_step", ds.decode_step if fast else (lambda *a: None))
    cache = model.allocate_cache(ids.shape[0])  # capacity 0: the step grows the KV cache itself
    logits = [prefill(model, ids, cache)]
    with torch.no_grad():
        for _ in range(steps):
            logits.append(model(logits[-1].argmax(-1, keepdim=True), cache=cache).logits[:, -1])
    monkeypatch.undo()
    return torch.stack(logits), cache, len(calls)


def _states(cache):
    return [t[:, :, :cache.length] if t.dim() == 4 else t
            for st in cache.layers for t in ((st.k, st.v) if hasattr(st, "k") else (st.conv, st.ssm))]


def _assert_step_equals_layers(model, bsz: int, monkeypatch) -> None:
    """5 greedy tokens after a 9-token prompt, through the step and layer by layer: bitwise equal logits
    and cache states (of the same dtypes)."""
    ids = torch.randint(3, model.config.vocab_size, (bsz, 9), generator=torch.Generator().manual_seed(1))
    got, got_cache, calls = _decode(model, ids, True, monkeypatch)
    want, want_cache, none = _decode(model, ids, False, monkeypatch)
    assert calls == 5 and none == 0
    assert torch.equal(got, want)
    assert got_cache.length == want_cache.length == 14
    for a, b in zip(_states(got_cache), _states(want_cache)):
        assert a.dtype == b.dtype and torch.equal(a, b)


CASES = [("tiny-hybrid", {}), ("tiny-mamba", {}), ("tiny-falcon-mamba", {}), ("tiny-transformer", {}),
         ("tiny-mixtral", {"rope": False})]


@pytest.mark.parametrize("preset,overrides", CASES)
@pytest.mark.parametrize("bsz", [1, 3, 8])
def test_decode_step_equals_the_layer_by_layer_decode(preset, overrides, bsz, monkeypatch):
    needs_kernels()
    _assert_step_equals_layers(jambalab.from_preset(preset, seed=0, **overrides).eval(), bsz, monkeypatch)


@pytest.mark.parametrize("preset,overrides", CASES)
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("bsz", [1, 3])
def test_a_quantized_decode_step_equals_the_layer_by_layer_decode(preset, overrides, scheme, bsz, monkeypatch):
    """int8 / 4-bit matrices (QuantLinear, QuantMoE's stacked experts) in a float32 model: the step
    rounds x to int8 per block of 32 and multiplies as wgemv_a8, in qlinear's blocks of 4 rows."""
    needs_kernels()
    model = quantize_model(jambalab.from_preset(preset, seed=0, **overrides).eval(), scheme)
    assert any(t.numel() for t in ds.build_plan(model).scales)  # quantized matrices went into the plan
    ids = torch.randint(3, model.config.vocab_size, (bsz, 9), generator=torch.Generator().manual_seed(1))
    got, got_cache, calls = _decode(model, ids, True, monkeypatch)
    want, _, none = _decode(model, ids, False, monkeypatch)
    assert calls == 5 and none == 0
    assert torch.equal(got, want)


@pytest.mark.parametrize("preset,overrides", CASES)
@pytest.mark.parametrize("bsz", [1, 3, 8])
def test_a_weight_only_bf16_decode_step_equals_the_layer_by_layer_decode(preset, overrides, bsz, monkeypatch):
    """bf16 matrices (Linear weights, the MoE's stacks) in a float32 model: the step rounds x to bf16
    once per matrix input and multiplies as the gemv op; each row as if alone."""
    needs_kernels()
    model = quantize_model(jambalab.from_preset(preset, seed=0, **overrides).eval(), "bf16")
    plan = ds.build_plan(model)
    assert any(w.dtype == torch.bfloat16 for w in plan.weights)  # bf16 matrices went into the plan
    _assert_step_equals_layers(model, bsz, monkeypatch)


@pytest.mark.parametrize("preset,overrides", CASES)
@pytest.mark.parametrize("bsz", [1, 2, 4, 7, 16])
def test_a_bf16_model_decode_step_equals_the_layer_by_layer_decode(preset, overrides, bsz, monkeypatch):
    """A bf16 model (bf16 activations, conv states and K/V caches; a bf16 or, in the Mamba presets, a
    float32 residual): csrc/step_bf16.cpp rounds where the layer path rounds, MoE and attention included;
    above 4 rows each weight row serves them in groups of 4 (a row's sums as if alone)."""
    needs_kernels()
    model = jambalab.from_preset(preset, seed=0, **overrides).eval().to(torch.bfloat16)
    assert ds.build_plan(model).max_rows == 16
    _assert_step_equals_layers(model, bsz, monkeypatch)


def test_a_bf16_model_step_on_several_threads_equals_one(monkeypatch):
    """Above 2 MiB of weights the bf16 step shares its GEMVs over the threads (its ATen calls, flash
    attention among them, stay on the caller's thread)."""
    needs_kernels()
    model = jambalab.from_preset("tiny-hybrid", seed=0, vocab_size=16384).eval().to(torch.bfloat16)  # 2 MiB lm_head
    ids = torch.randint(3, 16384, (3, 5), generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    try:
        for n in (2, 1):
            torch.set_num_threads(n)
            got, _, calls = _decode(model, ids, True, monkeypatch, steps=4)
            want, _, _ = _decode(model, ids, False, monkeypatch, steps=4)
            assert calls == 4 and torch.equal(got, want)
            assert torch.get_num_threads() == n  # the step put the caller's OpenMP thread count back
    finally:
        torch.set_num_threads(threads)


def test_the_float_activation_mode_decodes_a_quantized_model_layer_by_layer(monkeypatch):
    """The step multiplies quantized weights only as the int8-activation mode does."""
    needs_kernels()
    model = quantize_model(jambalab.from_preset("tiny-hybrid", seed=0).eval(), "int8")
    ids = torch.randint(3, 512, (1, 6), generator=torch.Generator().manual_seed(4))
    calls = _count_calls(monkeypatch)
    set_activations("float")
    try:
        generate(model, ids, 3)
        assert not calls
    finally:
        set_activations("int8")
    generate(model, ids, 3)
    assert len(calls) == 2


def test_decode_step_on_several_threads_equals_one(monkeypatch):
    """A step reading more than 2 MiB shares its large GEMVs (here the lm_head) over the threads."""
    needs_kernels()
    model = jambalab.from_preset("tiny-hybrid", seed=0, vocab_size=16384).eval()  # 4 MiB lm_head
    ids = torch.randint(3, 16384, (2, 5), generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    try:
        for n in (2, 1):  # prefill's own kernels split by the thread count: compare at equal counts
            torch.set_num_threads(n)
            got, _, calls = _decode(model, ids, True, monkeypatch, steps=4)
            want, _, _ = _decode(model, ids, False, monkeypatch, steps=4)
            assert calls == 4 and torch.equal(got, want)
    finally:
        torch.set_num_threads(threads)


def _slot_steps(model, slots, rows: list[int], ids: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """Greedy-decode `steps` tokens for the given slots as one ragged batch; the logits (steps, R, V)."""
    logits = []
    with torch.no_grad():
        for _ in range(steps):
            batch = slots.batch(rows)
            logits.append(model(ids, cache=batch).logits[:, -1])
            slots.scatter_back(batch, rows)
            for s in rows:
                slots.lengths[s] += 1
            ids = logits[-1].argmax(-1, keepdim=True)
    return torch.stack(logits)


def _filled_slots(model, rows: list[int], n_slots: int = 16):
    """A SlotCache whose given slots hold prompts of different lengths, each prefilled alone."""
    from jambalab.serve.slots import SlotCache

    slots = SlotCache(model, n_slots)
    for i, s in enumerate(rows):
        slots.open(s, 40)
        prompt = torch.randint(3, model.config.vocab_size, (1, 3 + 2 * i), generator=torch.Generator().manual_seed(s))
        prefill(model, prompt, slots.row_cache(s))
        slots.lengths[s] = prompt.shape[1]
    return slots


@pytest.mark.parametrize("scheme", [None, "int8", "int4", "bf16", "bf16 model"])
def test_sixteen_rows_each_as_if_alone(scheme, monkeypatch):
    """16 ragged rows in one step call (an MoE expert runs once on all its rows, a quantized one in
    blocks of 4 rows, a bf16 model's in groups of 4): each row's logits and states are bitwise those of
    the same row stepped alone."""
    needs_kernels()
    model = jambalab.from_preset("tiny-hybrid", seed=0).eval()
    if scheme == "bf16 model":
        model = model.to(torch.bfloat16)
    elif scheme:
        quantize_model(model, scheme)
    rows = list(range(16))
    ids = torch.randint(3, 512, (16, 1), generator=torch.Generator().manual_seed(6))
    calls = _count_calls(monkeypatch)
    batched = _filled_slots(model, rows)
    got = _slot_steps(model, batched, rows, ids)
    alone = _filled_slots(model, rows)
    for r in rows:
        want = _slot_steps(model, alone, [r], ids[r:r + 1])
        assert torch.equal(got[:, r:r + 1], want)
        for a, b in zip(_states(batched.snapshot(r)), _states(alone.snapshot(r))):
            assert torch.equal(a, b)
    assert len(calls) == 3 + 3 * 16


@pytest.mark.parametrize("preset,scheme", [("tiny-hybrid", None), ("tiny-transformer", None), ("tiny-hybrid", "int8"),
                                           ("tiny-hybrid", "bf16"), ("tiny-hybrid", "bf16 model")])
def test_a_ragged_slot_batch_equals_the_layer_by_layer_decode(preset, scheme, monkeypatch):
    """The serving engine's SlotBatch: rows at different lengths, each with its own K/V tensors,
    non-consecutive slots (gathered Mamba rows): one step call, bitwise the layer-by-layer path."""
    needs_kernels()
    model = jambalab.from_preset(preset, seed=0).eval()
    if scheme == "bf16 model":
        model = model.to(torch.bfloat16)
    elif scheme:
        quantize_model(model, scheme)
    rows = [0, 2, 3, 5, 6, 7]
    ids = torch.randint(3, 512, (len(rows), 1), generator=torch.Generator().manual_seed(8))
    results = []
    for fast in (True, False):
        slots = _filled_slots(model, rows, n_slots=8)
        calls = _count_calls(monkeypatch)
        monkeypatch.setattr(model_module, "decode_step", ds.decode_step if fast else (lambda *a: None))
        logits = _slot_steps(model, slots, rows, ids)
        monkeypatch.undo()
        assert len(calls) == (3 if fast else 0)
        results.append((logits, [_states(slots.snapshot(s)) for s in rows]))
    (got, got_states), (want, want_states) = results
    assert torch.equal(got, want)
    for a_row, b_row in zip(got_states, want_states):
        for a, b in zip(a_row, b_row):
            assert torch.equal(a, b)


def _count_calls(monkeypatch):
    calls = []
    real = ops.decode_step
    monkeypatch.setattr(ops, "decode_step", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("change", ["rope", "bf16_seventeen_rows", "bf16_top3", "grad", "padded", "seventeen_rows",
                                    "empty_cache"])
def test_what_the_step_does_not_take_decodes_layer_by_layer(change, monkeypatch):
    needs_kernels()
    overrides = {"top_k": 3} if change == "bf16_top3" else {}
    model = jambalab.from_preset("tiny-mixtral" if change == "rope" else "tiny-hybrid", seed=0, **overrides).eval()
    if change.startswith("bf16"):  # a bf16 model: at most 16 rows (wgemv's), MoE top-k at most 2
        model = model.to(torch.bfloat16)
    bsz = {"seventeen_rows": 17, "bf16_seventeen_rows": 17}.get(change, 2)
    ids = torch.randint(3, 512, (bsz, 6), generator=torch.Generator().manual_seed(3))
    calls = _count_calls(monkeypatch)
    cache = model.allocate_cache(bsz)
    if change == "empty_cache":
        with torch.no_grad():
            out = model(ids[:, :1], cache=cache)
    elif change == "padded":
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        out = generate(model, ids, 3, attention_mask=mask)
    else:
        prefill(model, ids, cache)
        with torch.enable_grad() if change == "grad" else torch.no_grad():
            out = model(ids[:, -1:], cache=cache)
    assert out is not None and not calls


def test_a_swapped_module_rebuilds_the_plan(monkeypatch):
    """quantize_model swaps modules: the plan is rebuilt around the int8 weights (not the float ones,
    which the swap dropped)."""
    needs_kernels()
    model = jambalab.from_preset("tiny-hybrid", seed=0, tie_embeddings=False).eval()
    ids = torch.randint(3, 512, (1, 6), generator=torch.Generator().manual_seed(4))
    calls = _count_calls(monkeypatch)
    generate(model, ids, 3)
    assert len(calls) == 2 and model._decode_plan.scales[2].numel() == 0
    quantize_model(model, "int8")
    generate(model, ids, 3)
    assert len(calls) == 4 and model._decode_plan.weights[2].dtype == torch.int8


def test_generate_with_the_step_equals_generate_without(monkeypatch):
    needs_kernels()
    model = jambalab.from_preset("tiny-hybrid", seed=0).eval()
    ids = torch.randint(3, 512, (2, 7), generator=torch.Generator().manual_seed(5))
    fast = generate(model, ids, 12, do_sample=True, top_k=20, seed=3)
    monkeypatch.setattr(model_module, "decode_step", lambda *a: None)
    assert torch.equal(fast, generate(model, ids, 12, do_sample=True, top_k=20, seed=3))


def test_one_aten_thread_is_a_setting_of_the_calling_thread_and_is_put_back():
    """cpu.one_aten_thread (around sampling between decode steps): ATen sees one thread inside, the
    previous count after, also after an exception, and other threads keep theirs."""
    needs_kernels()
    import threading

    threads = torch.get_num_threads()
    seen = []
    try:
        torch.set_num_threads(2)
        with cpu.one_aten_thread():
            assert torch.get_num_threads() == 1
            other = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
            other.start()
            other.join()
        assert torch.get_num_threads() == 2 and seen == [2]
        with pytest.raises(RuntimeError), cpu.one_aten_thread():
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
        generate(jambalab.from_preset("tiny-hybrid", seed=0).eval(), torch.tensor([[5, 6]]), 3, do_sample=True,
                 top_p=0.9, seed=0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
