"""Low-precision linear kernels (csrc/qgemv.cpp, ops/lowp.py) against their pure-PyTorch twins."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from jambalab.ops import cpu, lowp
from jambalab.errors import InputError
from jambalab.ops.quant_ref import (QuantWeight, bf16_gemv_ref, dequant_ref, dequantize, fake_quant_act, qlinear_ref, quantize_act_ref,
                                    quantize_weight, set_activations, wgemv_a8_ref, wgemv_ref)

pytestmark = pytest.mark.skipif(cpu.kernels() is None, reason=f"kernels did not build: {cpu.build_error()}")


def _weight(fmt: str, N: int, K: int, group: int | None):
    w = torch.randn(N, K) * 0.05
    if fmt in ("bf16", "fp16"):
        return w.to(torch.bfloat16 if fmt == "bf16" else torch.float16), None, 0
    qw = quantize_weight(w, 8 if fmt == "int8" else 4, group)
    return qw.data, qw.scales, qw.group_size


CASES = [  # (format, N, K, group)
    ("bf16", 37, 100, None), ("fp16", 16, 64, None), ("bf16", 300, 1024, None),
    ("int8", 37, 100, None), ("int8", 65, 96, 32), ("int8", 300, 1024, 128),
    ("int4", 37, 64, 32), ("int4", 129, 256, 64), ("int4", 300, 1024, 32),
]


@pytest.mark.parametrize("fmt,N,K,group", CASES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_wgemv_matches_its_twin(fmt, N, K, group, rows, x_dtype):
    torch.manual_seed(rows)
    weight, scales, G = _weight(fmt, N, K, group)
    x = torch.randn(rows, K).to(x_dtype)
    bias = torch.randn(N) if rows % 2 else None
    got = cpu.kernels().wgemv(x, weight, scales, G, bias)
    want = wgemv_ref(x, weight, scales, G, bias)
    assert got.dtype == x_dtype and got.shape == (rows, N)
    tol = 2e-5 if x_dtype == torch.float32 else 1e-2  # bf16 output: one rounding of a sum in another order
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("rows", [5, 8, 13, 16])
def test_bf16_model_wgemv_takes_16_rows_each_as_if_alone(rows):
    """bf16 x over a bf16 weight (a bf16 model): up to 16 rows in one call, each weight
    row serving them in groups of 4; a row's result is bitwise its result alone, and dense_linear sends
    decode-sized calls there."""
    kernels = cpu.kernels()
    torch.manual_seed(rows)
    w = (torch.randn(2000, 4100) * 0.05).bfloat16()  # K: a masked tail; N: enough sums to show an order change
    x, bias = torch.randn(rows, 4100).bfloat16(), torch.randn(2000)
    got = kernels.wgemv(x, w, None, 0, bias)
    torch.testing.assert_close(got.float(), wgemv_ref(x, w, None, 0, bias).float(), rtol=1e-2, atol=1e-2)
    for r in range(rows):
        assert torch.equal(got[r:r + 1], kernels.wgemv(x[r:r + 1], w, None, 0, bias))
    for size in (2, 3, 4):  # every group size the kernel has
        assert torch.equal(torch.cat([kernels.wgemv(b, w, None, 0, bias) for b in x.split(size)]), got)
    assert torch.equal(lowp.dense_linear(x, w, bias), got)
    with pytest.raises(RuntimeError, match="1 to 16 rows"):
        kernels.wgemv(torch.randn(17, 4100).bfloat16(), w, None, 0, None)


@pytest.mark.parametrize("rows", [2, 3, 4])
@pytest.mark.parametrize("K", [2176, 4100, 8300])
def test_bf16_model_wgemv_in_blocks_of_k_is_bitwise_one_pass(rows, K):
    """2-4 bf16 rows whose x exceeds L1 walk the weights in blocks of K (qgemv.cpp), the chains carried
    between blocks: each row's sums are bitwise those of the row alone (one pass over each weight row),
    with a masked tail and a last block of outputs shorter than the others."""
    kernels = cpu.kernels()
    torch.manual_seed(K + rows)
    w = (torch.randn(150, K) * 0.05).bfloat16()
    x, bias = torch.randn(rows, K).bfloat16(), torch.randn(150)
    got = kernels.wgemv(x, w, None, 0, bias)
    torch.testing.assert_close(got.float(), wgemv_ref(x, w, None, 0, bias).float(), rtol=1e-2, atol=1e-2)
    for r in range(rows):
        assert torch.equal(got[r:r + 1], kernels.wgemv(x[r:r + 1], w, None, 0, bias))


# tails: K % 32 != 0; (150, 8300): several rows over an x that does not fit in L1
@pytest.mark.parametrize("N,K", [(37, 100), (300, 1024), (64, 8), (20, 160), (5, 4096), (150, 8300)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 16])
def test_gemv_over_bf16_weights_matches_its_twin_and_each_row_is_as_if_alone(N, K, rows):
    """Weight-only bf16 (gemv.cpp): x rounded to bf16, exact products, fp32 sums; a row's result is
    bitwise the same whatever the batch around it."""
    torch.manual_seed(rows)
    weight = (torch.randn(N, K) * 0.05).bfloat16()
    x, bias = torch.randn(rows, K), (torch.randn(N) if rows % 2 else None)
    got = cpu.kernels().gemv(x, weight, bias)
    assert got.dtype == torch.float32 and got.shape == (rows, N)
    torch.testing.assert_close(got, bf16_gemv_ref(x, weight, bias), rtol=1e-5, atol=1e-5)
    # not the fp32 product: x really is rounded (a kernel widening x as it is would fail this)
    assert (got - F.linear(x, weight.float(), bias)).abs().max() > 1e-6
    for r in range(rows):
        assert torch.equal(cpu.kernels().gemv(x[r:r + 1].clone(), weight, bias), got[r:r + 1])


@pytest.mark.parametrize("rows", [1, 16, 17, 200])
@pytest.mark.parametrize("native", [False, True])
def test_dense_linear_of_float32_x_and_bf16_weights(rows, native, monkeypatch):
    """Decode-sized calls take the gemv (fp32 out); prefill the bf16 GEMM where native (its output rounded
    to bf16), else fp32 tiles of the weight against the rounded x: the same function (x rounded to bf16)."""
    monkeypatch.setattr(lowp, "native_bf16", lambda: native)
    weight, x, bias = (torch.randn(70, 256) * 0.05).bfloat16(), torch.randn(rows, 256), torch.randn(70)
    got = lowp.dense_linear(x, weight, bias)
    assert got.dtype == torch.float32 and got.shape == (rows, 70)
    tol = 2e-2 if rows > 16 and native else 1e-5
    torch.testing.assert_close(got, bf16_gemv_ref(x, weight, bias), rtol=tol, atol=tol)


def test_bf16_values_is_the_cast_pair_bit_for_bit():
    """lowp.bf16_values rounds as x.to(bf16).float() does (ties to even, overflow to inf, NaN kept, denormals),
    eager and compiled: inductor drops the rounding of a fused cast pair, the bit arithmetic it compiles
    instead does not."""
    torch.manual_seed(0)
    scale = 10.0 ** torch.randint(-40, 39, (20000,)).float()
    edge = torch.tensor([float("inf"), -float("inf"), float("nan"), 3.3895e38, -3.3896e38, 3.4028e38, 0.0, -0.0,
                         1e-40, -1e-41, 1.00390625, 1.01171875])  # the last two: ties, to even down and up
    x = torch.cat([torch.randn(20000) * scale, edge])
    want = x.to(torch.bfloat16).float()
    for got in (lowp.bf16_values(x), torch.compile(lowp.bf16_values)(x)):  # eager: the casts; compiled: the bits
        assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0)) and got.isnan().sum() == 1


@pytest.mark.slow
def test_compiled_bf16_weight_prefill_without_a_native_gemm_rounds_x(monkeypatch):
    """Weight-only bf16 prefill through fp32 tiles (a CPU without a native bf16 GEMM), under inductor: x is
    rounded to bf16 as in eager. With x.to(bf16).float() inductor fused the casts away and drifted by 2e-4."""
    monkeypatch.setattr(lowp, "_NATIVE_BF16", False)
    torch.manual_seed(0)
    weight, x = (torch.randn(48, 256) * 0.05).bfloat16(), torch.randn(40, 256)
    with torch.no_grad():
        want = lowp.dense_linear(x, weight)
        got = torch.compile(lowp.dense_linear)(x, weight)
    torch._dynamo.reset()  # the trace folded _NATIVE_BF16 in
    assert torch.equal(got, want)
    torch.testing.assert_close(want, bf16_gemv_ref(x, weight), rtol=1e-5, atol=1e-5)


A8_CASES = [  # (bits, N, K, group): per channel, groups of 32 / 64 / 96 (inside and across 64-weight chunks), a half chunk
    (8, 37, 96, None), (8, 65, 256, 32), (8, 300, 1024, 128), (8, 20, 192, 96),
    (4, 37, 64, 32), (4, 129, 256, 64), (4, 40, 96, 32), (4, 300, 1024, 128), (4, 20, 288, 96),
]


@pytest.mark.parametrize("bits,N,K,group", A8_CASES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_wgemv_a8_matches_its_twin(bits, N, K, group, rows, x_dtype):
    torch.manual_seed(rows)
    qw = quantize_weight(torch.randn(N, K) * 0.05, bits, group)
    x = (torch.randn(rows, K) * torch.rand(rows, K) * 4).to(x_dtype)  # uneven magnitudes: different block scales
    bias = torch.randn(N) if rows % 2 else None
    got = cpu.kernels().wgemv_a8(x, qw.data, qw.scales, qw.group_size, bias)
    want = wgemv_a8_ref(x, qw.data, qw.scales, qw.group_size, bias)
    assert got.dtype == x_dtype and got.shape == (rows, N)
    tol = 1e-5 if x_dtype == torch.float32 else 1e-2  # the integer sums are exact; only the float sums' order differs
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    # The identity the prefill GEMM relies on: the same as fp32 x rounded to its int8 blocks, times the dense weight.
    if x_dtype == torch.float32:
        dense = F.linear(fake_quant_act(x), dequantize(qw), bias)
        torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,N,K,group", [(8, 1029, 256, None), (8, 1030, 192, 96), (4, 1029, 256, 32), (4, 1030, 256, 128)])
def test_wgemv_a8_rows_are_bitwise_independent_of_batch_and_threads(bits, N, K, group):
    """A row's result is bitwise its result alone, whatever rows and threads run beside it: 2-4 int8 rows
    take 4 outputs side by side (N leaves 1-2 alone at the end, and 2 threads split the outputs at an odd
    place), one row takes one output at a time."""
    torch.manual_seed(bits)
    qw = quantize_weight(torch.randn(N, K) * 0.05, bits, group)
    x = torch.randn(4, K) * torch.rand(4, K) * 4
    bias = torch.randn(N)

    def run(rows):
        return cpu.kernels().wgemv_a8(rows, qw.data, qw.scales, qw.group_size, bias)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([run(x[r:r + 1]) for r in range(4)])
        for t in (1, 2):
            torch.set_num_threads(t)
            for R in (1, 2, 3, 4):
                assert torch.equal(run(x[:R]), alone[:R]), (t, R)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(alone, wgemv_a8_ref(x, qw.data, qw.scales, qw.group_size, bias), rtol=1e-5, atol=1e-5)


def test_activation_quantizer_rounds_each_block_to_int8():
    x = torch.randn(3, 128) * torch.tensor([1e-3, 1.0, 50.0]).repeat_interleave(32).repeat(1, 4)[:, :128]
    x[1, 32:64] = 0  # an all-zero block: scale 0, q 0
    q, d = quantize_act_ref(x)
    assert q.dtype == torch.int8 and d.shape == (3, 4) and q.abs().max() <= 127
    assert (q.view(3, 4, 32).abs().amax(-1)[d > 0] == 127).all() and d[1, 1] == 0 and (q[1, 32:64] == 0).all()
    err = (x - fake_quant_act(x)).abs().view(3, 4, 32)
    assert (err <= d[..., None] / 2 * (1 + 1e-6)).all()  # round to nearest


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out", [torch.float32, torch.bfloat16])
def test_act_round_is_exactly_its_twin(x_dtype, out):
    x = (torch.randn(37, 192) * torch.rand(37, 192) * 3).to(x_dtype)
    x[5, 32:64] = 0
    got = cpu.kernels().act_round(x, out)
    assert got.dtype == out and torch.equal(got, fake_quant_act(x).to(out))


@pytest.fixture
def float_activations():
    set_activations("float")
    yield
    set_activations("int8")


@pytest.mark.parametrize("rows", [1, 4, 13, 200])
def test_float_activation_mode_is_the_exact_product(rows, float_activations, monkeypatch):
    monkeypatch.setattr(lowp, "native_bf16", lambda: False)  # a float32 prefill GEMM (else bf16: see below)
    qw = quantize_weight(torch.randn(70, 256) * 0.05, 8, None)
    x = torch.randn(rows, 256)
    torch.testing.assert_close(lowp.qlinear(x, qw), F.linear(x, dequantize(qw)), rtol=2e-5, atol=2e-5)


def test_int8_activation_mode_is_the_default_and_checked():
    qw = quantize_weight(torch.randn(70, 256) * 0.05, 4, 32)
    x = torch.randn(3, 256)
    torch.testing.assert_close(lowp.qlinear(x, qw), F.linear(fake_quant_act(x), dequantize(qw)), rtol=2e-5, atol=2e-5)
    with pytest.raises(InputError, match="activations must be one of int8, float"):
        set_activations("int4")


_ISA_CHECK = """
import sys, tempfile, torch
from torch.utils import cpp_extension
cpp_extension.load(name="a8_isa", sources=[sys.argv[1]], extra_cflags=["-O3", "-march=native", *sys.argv[2:]],
                   build_directory=tempfile.mkdtemp(), is_python_module=False)
from jambalab.ops.quant_ref import quantize_weight, wgemv_a8_ref
for bits, G, K in ((8, None, 96), (8, 32, 192), (4, 32, 96), (4, 64, 256), (4, 96, 288)):
    for R in (1, 3):
        qw, x = quantize_weight(torch.randn(37, K), bits, G), torch.randn(R, K)
        got = torch.ops.jambalab_kernels.wgemv_a8(x, qw.data, qw.scales, qw.group_size, None)
        torch.testing.assert_close(got, wgemv_a8_ref(x, qw.data, qw.scales, qw.group_size, None), rtol=1e-5, atol=1e-5)
from jambalab.ops.quant_ref import dequantize, fake_quant_act
ops = torch.ops.jambalab_kernels
assert ops.wgemm_a8_available() == ops.a8_native()
for M, N, K, bits, G in ((37, 70, 256, 4, 32), (5, 33, 192, 4, 64), (9, 40, 192, 8, 32), (6, 9, 128, 8, None)):
    if not ops.wgemm_a8_available():
        break
    qw, x = quantize_weight(torch.randn(N, K) * 0.05, bits, G), torch.randn(M, K)
    bias = torch.randn(N) if M % 2 else None
    got = ops.wgemm_a8(x, qw.data, qw.scales, qw.group_size, bias)
    want = torch.nn.functional.linear(fake_quant_act(x).double(), dequantize(qw).double(),
                                      None if bias is None else bias.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
print(torch.ops.jambalab_kernels.a8_native())
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not torch.cpu._is_avx2_supported(),
                    reason="the ISA variants are x86 ones")
@pytest.mark.parametrize("flags,simd", [(["-mno-avx512f", "-mno-avx512vnni"], True),  # the AVX2 kernel
                                        (["-mno-avx2", "-mno-avx512f", "-mno-avx512vnni"], False)])  # portable
def test_wgemv_a8_other_isa_builds_match_the_twin(flags, simd):
    """This machine builds only its own -march=native variant: the AVX2 and portable code paths of a8gemv.cpp
    are compiled here without the newer ISAs, in a fresh process (the op names would clash), and checked:
    wgemv_a8, and the prefill GEMM wgemm_a8 where the build has one (AVX2, not the portable loop)."""
    src = Path(cpu.__file__).parent / "csrc" / "a8gemv.cpp"
    out = subprocess.run([sys.executable, "-c", _ISA_CHECK, str(src), *flags], capture_output=True, text=True,
                         timeout=600, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == str(simd)


_GEMV_ISA_CHECK = """
import sys, tempfile, torch
from torch.utils import cpp_extension
cpp_extension.load(name="gemv_isa", sources=sys.argv[1:3], extra_cflags=["-O3", "-march=native", *sys.argv[3:]],
                   build_directory=tempfile.mkdtemp(), is_python_module=False)
from jambalab.ops.quant_ref import bf16_gemv_ref, wgemv_ref
ops = torch.ops.jambalab_kernels
for K in (8, 100, 160, 1024, 4100):
    w = (torch.randn(37, K) * 0.05).bfloat16()
    for R in (1, 2, 3, 16):
        x = torch.randn(R, K)
        got = ops.gemv(x, w, None)
        torch.testing.assert_close(got, bf16_gemv_ref(x, w), rtol=1e-5, atol=1e-5)
        xb = x.bfloat16()  # a bf16 model's wgemv (Bf16Dot)
        got_b = ops.wgemv(xb, w, None, 0, None)
        torch.testing.assert_close(got_b.float(), wgemv_ref(xb, w, None, 0, None).float(), rtol=1e-2, atol=1e-2)
        for r in range(R):
            assert torch.equal(ops.gemv(x[r:r + 1].clone(), w, None), got[r:r + 1])
            assert torch.equal(ops.wgemv(xb[r:r + 1].clone(), w, None, 0, None), got_b[r:r + 1])
print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not torch.cpu._is_avx2_supported(),
                    reason="the ISA variants are x86 ones")
@pytest.mark.parametrize("flags", [["-mno-avx512bf16"], ["-mno-avx512f", "-mno-avx512bf16"]])
def test_bf16_gemvs_without_avx512_bf16_match_the_twin(flags):
    """gemv.cpp's weight-only bf16 and qgemv.cpp's bf16 x bf16 (a bf16 model) on CPUs without vdpbf16ps (the
    weights widened in registers), built here without it: each row's result is its result alone."""
    csrc = Path(cpu.__file__).parent / "csrc"
    out = subprocess.run([sys.executable, "-c", _GEMV_ISA_CHECK, str(csrc / "gemv.cpp"), str(csrc / "qgemv.cpp"), *flags],
                         capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok"


def test_bf16dot_is_native_exactly_where_the_cpu_has_avx512_bf16():
    """The build's vdpbf16ps path is taken where (and only where) the CPU has it (-march=native)."""
    assert cpu.kernels().bf16dot_native() == torch.cpu._is_avx512_bf16_supported()


def test_wgemv_a8_rejects_bad_arguments():
    qw = quantize_weight(torch.randn(8, 64), 4, 32)
    with pytest.raises(RuntimeError, match="multiples of 32"):
        cpu.kernels().wgemv_a8(torch.randn(1, 64), qw.data, qw.scales, 16, None)
    with pytest.raises(RuntimeError, match="int8 or uint8"):
        cpu.kernels().wgemv_a8(torch.randn(1, 64), torch.randn(8, 64), qw.scales, 32, None)
    with pytest.raises(RuntimeError, match="1 to 4 rows"):
        cpu.kernels().wgemv_a8(torch.randn(5, 64), qw.data, qw.scales, 32, None)


@pytest.mark.parametrize("fmt,N,K,group", [c for c in CASES if c[0] in ("int8", "int4")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequant_tile_is_exactly_its_twin(fmt, N, K, group, dtype):
    weight, scales, G = _weight(fmt, N, K, group)
    lo, hi = 3, N - 2
    got = cpu.kernels().dequant(weight, scales, G, lo, hi, dtype)
    assert torch.equal(got, dequant_ref(weight, scales, G, lo, hi, dtype))


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)])
@pytest.mark.parametrize("rows", [1, 4, 5, 13, 200])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_qlinear_matches_its_twin_on_both_paths(bits, group, rows, x_dtype, monkeypatch):
    """rows <= 16: the GEMV on blocks of 4 rows; more: dequantized tiles (small here, so that there are several)."""
    monkeypatch.setattr(lowp, "_TILE_BYTES", 4096)
    qw = quantize_weight(torch.randn(70, 256) * 0.05, bits, group)
    x = torch.randn(2, rows, 256).to(x_dtype)
    bias = torch.randn(70)
    got = lowp.qlinear(x, qw, bias)
    want = qlinear_ref(x, qw, bias)
    assert got.shape == (2, rows, 70) and got.dtype == x_dtype
    exact = x_dtype == torch.float32 and (2 * rows <= 16 or lowp.quant_gemm_dtype() == torch.float32)
    tol = 2e-5 if exact else 3e-2  # a bf16 GEMM rounds x and the tiles to bf16
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("native", [True, False])
def test_quantized_prefill_of_fp32_activations_takes_the_native_bf16_gemm(native, monkeypatch):
    monkeypatch.setattr(lowp, "native_bf16", lambda: native)
    qw = quantize_weight(torch.randn(70, 256) * 0.05, 4, 32)
    x = torch.randn(40, 256)
    assert lowp.quant_gemm_dtype() == (torch.bfloat16 if native else torch.float32)
    got = lowp.qlinear(x, qw)
    assert got.dtype == torch.float32
    want = F.linear(fake_quant_act(x), dequantize(qw))
    tol = 3e-2 if native else 2e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    if native:  # the bf16 GEMM's rounding, not the float32 product
        assert not torch.allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_prefill_takes_fp32_tiles_without_a_native_bf16_gemm(native, monkeypatch):
    monkeypatch.setattr(lowp, "native_bf16", lambda: native)
    monkeypatch.setattr(lowp, "_TILE_BYTES", 4096)
    w = (torch.randn(50, 128) * 0.05).bfloat16()
    x = torch.randn(lowp.GEMV_ROWS_BF16 + 3, 128).bfloat16()  # above the decode GEMV's rows
    got = lowp.dense_linear(x, w)
    want = F.linear(x.float(), w.float()).bfloat16()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    assert lowp.gemm_dtype(torch.bfloat16) == (torch.bfloat16 if native else torch.float32)
    assert lowp.gemm_dtype(torch.float32) == torch.float32


def test_dense_bf16_linear_keeps_autograd():
    w = (torch.randn(8, 16) * 0.1).bfloat16().requires_grad_()
    x = torch.randn(2, 16).bfloat16().requires_grad_()
    lowp.dense_linear(x, w).float().sum().backward()
    assert w.grad is not None and x.grad is not None


def test_qlinear_rejects_a_mismatched_input():
    qw = quantize_weight(torch.randn(8, 64), 4, 32)
    with pytest.raises(ValueError, match="64"):
        lowp.qlinear(torch.randn(1, 32), qw)


@pytest.mark.parametrize("bad,match", [
    (lambda w, s: (torch.randn(1, 64), w, s[:, :1].contiguous(), 32, None), "scales must be"),
    (lambda w, s: (torch.randn(1, 64), w, s, 48, None), "does not divide"),
    (lambda w, s: (torch.randn(5, 64), w, s, 32, None), "1 to 4 rows"),
    (lambda w, s: (torch.randn(1, 60), w, s, 32, None), "disagree on K"),
    (lambda w, s: (torch.randn(1, 64), w.float(), None, 0, None), "bf16, fp16, int8 or uint8"),
])
def test_wgemv_rejects_bad_arguments(bad, match):
    qw = quantize_weight(torch.randn(8, 64), 4, 32)
    with pytest.raises(RuntimeError, match=match):
        cpu.kernels().wgemv(*bad(qw.data, qw.scales))


def test_quant_weight_indexes_experts():
    qw = quantize_weight(torch.randn(3, 8, 64), 4, 32)
    assert isinstance(qw[1], QuantWeight) and qw[1].data.shape == (8, 32) and len(qw.unbind()) == 3
    assert lowp.qlinear(torch.randn(2, 64), qw[2]).shape == (2, 8)


WGEMM_CASES = [  # (M, N, K, bits, group): rows past a block of 4, outputs past a tile of 32, bias or not
    (37, 70, 256, 4, 32), (5, 33, 192, 4, 64), (37, 70, 256, 8, None), (9, 40, 192, 8, 32), (1, 16, 128, 4, 128),
    (64, 96, 512, 8, 128),
]


@pytest.mark.parametrize("M,N,K,bits,group", WGEMM_CASES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_wgemm_a8_matches_its_twin(M, N, K, bits, group, x_dtype):
    """The int8-activation prefill GEMM (a8gemv.cpp's wgemm_a8, VNNI or AVX2): x quantized as wgemv_a8 does, exact int32
    block sums, so it is the twin (rounded x @ dequantized W^T) up to the order of the fp32 sums."""
    if not cpu.has_wgemm_a8():
        pytest.skip("no wgemm_a8 (AVX512-VNNI or AVX2)")
    torch.manual_seed(M + N)
    qw = quantize_weight(torch.randn(N, K) * 0.05, bits, group)
    x, bias = torch.randn(M, K).to(x_dtype), (torch.randn(N) if M % 2 else None)
    got = cpu.kernels().wgemm_a8(x, qw.data, qw.scales, qw.group_size, bias)
    want = F.linear(fake_quant_act(x).double(), dequantize(qw).double(), None if bias is None else bias.double())
    assert got.dtype == x_dtype and got.shape == (M, N)
    tol = 1e-5 if x_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), want.to(x_dtype).double(), rtol=tol, atol=tol)
    # the decode GEMV computes the same function, row by row
    gemv = torch.cat([cpu.kernels().wgemv_a8(r, qw.data, qw.scales, qw.group_size, bias) for r in x.split(4)])
    torch.testing.assert_close(got.double(), gemv.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)])
def test_quantized_prefill_takes_wgemm_a8_without_a_native_bf16_gemm(bits, group, monkeypatch):
    """On a CPU with VNNI or AVX2 and no native bf16 GEMM, qlinear's prefill (more than 16 rows) in the int8-activation
    mode runs wgemm_a8; the float mode keeps the dequantized tiles."""
    if not cpu.has_wgemm_a8():
        pytest.skip("no wgemm_a8 (AVX512-VNNI or AVX2)")
    monkeypatch.setattr(lowp, "native_bf16", lambda: False)
    qw = quantize_weight(torch.randn(70, 256) * 0.05, bits, group)
    x = torch.randn(40, 256)
    calls = []
    real = cpu.kernels().wgemm_a8

    class Spy:
        def __getattr__(self, name):
            if name == "wgemm_a8":
                return lambda *a: calls.append(1) or real(*a)
            return getattr(torch.ops.jambalab_kernels, name)

    monkeypatch.setattr(cpu, "kernels", lambda: Spy())
    got = lowp.qlinear(x, qw)
    assert calls == [1]
    torch.testing.assert_close(got, F.linear(fake_quant_act(x), dequantize(qw)), rtol=1e-5, atol=1e-5)


def test_wgemm_a8_rejects_bad_arguments():
    if not cpu.has_wgemm_a8():
        pytest.skip("no wgemm_a8 (AVX512-VNNI or AVX2)")
    qw = quantize_weight(torch.randn(8, 64), 4, 32)
    with pytest.raises(RuntimeError, match="scales must be contiguous fp16"):
        cpu.kernels().wgemm_a8(torch.randn(3, 64), qw.data, qw.scales.float(), 32, None)
    with pytest.raises(RuntimeError, match="x must be fp32 or bf16"):
        cpu.kernels().wgemm_a8(torch.randn(3, 32), qw.data, qw.scales, 32, None)


def test_native_bf16_needs_the_cpu_and_atens_avx512_kernels(monkeypatch):
    """ATEN_CPU_CAPABILITY=avx2 (a run held to what an AVX2 CPU has) takes the fp32 tiles even where the CPU
    has AVX512-BF16 or AMX."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert lowp._detect_native_bf16("AVX512")
    assert not lowp._detect_native_bf16("AVX2") and not lowp._detect_native_bf16("DEFAULT")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert not lowp._detect_native_bf16("AVX512")
