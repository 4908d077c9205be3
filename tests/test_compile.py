"""torch.compile over the low-precision paths: the custom ops trace (fake kernels registered), whole
graphs are captured without breaks, and compiled logits equal eager ones."""

import copy

import pytest
import torch

import jambalab
from jambalab.model import Linear
from jambalab.ops import cpu
from jambalab.quant import QuantLinear, quantize_model

pytestmark = pytest.mark.skipif(cpu.kernels() is None, reason=f"kernels did not build: {cpu.build_error()}")


@pytest.mark.parametrize("fmt", ["int8", "int4", "bf16", "bf16w"])
@pytest.mark.parametrize("rows", [1, 9, 20])  # the decode GEMV op (1, 9 rows; 9 is prefill for int8 / int4), prefill
def test_low_precision_linear_compiles_as_one_graph(fmt, rows):
    lin = Linear(64, 48)
    if fmt == "bf16":
        mod, dtype = lin.to(torch.bfloat16), torch.bfloat16
    elif fmt == "bf16w":  # weight-only bf16: a bf16 weight, float32 x
        lin.weight = torch.nn.Parameter(lin.weight.detach().bfloat16(), requires_grad=False)
        mod, dtype = lin, None
    else:
        mod, dtype = QuantLinear.from_linear(lin, 8 if fmt == "int8" else 4, None if fmt == "int8" else 32, "l"), None
    x = torch.randn(rows, 64, dtype=dtype or torch.float32)
    with torch.no_grad():
        want = mod(x)
        got = torch.compile(mod, backend="aot_eager", fullgraph=True)(x)  # a graph break would raise here
    assert torch.equal(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", [None, "int8", "int4", "bf16"])
def test_compiled_model_gives_the_eager_logits(scheme):
    """Inductor on the whole model (graph breaks allowed where the model reads data: input checks,
    the MoE's tokens per expert): prefill and a few cached decode steps."""
    model = jambalab.from_preset("tiny-hybrid").eval()
    if scheme:
        quantize_model(model, scheme)
    ids = torch.randint(3, 500, (2, 24))
    compiled = torch.compile(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
        c_eager, c_comp = model.allocate_cache(2), model.allocate_cache(2)
        model(ids[:, :20], cache=c_eager), compiled(ids[:, :20], cache=c_comp)
        for t in range(20, 24):
            want = model(ids[:, t:t + 1], cache=c_eager).logits
            torch.testing.assert_close(compiled(ids[:, t:t + 1], cache=c_comp).logits, want, rtol=0, atol=1e-5)
