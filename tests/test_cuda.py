"""The models on a CUDA device give the CPU's numbers.

The model code is plain PyTorch; on CUDA every op takes its pure-PyTorch reference path (the fast
kernels in jambalab/ops are CPU code). These tests check that nothing in the model, the cache,
low precision, generation, training, the serving engine or Vim assumes a CPU tensor, and that the
figures match the CPU's. CI has no GPU: the module skips there.
"""

import copy
import math

import pytest
import torch

import jambalab
from jambalab.generate import generate
from jambalab.quant import logit_drift, quantize_model
from jambalab.serve.engine import SamplingParams
from serve_util import stopped_after

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CUDA = torch.device("cuda")
FAMILIES = ["tiny-hybrid", "tiny-mamba", "tiny-transformer"]
ATOL = 2e-4  # fp32 on two devices: different GEMM and reduction orders


@pytest.fixture(autouse=True)
def _no_tf32():
    """TF32 would round fp32 GEMM and convolution inputs to 10 bits of mantissa (~1e-3)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _ids(batch: int, length: int, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_on_cuda_gives_the_cpu_logits(name):
    model, ids = jambalab.from_preset(name).eval(), _ids(2, 40)
    with torch.no_grad():
        want = model(ids).logits
        got = model.to(CUDA)(ids.to(CUDA)).logits
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", FAMILIES)
def test_decode_on_cuda_equals_the_forward(name):
    model, ids = jambalab.from_preset(name).eval().to(CUDA), _ids(2, 24).to(CUDA)
    cache = model.allocate_cache(2)
    with torch.no_grad():
        want = model(ids[:, :16]).logits, model(ids).logits[:, 16:]
        got = model(ids[:, :16], cache=cache).logits, torch.cat(
            [model(ids[:, t:t + 1], cache=cache).logits for t in range(16, 24)], dim=1)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=ATOL)


def test_padded_batch_and_chunked_prefill_on_cuda():
    """Left padding (the cache's key mask) and chunked prefill build their masks and positions on the
    input's device: each row's greedy tokens equal its own run's."""
    model = jambalab.from_preset("tiny-hybrid").eval().to(CUDA)
    prompts = [_ids(1, n, seed=n)[0] for n in (5, 13, 9)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    batched = generate(model, ids.to(CUDA), 6, attention_mask=mask.to(CUDA), chunk_size=4)[:, width:]
    for row, p in enumerate(prompts):
        alone = generate(model, p[None].to(CUDA), 6)[0, len(p):]
        assert torch.equal(batched[row], alone), row


@pytest.mark.parametrize("how", ["bf16-model", "bf16-weights", "int8", "int4"])
def test_low_precision_on_cuda_matches_the_cpu(how):
    """The same low-precision model on both devices: the CPU's kernels (vdpbf16ps or widened bf16,
    int8 dot products over activations rounded per block of 32) against CUDA's reference path."""
    model = jambalab.from_preset("tiny-hybrid").eval()
    if how == "bf16-model":
        model = model.to(torch.bfloat16)
    else:
        model = quantize_model(model, how.removesuffix("-weights"))
    ids = _ids(2, 40)
    with torch.no_grad():
        want = model(ids).logits.float()
        model = model.to(CUDA)
        got = model(ids.to(CUDA)).logits.float()
        cache = model.allocate_cache(2)
        model(ids[:, :39].to(CUDA), cache=cache)
        step = model(ids[:, 39:].to(CUDA), cache=cache).logits.float()  # decode on CUDA: its forward
    bound = 3e-2 if how == "bf16-model" else 1e-2  # bf16 activations round at every layer on both sides
    assert _rel_l2(got, want) < bound, how
    assert _rel_l2(step, got[:, 39:]) < bound, how


def test_quantized_drift_on_cuda():
    """logit_drift, the quality check the docs quote, runs on CUDA and reports what the CPU reports."""
    ref = jambalab.from_preset("tiny-hybrid").eval()
    ids = _ids(2, 48)
    want = logit_drift(ref, quantize_model(copy.deepcopy(ref), "int8"), ids)
    ref = ref.to(CUDA)
    got = logit_drift(ref, quantize_model(copy.deepcopy(ref), "int8"), ids.to(CUDA))
    assert got["rel_l2"] < 0.02 and got["kl"] < 1e-2, got
    assert math.isclose(got["rel_l2"], want["rel_l2"], rel_tol=0.1, abs_tol=1e-3), (got, want)


def test_sampling_on_cuda_is_seeded():
    """Temperature, top-k and top-p draw on the model's device with a generator of that device."""
    model, ids = jambalab.from_preset("tiny-hybrid").eval().to(CUDA), _ids(2, 8).to(CUDA)
    kw = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9)
    a = generate(model, ids, 12, seed=7, **kw)
    b = generate(model, ids, 12, seed=7, **kw)
    c = generate(model, ids, 12, seed=8, **kw)
    assert a.device.type == "cuda" and a.shape == (2, 20)
    assert torch.equal(a, b) and not torch.equal(a, c)
    wide = generate(model, ids, 4, do_sample=True, top_p=0.999999, seed=1)  # a nucleus over the vocabulary
    assert wide.shape == (2, 12)


def test_hf_checkpoint_on_cuda_gives_transformers_logits(tmp_path):
    """A Jamba checkpoint saved by transformers: our logits on CUDA equal transformers' on CUDA."""
    pytest.importorskip("transformers")
    from hf_models import JAMBA_SHAPES, build_hf

    hf = build_hf("jamba", JAMBA_SHAPES["jamba-block"])
    hf.save_pretrained(tmp_path)
    ours = jambalab.from_pretrained(tmp_path).eval().to(CUDA)
    hf = hf.to(CUDA)
    ids = _ids(2, 33, vocab=64).to(CUDA)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=0, atol=ATOL)


def test_serving_engine_on_cuda_gives_each_request_its_own_tokens():
    model = jambalab.from_preset("tiny-hybrid").eval().to(CUDA)
    prompts = [_ids(1, n, seed=n)[0].tolist() for n in (9, 40, 3, 23, 17)]
    with stopped_after(chunk_size=16, max_seq_len=256, prefix_cache_bytes=1 << 20) as make:
        engine = make(model, max_batch=4).start()
        handles = [engine.submit(p, SamplingParams(max_tokens=6)) for p in prompts]
        again = engine.submit(prompts[1] + [5, 6], SamplingParams(max_tokens=6))  # a prefix-cache hit
        results = [h.result(60) for h in handles] + [again.result(60)]
    for p, got in zip(prompts + [prompts[1] + [5, 6]], results):
        want = generate(model, torch.tensor([p], device=CUDA), 6, chunk_size=16)[0, len(p):].tolist()
        assert got == want, len(p)


def test_training_on_cuda_learns(tmp_path):
    from jambalab.config import JambaConfig
    from jambalab.train import DataSpec, TrainArgs, Trainer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "m.py").write_text("".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(300)))
    args = TrainArgs(max_steps=40, seq_len=32, batch_size=4, lr=1e-2, warmup_steps=2, val_every=20, val_batches=2,
                     ckpt_every=40, bf16=True)
    cfg = JambaConfig.from_preset("tiny-hybrid", vocab_size=256)
    result = Trainer(cfg, args, DataSpec(source=str(corpus)), tmp_path / "out", log=lambda m: None,
                     device="cuda").run()
    assert result.stop_reason == "max_steps" and result.val_loss < math.log(256) - 1.5, result
    model = jambalab.from_pretrained(result.checkpoint)  # the checkpoint loads on the CPU
    assert next(model.parameters()).device.type == "cpu"


def test_vim_on_cuda_gives_the_cpu_logits():
    from jambalab.vision import from_preset

    model = from_preset("vim-test").eval()
    images = torch.randn(2, 3, model.config.img_size, model.config.img_size,
                         generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(images)
        got = model.to(CUDA)(images.to(CUDA))
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=ATOL)


def test_bench_kernels_runs_on_cuda(capsys):
    """`jambalab bench kernels --device cuda`: every figure measured on the GPU, and its limits there."""
    import json

    from jambalab.cli import main

    assert main(["bench", "kernels", "--quick", "--json", "--device", "cuda"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["machine"]["device"] == torch.cuda.get_device_name()
    assert {r["bench"] for r in res["rows"]} == {"scan", "prefill", "train", "decode"}
    assert all(r["jambalab"] > 0 and (r["transformers"] or 1) > 0 for r in res["rows"])
    assert res["machine"]["gemm_gflops"] > 0 and res["machine"]["read_gbs"] > 0
