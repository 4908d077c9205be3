"""ops/gemm.py: oneDNN's fp32 GEMM for prefill-sized linears, against its twin F.linear."""

import pytest
import torch
import torch.nn.functional as F

from jambalab.ops import fused, gemm

onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@onednn
@pytest.mark.parametrize("shape,n,bias", [((17, 64), 96, False), ((2, 40, 256), 1000, True), ((1, 512, 33), 7, True),
                                          ((300, 1), 5, False)])
def test_onednn_linear_matches_f_linear(monkeypatch, shape, n, bias):
    monkeypatch.setattr(gemm, "_BACKEND", "onednn")
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*shape, generator=g), torch.randn(n, shape[-1], generator=g)
    b = torch.randn(n, generator=g) if bias else None
    y = gemm.linear(x, w, b)
    assert y.shape == (*shape[:-1], n) and y.dtype == torch.float32
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert _rel(y.double(), want) < 1e-6
    xt = torch.randn(shape[-1], 24, generator=g).t()  # a non-contiguous x
    assert _rel(gemm.linear(xt, w, b).double(), F.linear(xt, w, b).double()) < 1e-6


@onednn
def test_onednn_is_taken_only_where_it_applies(monkeypatch):
    monkeypatch.setattr(gemm, "_BACKEND", "onednn")
    calls = []
    real = gemm._onednn_linear
    monkeypatch.setattr(gemm, "_onednn_linear", lambda x, w, b: (calls.append(x.shape), real(x, w, b))[1])
    w = torch.randn(8, 16, requires_grad=True)
    gemm.linear(torch.randn(32, 16), w).sum().backward()  # autograd: F.linear
    assert calls == [] and w.grad is not None
    w = w.detach()
    gemm.linear(torch.randn(32, 16).bfloat16(), w.bfloat16())  # not float32
    gemm.linear(torch.randn(32, 16), w.t().contiguous().t())  # a non-contiguous weight
    gemm.linear(torch.randn(16), w)  # one vector
    with pytest.raises(RuntimeError):
        gemm.linear(torch.randn(32, 15), w)  # F.linear's own shape error, not oneDNN's
    assert calls == []
    fused.linear(torch.randn(4, 16), w)  # decode-sized: the GEMV, not a GEMM
    fused.linear(torch.randn(2, 15, 16), w)  # 30 rows: F.linear (padding would nearly double them)
    fused.linear(torch.randn(2, 35, 16), w)  # 70 rows: one block, padded to 96
    assert calls == [(96, 16)]
    monkeypatch.setattr(gemm, "_BACKEND", "blas")
    gemm.linear(torch.randn(32, 16), w)
    assert calls == [(96, 16)] and gemm.backend() == "blas"


@onednn
def test_row_blocks_bound_the_shapes_onednn_sees(monkeypatch):
    """Every row count goes through blocks of BLOCK_ROWS rows and one last block padded to a multiple of
    PAD_ROWS (oneDNN keeps a compiled primitive per shape), and gives F.linear's rows."""
    monkeypatch.setattr(gemm, "_BACKEND", "onednn")
    seen = set()
    real = gemm._onednn_linear
    monkeypatch.setattr(gemm, "_onednn_linear", lambda x, w, b: (seen.add(x.shape[0]), real(x, w, b))[1])
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    for m in [17, 31, 32, 33, 63, 64, 65, 255, 256, 257, 300, 511, 512, 700, 1025]:
        x = torch.randn(m, 40, generator=g)
        y = gemm.linear(x, w, b)
        assert y.shape == (m, 24)
        assert _rel(y.double(), F.linear(x.double(), w.double(), b.double())) < 1e-6
    shapes = {gemm.BLOCK_ROWS, *range(gemm.MIN_TAIL_ROWS, gemm.BLOCK_ROWS, gemm.PAD_ROWS)}
    assert seen <= shapes and len(shapes) <= 8
    assert gemm.BLOCK_ROWS in seen and gemm.MIN_TAIL_ROWS in seen


def test_backend_is_chosen_from_the_environment(monkeypatch):
    import importlib

    monkeypatch.setenv(gemm.GEMM_ENV, "BLAS")
    try:
        assert importlib.reload(gemm).backend() == "blas"
        monkeypatch.delenv(gemm.GEMM_ENV)
        want = "onednn" if torch.backends.mkldnn.is_available() else "blas"
        assert importlib.reload(gemm).backend() == want
    finally:
        monkeypatch.delenv(gemm.GEMM_ENV, raising=False)
        importlib.reload(gemm)
