"""The fused CPU kernels against their pure-PyTorch twins: forward, every gradient,
chunked continuation, decode steps, bad inputs and the fallbacks.

Legend: B batch, L length, D d_inner, N d_state, K d_conv.
"""

from __future__ import annotations

import importlib
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

from jambalab import ops
from jambalab.errors import InputError
from jambalab.ops import cpu, fused
from jambalab.ops.conv_ref import causal_conv1d_ref, causal_conv1d_update_ref
from jambalab.ops.scan_ref import selective_scan_ref, selective_state_update_ref

SCAN_ARGS = ("x", "dt", "A", "B", "C", "D", "z", "h0")


@pytest.fixture(scope="module", autouse=True)
def kernels():
    """The compiled ops; every test here needs them except the fallback and input-check ones."""
    return cpu.kernels()


def needs_kernels():
    if cpu.kernels() is None:
        pytest.skip(f"fused CPU kernels unavailable: {cpu.build_error()}")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max abs error relative to the reference's largest magnitude."""
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def scan_inputs(bsz, length, d_inner, d_state, *, D=True, z=True, h0=True, dtype=torch.float32, seed=0):
    """Realistic ranges: dt = softplus(.) around 0.3, A = -exp(.) like Mamba's A_log init."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    inputs = {
        "x": randn(bsz, length, d_inner).to(dtype),
        "dt": F.softplus(randn(bsz, length, d_inner) - 1.0).to(dtype),
        "A": -torch.exp(randn(d_inner, d_state) * 0.5),
        "B": randn(bsz, length, d_state).to(dtype),
        "C": randn(bsz, length, d_state).to(dtype),
        "D": randn(d_inner) if D else None,
        "z": randn(bsz, length, d_inner).to(dtype) if z else None,
        "h0": randn(bsz, d_inner, d_state) if h0 else None,
    }
    return inputs


def scan_with_grads(fn, inputs, gy, gh, chunk_size=64):
    """Runs fn on leaf copies of inputs, backprops (gy, gh); returns (y, h_last, {name: grad})."""
    leaves = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in inputs.items()}
    y, h_last = fn(*(leaves[k] for k in SCAN_ARGS), chunk_size=chunk_size)
    torch.autograd.backward([y, h_last], [gy, gh])
    return y.detach(), h_last.detach(), {k: v.grad for k, v in leaves.items() if v is not None}


# ---------------------------------------------------------------- forward and gradients

SHAPES = [  # (B, L, D, N, chunk_size)
    (1, 1, 24, 16, 64),
    (3, 7, 40, 8, 4),
    (1, 65, 24, 16, 16),
    (3, 65, 40, 8, 64),
    (1, 300, 40, 16, 64),
    (3, 300, 24, 8, 128),
]
OPTIONS = {  # which of D, z, h0 are given
    "plain": dict(D=False, z=False, h0=False),
    "D": dict(D=True, z=False, h0=False),
    "z": dict(D=False, z=True, h0=False),
    "h0": dict(D=False, z=False, h0=True),
    "all": dict(D=True, z=True, h0=True),
}


# Every option on the short shapes; the long ones (whose reference backward is slow) plain and all.
CASES = [(shape, option) for shape in SHAPES for option in OPTIONS if shape[1] < 300 or option in ("plain", "all")]


@pytest.mark.parametrize("shape,option", CASES, ids=["B{}-L{}-D{}-N{}-T{}".format(*s) + f"-{o}" for s, o in CASES])
def test_scan_fp32_matches_reference(shape, option):
    needs_kernels()
    bsz, length, d_inner, d_state, chunk = shape
    inputs = scan_inputs(bsz, length, d_inner, d_state, **OPTIONS[option])
    gy = torch.randn(bsz, length, d_inner)
    gh = torch.randn(bsz, d_inner, d_state)
    y, h, grads = scan_with_grads(ops.selective_scan, inputs, gy, gh, chunk)
    y_ref, h_ref, grads_ref = scan_with_grads(selective_scan_ref, inputs, gy, gh, chunk)
    assert y.dtype == torch.float32 and h.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(h, h_ref) < 1e-5
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert grads[name].dtype == inputs[name].dtype, name
        assert rel_err(grads[name], grads_ref[name]) < 1e-5, name


@pytest.mark.parametrize("shape", [(3, 33, 40, 16, 16), (1, 300, 24, 8, 64)], ids=["B3-L33", "B1-L300"])
def test_scan_bf16_matches_reference(shape):
    needs_kernels()
    bsz, length, d_inner, d_state, chunk = shape
    inputs = scan_inputs(bsz, length, d_inner, d_state, dtype=torch.bfloat16)
    gy = torch.randn(bsz, length, d_inner).bfloat16()
    gh = torch.randn(bsz, d_inner, d_state)
    y, h, grads = scan_with_grads(ops.selective_scan, inputs, gy, gh, chunk)
    y_ref, h_ref, grads_ref = scan_with_grads(selective_scan_ref, inputs, gy, gh, chunk)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    # The reference rounds to bf16 between the skip and the gate; the kernel rounds once.
    assert rel_err(y, y_ref) < 2e-2
    assert rel_err(h, h_ref) < 1e-5  # the state is fp32 from the same bf16 inputs
    for name in grads:
        assert grads[name].dtype == inputs[name].dtype, name
        assert rel_err(grads[name], grads_ref[name]) < 3e-2, name


def test_scan_mixed_and_fp16_inputs_run_in_fp32():
    needs_kernels()
    inputs = scan_inputs(2, 33, 24, 16)
    inputs["x"] = inputs["x"].half()
    y, h = ops.selective_scan(*(inputs[k] for k in SCAN_ARGS))
    y_ref, h_ref = selective_scan_ref(*(inputs[k] for k in SCAN_ARGS))
    assert y.dtype == torch.float16
    assert rel_err(y, y_ref) < 2e-3
    assert rel_err(h, h_ref) < 1e-5


@pytest.mark.parametrize("used", ["y", "h_last"])
def test_scan_grads_when_one_output_is_unused(used):
    needs_kernels()
    inputs = scan_inputs(2, 40, 24, 8)
    results = []
    for fn in (ops.selective_scan, selective_scan_ref):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        y, h = fn(*(leaves[k] for k in SCAN_ARGS), chunk_size=16)
        (y.square().sum() if used == "y" else h.square().sum()).backward()
        results.append({k: v.grad for k, v in leaves.items()})
    for name in SCAN_ARGS:
        want = results[1][name]  # None where the reference's graph never reached the input
        want = torch.zeros_like(inputs[name]) if want is None else want
        assert rel_err(results[0][name], want) < 1e-5, name


def test_scan_without_grad_matches_with_grad():
    needs_kernels()
    inputs = scan_inputs(2, 50, 40, 16)
    with torch.no_grad():
        y0, h0 = ops.selective_scan(*(inputs[k] for k in SCAN_ARGS))
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y1, h1 = ops.selective_scan(*(leaves[k] for k in SCAN_ARGS))
    assert y1.requires_grad and h1.requires_grad
    torch.testing.assert_close(y0, y1.detach(), rtol=0, atol=0)
    torch.testing.assert_close(h0, h1.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("split", [1, 17, 64, 99])
def test_scan_in_two_chunks_equals_one(split):
    needs_kernels()
    inputs = scan_inputs(2, 100, 24, 16)
    y, h = ops.selective_scan(*(inputs[k] for k in SCAN_ARGS))
    first = {k: v[:, :split] if k in ("x", "dt", "B", "C", "z") else v for k, v in inputs.items()}
    second = {k: v[:, split:] if k in ("x", "dt", "B", "C", "z") else v for k, v in inputs.items()}
    y1, h1 = ops.selective_scan(*(first[k] for k in SCAN_ARGS))
    second["h0"] = h1
    y2, h2 = ops.selective_scan(*(second[k] for k in SCAN_ARGS))
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h2, h, rtol=1e-6, atol=1e-6)


def test_scan_gradients_flow_through_carried_state():
    needs_kernels()
    inputs = scan_inputs(1, 60, 24, 8)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y_full, _ = ops.selective_scan(*(leaves[k] for k in SCAN_ARGS))
    full = torch.autograd.grad(y_full.square().sum(), [leaves[k] for k in SCAN_ARGS])
    timed = ("x", "dt", "B", "C", "z")
    y1, h1 = ops.selective_scan(*(leaves[k][:, :25] if k in timed else leaves[k] for k in SCAN_ARGS))
    rest = [leaves[k][:, 25:] if k in timed else leaves[k] for k in SCAN_ARGS]
    rest[SCAN_ARGS.index("h0")] = h1
    y2, _ = ops.selective_scan(*rest)
    chunked = torch.autograd.grad(torch.cat([y1, y2], 1).square().sum(), [leaves[k] for k in SCAN_ARGS])
    for name, a, b in zip(SCAN_ARGS, chunked, full):
        assert rel_err(a, b) < 1e-5, name


def test_scan_extreme_decays_and_nans_behave_like_the_reference():
    needs_kernels()
    inputs = scan_inputs(1, 30, 24, 16)
    inputs["dt"][0, 3] = 60.0  # exp(dt A) underflows to 0: the state restarts
    inputs["A"][5] = 0.3  # a growing (positive) channel stays exact while it fits in fp32
    inputs["A"][6] = 0.0
    y, h = ops.selective_scan(*(inputs[k] for k in SCAN_ARGS))
    y_ref, h_ref = selective_scan_ref(*(inputs[k] for k in SCAN_ARGS))
    assert rel_err(y, y_ref) < 1e-5 and rel_err(h, h_ref) < 1e-5
    inputs["x"][0, 10, 7] = float("nan")
    y, h = ops.selective_scan(*(inputs[k] for k in SCAN_ARGS))
    y_ref, h_ref = selective_scan_ref(*(inputs[k] for k in SCAN_ARGS))
    assert torch.equal(y.isnan(), y_ref.isnan()) and torch.equal(h.isnan(), h_ref.isnan())


def test_scan_length_zero_returns_initial_state():
    needs_kernels()
    inputs = scan_inputs(2, 0, 24, 8)
    y, h = ops.selective_scan(*(inputs[k] for k in SCAN_ARGS))
    assert y.shape == (2, 0, 24)
    torch.testing.assert_close(h, inputs["h0"])


def test_scan_non_contiguous_inputs_give_the_same_numbers():
    needs_kernels()
    inputs = scan_inputs(2, 37, 40, 16)
    xz = torch.cat([inputs["x"], inputs["z"]], dim=-1)  # in_proj's output: x and z are strided halves
    x, z = xz.chunk(2, dim=-1)
    dt = inputs["dt"].transpose(1, 2).contiguous().transpose(1, 2)  # last dim not contiguous
    bc = torch.cat([inputs["B"], inputs["C"]], dim=-1)
    B, C = bc.split(16, dim=-1)
    A = inputs["A"].t().contiguous().t()
    h0 = inputs["h0"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not any(t.is_contiguous() for t in (x, z, dt, B, C, A, h0))
    y, h = ops.selective_scan(x, dt, A, B, C, inputs["D"], z, h0)
    y_ref, h_ref = ops.selective_scan(*(inputs[k] for k in SCAN_ARGS))
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)


# ---------------------------------------------------------------- decode steps


def step_inputs(bsz, d_inner, d_state, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "h": torch.randn(bsz, d_inner, d_state, generator=g),
        "x": torch.randn(bsz, d_inner, generator=g).to(dtype),
        "dt": F.softplus(torch.randn(bsz, d_inner, generator=g) - 1).to(dtype),
        "A": -torch.exp(torch.randn(d_inner, d_state, generator=g) * 0.5),
        "B": torch.randn(bsz, d_state, generator=g).to(dtype),
        "C": torch.randn(bsz, d_state, generator=g).to(dtype),
        "D": torch.randn(d_inner, generator=g),
        "z": torch.randn(bsz, d_inner, generator=g).to(dtype),
    }


@pytest.mark.parametrize("bsz,d_inner,d_state", [(1, 24, 16), (3, 40, 8), (2, 4096, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_dz", [True, False], ids=["Dz", "noDz"])
def test_state_update_matches_reference(bsz, d_inner, d_state, dtype, with_dz):
    needs_kernels()
    a = step_inputs(bsz, d_inner, d_state, dtype)
    if not with_dz:
        a["D"] = a["z"] = None
    b = {k: None if v is None else v.clone() for k, v in a.items()}
    y = ops.selective_state_update(**a)
    y_ref = selective_state_update_ref(**b)
    assert y.dtype == dtype
    assert rel_err(a["h"], b["h"]) < 1e-6  # the state itself, updated in place
    assert rel_err(y, y_ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_state_update_steps_equal_the_scan():
    needs_kernels()
    inputs = scan_inputs(2, 20, 24, 16)
    y_scan, h_scan = ops.selective_scan(*(inputs[k] for k in SCAN_ARGS))
    h = inputs["h0"].clone()
    steps = []
    for t in range(20):
        sl = {k: inputs[k][:, t] for k in ("x", "dt", "B", "C", "z")}
        y = ops.selective_state_update(h, sl["x"], sl["dt"], inputs["A"], sl["B"], sl["C"], inputs["D"], sl["z"])
        steps.append(y)
    torch.testing.assert_close(torch.stack(steps, 1), y_scan, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_scan, rtol=1e-5, atol=1e-5)


def test_state_update_non_contiguous_state_is_updated_in_place():
    needs_kernels()
    a = step_inputs(2, 24, 16)
    storage = torch.randn(2, 24, 32)
    h = storage[:, :, :16]  # (B, D, N) view with row stride 32
    h.copy_(a["h"])
    a["h"] = h
    ref_h = h.clone()
    y = ops.selective_state_update(**a)
    y_ref = selective_state_update_ref(ref_h, *(a[k] for k in ("x", "dt", "A", "B", "C", "D", "z")))
    assert rel_err(storage[:, :, :16], ref_h) < 1e-6
    assert rel_err(y, y_ref) < 1e-5


def test_state_update_under_grad_falls_back_to_reference():
    needs_kernels()
    a = step_inputs(1, 24, 8)
    a["A"].requires_grad_()
    y = ops.selective_state_update(**a)
    assert y.requires_grad  # the reference ran: autograd sees it
    y.sum().backward()
    assert a["A"].grad is not None


@pytest.mark.parametrize(
    "x_dtype,state_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_update_matches_reference(x_dtype, state_dtype, with_bias):
    needs_kernels()
    g = torch.Generator().manual_seed(0)
    bsz, d_inner, d_conv = 3, 40, 4
    x = torch.randn(bsz, d_inner, generator=g).to(x_dtype)
    state = torch.randn(bsz, d_inner, d_conv, generator=g).to(state_dtype)
    weight = torch.randn(d_inner, d_conv, generator=g)
    bias = torch.randn(d_inner, generator=g) if with_bias else None
    state_ref = state.clone()
    y = ops.causal_conv1d_update(x, state, weight, bias)
    y_ref = causal_conv1d_update_ref(x, state_ref, weight, bias)
    assert y.dtype == x_dtype
    torch.testing.assert_close(state, state_ref, rtol=0, atol=0)
    assert rel_err(y, y_ref) < (1e-6 if x_dtype == torch.float32 else 1e-2)


def test_conv_update_steps_equal_full_conv_and_strided_state():
    needs_kernels()
    g = torch.Generator().manual_seed(1)
    bsz, length, d_inner, d_conv = 2, 9, 24, 4
    x = torch.randn(bsz, length, d_inner, generator=g)
    weight = torch.randn(d_inner, d_conv, generator=g)
    bias = torch.randn(d_inner, generator=g)
    storage = torch.zeros(bsz, d_inner, 2 * d_conv)
    state = storage[:, :, :d_conv]  # non-contiguous, must still be updated in place
    steps = [ops.causal_conv1d_update(x[:, t], state, weight, bias) for t in range(length)]
    torch.testing.assert_close(torch.stack(steps, 1), causal_conv1d_ref(x, weight, bias), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(storage[:, :, :d_conv], x[:, -d_conv:].transpose(1, 2))


CONV_CASES = [  # (B, L, D, K, with conv_state, with bias)
    (2, 37, 24, 4, False, True),
    (3, 5, 40, 4, True, True),  # the state feeds the first K - 1 outputs
    (1, 2, 16, 4, True, False),  # L < K - 1: every output reads the state
    (1, 1, 8, 3, True, True),
    (4, 64, 128, 4, False, False),  # the ablation grid's shape
    (1, 300, 33, 2, False, True),  # D not a multiple of the SIMD width
]


def conv_grads(fn, x_rows, weight, bias, state, gout):
    """Forward on x = the first half of x_rows (a strided view, as in the mixer), grads of every input."""
    leaves = [x_rows.clone().requires_grad_(), weight.clone().requires_grad_()]
    if bias is not None:
        leaves.append(bias.clone().requires_grad_())
    d_inner = weight.shape[0]
    y = fn(leaves[0][..., :d_inner], leaves[1], leaves[2] if bias is not None else None, state)
    return y, torch.autograd.grad(y, leaves, gout)


@pytest.mark.parametrize("case", CONV_CASES, ids=["B{}-L{}-D{}-K{}-state{}-bias{}".format(*c) for c in CONV_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_conv_matches_reference_with_grads(case, dtype):
    needs_kernels()
    bsz, length, d_inner, d_conv, with_state, with_bias = case
    g = torch.Generator().manual_seed(3)
    x_rows = torch.randn(bsz, length, 2 * d_inner, generator=g).to(dtype)
    weight = torch.randn(d_inner, d_conv, generator=g)
    bias = torch.randn(d_inner, generator=g) if with_bias else None
    state = torch.randn(bsz, d_inner, d_conv, generator=g).to(dtype) if with_state else None
    gout = torch.randn(bsz, length, d_inner, generator=g).to(dtype)
    y, grads = conv_grads(fused.causal_conv1d, x_rows, weight, bias, state, gout)
    # the reference in fp32 on the same (rounded) inputs
    y_ref, grads_ref = conv_grads(causal_conv1d_ref, x_rows.float(), weight, bias,
                                  None if state is None else state.float(), gout.float())
    assert y.dtype == dtype and y.shape == (bsz, length, d_inner)
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: the output's own rounding
    assert rel_err(y, y_ref) < tol
    for got, want in zip(grads, grads_ref):
        assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_conv_chunks_continue_through_the_state():
    """Two calls, the second continuing from the state of the first, equal one call."""
    needs_kernels()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 20, 24, generator=g)
    weight, bias = torch.randn(24, 4, generator=g), torch.randn(24, generator=g)
    state = torch.zeros(2, 24, 4)
    first = ops.causal_conv1d(x[:, :7], weight, bias, state)
    ops.conv_state_update(state, x[:, :7])
    second = ops.causal_conv1d(x[:, 7:], weight, bias, state)
    torch.testing.assert_close(torch.cat([first, second], 1), causal_conv1d_ref(x, weight, bias), rtol=1e-6, atol=1e-6)


def test_conv_state_requiring_grad_uses_the_reference():
    needs_kernels()
    x = torch.randn(1, 5, 8, requires_grad=True)
    state = torch.randn(1, 8, 4, requires_grad=True)
    weight = torch.randn(8, 4)
    y = fused.causal_conv1d(x, weight, None, state)
    (gs,) = torch.autograd.grad(y.sum(), [state])
    state_ref = state.detach().clone().requires_grad_()
    (gs_ref,) = torch.autograd.grad(causal_conv1d_ref(x, weight, None, state_ref).sum(), [state_ref])
    torch.testing.assert_close(gs, gs_ref)


def test_conv_bad_inputs_raise_input_error():
    x = torch.rand(2, 6, 24)
    with pytest.raises(InputError, match=r"causal_conv1d: weight has shape \(12, 4\), expected \(24, 4\)"):
        ops.causal_conv1d(x, torch.rand(12, 4), None)
    with pytest.raises(InputError, match=r"bias has shape \(23,\), expected \(24,\)"):
        ops.causal_conv1d(x, torch.rand(24, 4), torch.rand(23))
    with pytest.raises(InputError, match=r"conv_state has shape \(2, 24, 3\), expected \(2, 24, 4\)"):
        ops.causal_conv1d(x, torch.rand(24, 4), None, torch.rand(2, 24, 3))
    with pytest.raises(InputError, match=r"x must be \(batch, length, d_inner\)"):
        ops.causal_conv1d(torch.rand(6, 24), torch.rand(24, 4), None)
    with pytest.raises(InputError, match=r"x has dtype torch.int64"):
        ops.causal_conv1d(x.long(), torch.rand(24, 4), None)


@pytest.mark.parametrize("shape", [(2, 37, 24), (1, 5), (3, 1, 33)], ids=["B2-L37-D24", "L1-D5", "B3-L1-D33"])
def test_dt_softplus_matches_reference_with_grads(shape):
    needs_kernels()
    g = torch.Generator().manual_seed(5)
    dt = (8 * torch.randn(*shape, generator=g)).requires_grad_()  # both tails of softplus
    bias = torch.randn(shape[-1], generator=g).requires_grad_()
    y = fused.dt_softplus(dt, bias)
    gout = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, (dt, bias), gout)
    dt_r, bias_r = dt.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    y_r = ops.dt_softplus_ref(dt_r, bias_r)
    grads_r = torch.autograd.grad(y_r, (dt_r, bias_r), gout)
    assert rel_err(y, y_r) < 1e-6
    for got, want in zip(grads, grads_r):
        assert rel_err(got, want) < 1e-6


def test_dt_softplus_accuracy_over_its_range():
    needs_kernels()
    x = torch.linspace(-87, 40, 100_001)
    want = F.softplus(x.double())
    got = fused.dt_softplus(x[:, None], torch.zeros(1))[:, 0].double()
    assert ((got - want).abs() / want).max() < 5e-6  # fp32 rounding of x * log2(e), no more
    assert (fused.dt_softplus(torch.tensor([[-1e4, 1e4]]), torch.zeros(2)) == torch.tensor([[0.0, 1e4]])).all()


def test_dt_softplus_bf16_and_bad_input():
    x, b = torch.randn(3, 8).bfloat16(), torch.randn(8)
    torch.testing.assert_close(fused.dt_softplus(x, b), F.softplus(x + b.bfloat16()), rtol=0, atol=0)  # HF's rounding
    with pytest.raises(InputError, match=r"dt_softplus: bias must be \(D,\)"):
        fused.dt_softplus(torch.randn(3, 8), torch.randn(7))


@pytest.mark.parametrize("rows,k,n,bias", [(1, 256, 4099, False), (1, 33, 7, True), (3, 256, 1024, True),
                                           (4, 513, 130, False), (2, 16, 512, True)])
def test_linear_gemv_matches_f_linear(rows, k, n, bias):
    needs_kernels()
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(rows, 1, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    y = fused.linear(x, w, b)
    assert y.shape == (rows, 1, n)
    assert rel_err(y, F.linear(x, w, b)) < 1e-6


def test_linear_uses_f_linear_for_grads_and_large_inputs(monkeypatch):
    needs_kernels()
    calls = []
    real = cpu.kernels()

    class Spy:
        def __getattr__(self, name):
            if name == "gemv":
                calls.append(name)
            return getattr(real, name)

    monkeypatch.setattr(cpu, "kernels", lambda: Spy())
    w = torch.randn(8, 16, requires_grad=True)
    fused.linear(torch.randn(1, 16), w).sum().backward()  # autograd: F.linear
    assert calls == [] and w.grad is not None
    fused.linear(torch.randn(17, 16), w.detach())  # 17 rows: F.linear (GEMM territory)
    fused.linear(torch.randn(1, 16).bfloat16(), w.detach().bfloat16())  # not float32
    fused.linear(torch.randn(1, 16), w.detach().t().contiguous().t())  # a non-contiguous weight
    assert calls == []
    fused.linear(torch.randn(2, 16), w.detach())
    assert calls == ["gemv"]
    x = torch.randn(2, 5, 16)  # 10 rows: one GEMV call, each row as if alone
    y = fused.linear(x, w.detach())
    assert calls == ["gemv"] * 2 and y.shape == (2, 5, 8)
    rows = torch.cat([fused.linear(r[None], w.detach()) for r in x.reshape(10, 16)]).view(2, 5, 8)
    assert torch.equal(y, rows)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w.detach()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,with_weight", [((1, 1, 256), True), ((3, 17), False), ((2048, 256), True),
                                               ((1, 16), True), ((5, 1), True)])
def test_rms_norm_matches_reference(shape, with_weight):
    needs_kernels()
    g = torch.Generator().manual_seed(7)
    x = 3 * torch.randn(*shape, generator=g)
    w = torch.randn(shape[-1], generator=g) if with_weight else None
    assert rel_err(fused.rms_norm(x, w, 1e-6), ops.rms_norm_ref(x, w, 1e-6)) < 1e-6


def test_rms_norm_grads_follow_the_reference():
    x = torch.randn(4, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    gx, gw = torch.autograd.grad(fused.rms_norm(x, w, 1e-5).square().sum(), (x, w))
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    gx2, gw2 = torch.autograd.grad(ops.rms_norm_ref(x2, w2, 1e-5).square().sum(), (x2, w2))
    torch.testing.assert_close(gx, gx2)
    torch.testing.assert_close(gw, gw2)


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, None),
                                             (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("shape", [(3, 8), (2, 5, 1024), (1, 4096)])
def test_a_16_bit_rms_norm_follows_the_reference(x_dtype, w_dtype, shape):
    """bf16 x or weight: the kernel normalises in fp32, rounds to x's dtype and scales in the promoted
    dtype, as the reference; only its sum of squares runs in another order (a bf16 output at most one
    rounding step apart, and rarely)."""
    needs_kernels()
    g = torch.Generator().manual_seed(3)
    x = (3 * torch.randn(*shape, generator=g)).to(x_dtype)
    w = None if w_dtype is None else torch.randn(shape[-1], generator=g).to(w_dtype)
    got, want = fused.rms_norm(x, w, 1e-6), ops.rms_norm_ref(x, w, 1e-6)
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == torch.bfloat16:
        torch.testing.assert_close(got, want, rtol=2 ** -7, atol=1e-6)
        assert (got != want).float().mean() < 0.01
    else:  # float32 out: the order of the sum shows in the last bits, as in float32 alone
        assert rel_err(got, want) < 1e-6
    assert torch.equal(fused.rms_norm(x[..., :1, :], w, 1e-6), got[..., :1, :])  # a row as in any batch


def test_ops_trace_under_torch_compile():
    """Fake (shape-only) kernels let dynamo/AOT trace the ops; aot_eager skips inductor's slow codegen."""
    needs_kernels()
    torch._dynamo.reset()
    inputs = scan_inputs(2, 9, 24, 16)

    def scan(*args):
        y, h = ops.selective_scan(*args)
        return y.square().sum() + h.sum()

    leaves = [None if v is None else v.clone().requires_grad_() for v in (inputs[k] for k in SCAN_ARGS)]
    compiled = torch.compile(scan, backend="aot_eager", fullgraph=True)
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    leaves_ref = [v.clone().requires_grad_() for v in leaves]
    loss_ref = scan(*leaves_ref)
    torch.testing.assert_close(loss, loss_ref)
    for got, want in zip(grads, torch.autograd.grad(loss_ref, leaves_ref)):
        torch.testing.assert_close(got, want)

    a = step_inputs(2, 24, 16)
    b = {k: v.clone() for k, v in a.items()}
    with torch.no_grad():
        y = torch.compile(ops.selective_state_update, backend="aot_eager", fullgraph=True)(**a)
    torch.testing.assert_close(y, ops.selective_state_update(**b))
    torch.testing.assert_close(a["h"], b["h"])


# ---------------------------------------------------------------- whole-layer decode ops


def _decode_logits(preset: str, bsz: int, monkeypatch, fused_on: bool, steps: int = 5):
    """Prefill 9 tokens, then greedy-decode `steps` tokens; returns the stacked logits and the
    number of whole-layer decode op calls."""
    import jambalab
    from jambalab.generate import prefill

    calls = []
    for name in ("mamba_decode", "mlp_decode", "moe_decode"):
        real = getattr(fused, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    monkeypatch.setattr(ops, "decode_fusable", fused.decode_fusable if fused_on else (lambda *a: False))
    monkeypatch.setattr(jambalab.model, "decode_step", lambda *a: None)  # layer by layer (test_decode_step.py: the step)
    model = jambalab.from_preset(preset, seed=0).eval()
    ids = torch.randint(3, model.config.vocab_size, (bsz, 17), generator=torch.Generator().manual_seed(1))
    cache = model.allocate_cache(bsz)
    logits = [prefill(model, ids, cache)]  # 17 x bsz rows: too many for the decode ops
    with torch.no_grad():
        for _ in range(steps):
            logits.append(model(logits[-1].argmax(-1, keepdim=True), cache=cache).logits[:, -1])
    return torch.stack(logits), calls


@pytest.mark.parametrize("preset", ["tiny-hybrid", "tiny-falcon-mamba", "tiny-mixtral", "tiny-transformer"])
@pytest.mark.parametrize("bsz", [1, 3, 8])
def test_whole_layer_decode_ops_equal_the_layer_by_layer_path(preset, bsz, monkeypatch):
    """mamba_decode / mlp_decode / moe_decode run the same kernels in the same order as the model's
    own layer-by-layer decode (their twin): the logits are bitwise equal, and the ops did run."""
    needs_kernels()
    got, calls = _decode_logits(preset, bsz, monkeypatch, fused_on=True)
    want, none = _decode_logits(preset, bsz, monkeypatch, fused_on=False)
    assert not none
    import jambalab

    cfg = jambalab.JambaConfig.from_preset(preset)
    n_mamba = sum(not cfg.is_attention(i) for i in range(cfg.n_layers))
    n_moe = sum(cfg.is_moe(i) for i in range(cfg.n_layers)) if cfg.d_ff else 0
    n_mlp = cfg.n_layers - n_moe if cfg.d_ff else 0
    steps = 5
    counts = {name: calls.count(name) for name in ("mamba_decode", "mlp_decode", "moe_decode")}
    assert counts == {"mamba_decode": n_mamba * steps, "mlp_decode": n_mlp * steps, "moe_decode": n_moe * steps}
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_decode_fusable_declines_what_the_ops_do_not_take():
    needs_kernels()
    w = torch.randn(8, 4)
    assert fused.decode_fusable(torch.randn(2, 4), w, None)
    assert fused.decode_fusable(torch.randn(16, 4), w, None)
    assert not fused.decode_fusable(torch.randn(17, 4), w)  # more rows than the GEMV kernel takes
    assert not fused.decode_fusable(torch.randn(2, 4).bfloat16(), w.bfloat16())
    assert not fused.decode_fusable(torch.randn(2, 4), w.t())  # not contiguous
    assert not fused.decode_fusable(torch.randn(2, 4), w.requires_grad_())
    with torch.no_grad():
        assert fused.decode_fusable(torch.randn(2, 4), w)


def test_whole_layer_decode_ops_reject_bad_shapes():
    needs_kernels()
    k = cpu.kernels()
    x = torch.randn(17, 8)
    with pytest.raises(RuntimeError, match="1 to 16 rows"):
        k.mlp_decode(x, torch.randn(16, 8), torch.randn(16, 8), torch.randn(8, 16))
    with pytest.raises(RuntimeError, match="top_k must be in 1..4"):
        k.moe_decode(x[:1], torch.randn(4, 8), *torch.randn(2, 4, 16, 8), torch.randn(4, 8, 16), 5)
    with pytest.raises(RuntimeError, match="in_proj weight must be"):
        k.mamba_decode(x[:1], torch.randn(30, 8), None, torch.zeros(1, 16, 4), torch.randn(16, 4), None,
                       torch.randn(2 + 8, 16), False, None, None, None, 1e-6, torch.randn(16, 2), torch.randn(16),
                       -torch.rand(16, 4), torch.randn(16), torch.zeros(1, 16, 4), torch.randn(8, 16), None)


# ---------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("rows,classes", [(7, 5), (33, 1000), (64, 65536), (3, 17)])
def test_cross_entropy_matches_f_cross_entropy(rows, classes):
    needs_kernels()
    g = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, classes, generator=g) * 4
    target = torch.randint(0, classes, (rows,), generator=g)
    target[::3] = -100  # ignored rows: out of the mean, zero gradient
    x = logits.clone().requires_grad_()
    loss = fused.cross_entropy(x, target)
    (grad,) = torch.autograd.grad(loss * 1.7, x)
    x64 = logits.double().requires_grad_()
    want = F.cross_entropy(x64, target)
    (want_grad,) = torch.autograd.grad(want * 1.7, x64)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert abs(loss.item() - want.item()) < 2e-6 * max(1.0, want.item())
    assert (grad.double() - want_grad).abs().max() < 1e-6  # F.cross_entropy in fp32 is off by up to 4e-7 here
    assert grad[::3].abs().max() == 0
    with torch.no_grad():
        assert fused.cross_entropy(logits, target).item() == loss.item()


def test_cross_entropy_edge_cases_follow_torch():
    needs_kernels()
    big = torch.tensor([[1e4, -1e4, 0.0], [-1e30, 5.0, 5.0]])  # needs the max shift; a -1e30 logit underflows to 0
    torch.testing.assert_close(fused.cross_entropy(big, torch.tensor([0, 1])), F.cross_entropy(big, torch.tensor([0, 1])))
    x = torch.randn(4, 10, requires_grad=True)
    loss = fused.cross_entropy(x, torch.full((4,), -100))  # every row ignored: nan as torch, no gradient
    loss.backward()
    assert loss.isnan() and F.cross_entropy(x, torch.full((4,), -100)).isnan() and x.grad.abs().max() == 0
    with pytest.raises(RuntimeError, match="target 7 at row 1 is out of range for 5 classes"):
        fused.cross_entropy(torch.randn(2, 5), torch.tensor([1, 7]))
    xb = torch.randn(3, 8).bfloat16()  # other dtypes and layouts: torch's own
    assert fused.cross_entropy(xb, torch.tensor([1, 2, 3])) == F.cross_entropy(xb, torch.tensor([1, 2, 3]))
    x3 = torch.randn(2, 8, 3)  # (N, C, d): classes on dim 1
    assert fused.cross_entropy(x3, torch.tensor([[1, 2, 3], [0, 1, 2]])) == \
        F.cross_entropy(x3, torch.tensor([[1, 2, 3], [0, 1, 2]]))


@pytest.mark.parametrize("rows,classes,width,chunk", [(37, 1000, 24, 8), (64, 300, 16, 64), (5, 70000, 8, None),
                                                      (50, 257, 32, 7)])
def test_linear_cross_entropy_matches_the_reference(rows, classes, width, chunk):
    """The chunked lm_head + loss against its twin in fp64: the loss and both gradients, one chunk or
    several (a ragged last one), ignored rows, forward-only."""
    needs_kernels()
    g = torch.Generator().manual_seed(rows)
    h0, w0 = torch.randn(rows, width, generator=g), torch.randn(classes, width, generator=g) * 0.5
    target = torch.randint(0, classes, (rows,), generator=g)
    target[::4] = -100
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    loss = fused.linear_cross_entropy(h, w, target, chunk_rows=chunk)
    gh, gw = torch.autograd.grad(loss * 1.7, (h, w))
    h64, w64 = h0.double().requires_grad_(), w0.double().requires_grad_()
    want = ops.linear_cross_entropy_ref(h64, w64, target)
    want_h, want_w = torch.autograd.grad(want * 1.7, (h64, w64))
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert abs(loss.item() - want.item()) < 2e-6 * max(1.0, want.item())
    assert (gh.double() - want_h).abs().max() < 1e-5 * max(1.0, want_h.abs().max().item())
    assert (gw.double() - want_w).abs().max() < 1e-5 * max(1.0, want_w.abs().max().item())
    assert gh[::4].abs().max() == 0
    with torch.no_grad():
        assert fused.linear_cross_entropy(h0, w0, target, chunk_rows=chunk).item() == loss.item()


def test_linear_cross_entropy_edge_cases():
    needs_kernels()
    h, w = torch.randn(6, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    loss = fused.linear_cross_entropy(h, w, torch.full((6,), -100), chunk_rows=4)  # all ignored: nan, zero grads
    loss.backward()
    assert loss.isnan() and h.grad.abs().max() == 0 and w.grad.abs().max() == 0
    only_w = torch.randn(6, 8)  # a gradient for the weight alone
    (gw,) = torch.autograd.grad(fused.linear_cross_entropy(only_w, w, torch.arange(6), chunk_rows=4), (w,))
    (want,) = torch.autograd.grad(ops.linear_cross_entropy_ref(only_w, w, torch.arange(6)), (w,))
    torch.testing.assert_close(gw, want)
    with pytest.raises(InputError, match="chunk_rows must be >= 1, got 0"):
        fused.linear_cross_entropy(h, w, torch.arange(6), chunk_rows=0)
    with pytest.raises(InputError, match="target 11 at row 5 is out of range for 11 classes"):
        fused.linear_cross_entropy(h.detach(), w.detach(), torch.tensor([0, 1, 2, 3, 4, 11]), chunk_rows=4)
    hb, wb = torch.randn(3, 8).bfloat16(), torch.randn(11, 8).bfloat16()  # other dtypes: the twin
    assert fused.linear_cross_entropy(hb, wb, torch.arange(3)) == ops.linear_cross_entropy_ref(hb, wb, torch.arange(3))


# ---------------------------------------------------------------- bad inputs


def scan_call(**overrides):
    inputs = scan_inputs(2, 5, 24, 8)
    inputs.update(overrides)
    return ops.selective_scan(*(inputs[k] for k in SCAN_ARGS))


@pytest.mark.parametrize(
    "overrides,words",
    [
        (dict(x=torch.randn(2, 5, 24, dtype=torch.float64)), ["x", "float64"]),
        (dict(dt=torch.ones(2, 5, 24, dtype=torch.int64)), ["dt", "int64"]),
        (dict(dt=torch.rand(2, 5, 40)), ["dt", "(2, 5, 40)", "(2, 5, 24)"]),
        (dict(z=torch.rand(2, 6, 24)), ["z", "(2, 6, 24)", "(2, 5, 24)"]),
        (dict(A=-torch.rand(24, 16)), ["B", "(2, 5, 8)", "(2, 5, 16)"]),
        (dict(A=-torch.rand(40, 8)), ["A", "(40, 8)", "(24, 8)"]),
        (dict(C=torch.rand(2, 5, 16)), ["C", "(2, 5, 16)", "(2, 5, 8)"]),
        (dict(D=torch.rand(40)), ["D", "(40,)", "(24,)"]),
        (dict(h0=torch.rand(2, 8, 24)), ["h0", "(2, 8, 24)", "(2, 24, 8)"]),
        (dict(x=torch.rand(5, 24)), ["x", "(5, 24)", "batch, length, d_inner"]),
        (dict(B=None), ["B is required"]),
        (dict(C=[[1.0]]), ["C must be a torch.Tensor", "list"]),
    ],
)
def test_scan_bad_inputs_raise_input_error(overrides, words):
    with pytest.raises(InputError) as info:
        scan_call(**overrides)
    for word in words:
        assert word in str(info.value)


def test_decode_bad_inputs_raise_input_error():
    a = step_inputs(2, 24, 8)
    with pytest.raises(InputError, match=r"h \(the SSM state\) must be float32"):
        ops.selective_state_update(**{**a, "h": a["h"].bfloat16()})
    with pytest.raises(InputError, match=r"B has shape \(2, 16\), expected \(2, 8\)"):
        ops.selective_state_update(**{**a, "B": torch.rand(2, 16)})
    with pytest.raises(InputError, match=r"x has dtype torch.float64"):
        ops.selective_state_update(**{**a, "x": a["x"].double()})
    state = torch.zeros(2, 24, 4)
    with pytest.raises(InputError, match=r"weight has shape \(24, 3\), expected \(24, 4\)"):
        ops.causal_conv1d_update(torch.rand(2, 24), state, torch.rand(24, 3), None)
    with pytest.raises(InputError, match=r"conv_state has dtype torch.int32"):
        ops.causal_conv1d_update(torch.rand(2, 24), state.int(), torch.rand(24, 4), None)


# ---------------------------------------------------------------- fallbacks and the build


def test_other_devices_use_the_reference(monkeypatch):
    def fail():
        raise AssertionError("kernels requested for a non-CPU tensor")

    monkeypatch.setattr(cpu, "kernels", fail)
    inputs = {k: None if v is None else v.to("meta") for k, v in scan_inputs(2, 5, 24, 8).items()}
    y, h = fused.selective_scan(*(inputs[k] for k in SCAN_ARGS))
    assert y.device.type == "meta" and y.shape == (2, 5, 24) and h.shape == (2, 24, 8)


def test_failed_build_warns_once_and_uses_the_reference(monkeypatch):
    def broken():
        raise cpu.KernelBuildError("no compiler (simulated)")

    monkeypatch.setattr(cpu, "_state", {"tried": False, "ops": None, "error": None})
    monkeypatch.setattr(cpu, "load_extension", broken)
    inputs = scan_inputs(1, 6, 24, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, h = fused.selective_scan(*(inputs[k] for k in SCAN_ARGS))
        fused.selective_scan(*(inputs[k] for k in SCAN_ARGS))
    assert [str(w.message) for w in caught if "fused CPU kernels unavailable" in str(w.message)] != []
    assert len(caught) == 1
    y_ref, h_ref = selective_scan_ref(*(inputs[k] for k in SCAN_ARGS))
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)


def test_env_var_forces_the_reference(monkeypatch):
    monkeypatch.setenv("JAMBALAB_KERNELS", "ref")
    try:
        importlib.reload(ops)  # the variable is read when jambalab.ops is imported
        assert ops.selective_scan is ops.selective_scan_ref
        assert ops.selective_state_update is ops.selective_state_update_ref
        assert ops.causal_conv1d_update is ops.causal_conv1d_update_ref
        assert ops.causal_conv1d is ops.causal_conv1d_ref
        assert ops.dt_softplus is ops.dt_softplus_ref
        assert ops.linear is ops.linear_ref  # F.linear, and the dequantizing twin for a QuantWeight
        assert ops.rms_norm is ops.rms_norm_ref
        assert not ops.decode_fusable(torch.zeros(1, 4))
        assert ops.cross_entropy is F.cross_entropy
    finally:
        monkeypatch.delenv("JAMBALAB_KERNELS")
        importlib.reload(ops)
    assert ops.selective_scan is fused.selective_scan


def test_unverified_library_is_rebuilt_not_loaded(monkeypatch, tmp_path):
    """dlopen of a truncated .so (a killed build) dies with SIGBUS, so only verified builds load directly."""
    from torch.utils import cpp_extension

    calls = []
    library = tmp_path / "lib.so"

    def fake_build(**kwargs):
        calls.append(("build", library.exists()))
        library.write_bytes(b"complete library")

    monkeypatch.setattr(cpp_extension, "load", fake_build)
    monkeypatch.setattr(torch.ops, "load_library", lambda path: calls.append(("load", path)))
    library.write_bytes(b"trunc")  # left behind by an interrupted build: no marker
    cpu._load_or_build("lib", [], [], tmp_path)
    assert calls == [("build", False)]  # deleted, then rebuilt
    cpu._load_or_build("lib", [], [], tmp_path)
    assert calls[-1] == ("load", str(library))  # now verified: loaded without building
    library.write_bytes(b"tampered")
    cpu._load_or_build("lib", [], [], tmp_path)
    assert calls[-1] == ("build", False)


def test_build_key_depends_on_the_cpu(monkeypatch):
    sources = sorted(cpu._CSRC.glob("*.cpp"))
    flags = cpu._compile_flags()
    here = cpu._build_key(sources, flags)
    monkeypatch.setattr(cpu, "_cpu_fingerprint", lambda: "flags: sse2 (some other machine)")
    assert cpu._build_key(sources, flags) != here


def test_jambalab_march_compiles_for_another_instruction_set(monkeypatch):
    """JAMBALAB_MARCH=x86-64-v3 builds what an AVX2 CPU runs (in a build of its own); a value that is not a
    -march name is refused with the variable named, and the kernels then fall back as for any build failure."""
    sources = sorted(cpu._CSRC.glob("*.cpp"))
    monkeypatch.delenv(cpu.MARCH_ENV, raising=False)
    native = cpu._compile_flags()
    assert "-march=native" in native or "-mcpu=native" in native
    monkeypatch.setenv(cpu.MARCH_ENV, " x86-64-v3 ")
    flags = cpu._compile_flags()
    assert "-march=x86-64-v3" in flags and not any("native" in f for f in flags)
    assert cpu._build_key(sources, flags) != cpu._build_key(sources, native)
    for bad in ("haswell -mavx512f", "-O0", "x86;rm"):
        monkeypatch.setenv(cpu.MARCH_ENV, bad)
        with pytest.raises(cpu.KernelBuildError, match=rf"JAMBALAB_MARCH={re.escape(repr(bad.strip()))} is not a -march"):
            cpu._compile_flags()


def test_a_build_failure_under_another_torch_names_the_tested_version():
    """torch 2.11's cpp_extension compiles C++17 and the kernels fail on std::bit_cast there (seen on a lent
    GPU machine): the warning says which torch they are built and tested with."""
    note = cpu.torch_version_note("2.11.0+cu130")
    assert f"torch {cpu.TESTED_TORCH}" in note and "this is torch 2.11.0+cu130" in note
    assert cpu.torch_version_note(cpu.TESTED_TORCH + "+cpu") == ""
    from pathlib import Path

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert f'"torch=={cpu.TESTED_TORCH}"' in pyproject  # the constant follows the pin
