"""`jambalab bench kernels`: jambalab against transformers, side by side, on the same random weights.

Legend: B batch, L length, D d_inner, N d_state, d d_model, V vocab, S attended length.

One run measures, at the current thread count:
  machine  fp32 GEMM rate (large torch.mm) and memory read bandwidth (summing 512 MiB)
  scan     the selective scan alone, forward and forward+backward: jambalab.ops.selective_scan
           vs transformers' jamba `mamba_selective_scan` (its (B, D, L) layout) vs our reference
  prefill  tokens/s of one forward over L tokens, batch 1, logits of the last token only
  train    one step (forward + backward + AdamW) at (batch, seq), labels = inputs
  decode   ms/token of greedy decoding after a prompt (HF: its generate with a cache; us: our cache)
for each preset (bench-hybrid and bench-mamba; HF side JambaForCausalLM / MambaForCausalLM, loaded
from the checkpoint our model writes, so both sides hold the same weights).

Every figure is printed as a speedup over transformers and as a % of this machine's limit:
  prefill, train: limit = model FLOPs / GEMM rate (model_flops below, counted from the config)
  decode:         limit = bytes read per token / read bandwidth (decode_bytes below)
Timings are the best of --repeat runs (the least disturbed on a shared machine).

--device cuda runs both sides on the GPU (each timed call ends with a synchronize) and measures the
limits there: the GPU's fp32 GEMM rate and memory bandwidth. jambalab's fast kernels are CPU code, so
on a GPU its ops run their pure-PyTorch reference paths (a scan over time steps, like transformers'
path without mamba_ssm): the figures say what that costs, not what a GPU could do.
"""

from __future__ import annotations

import gc
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from jambalab.bench import machine
from jambalab.config import JambaConfig

PRESETS = ("bench-hybrid", "bench-mamba")
QUICK_PRESETS = ("tiny-hybrid", "tiny-mamba")
# Issue #4's targets: (bench, size, what, threshold).
TARGETS = [
    ("scan", "fwd", "speedup", 50.0),
    ("scan", "fwd+bwd", "speedup", 100.0),
    ("prefill", "bench-hybrid/2048", "speedup", 5.0),
    ("prefill", "bench-hybrid/2048", "pct_of_limit", 60.0),
    ("train", "bench-hybrid", "speedup", 20.0),
    ("train", "bench-mamba", "speedup", 20.0),
    ("decode", "bench-hybrid", "speedup", 2.0),
    ("decode", "bench-hybrid", "pct_of_limit", 50.0),
    ("decode", "bench-mamba", "speedup", 2.0),
    ("decode", "bench-mamba", "pct_of_limit", 50.0),
]


@dataclass
class Plan:
    presets: tuple[str, ...] = PRESETS
    scan_shape: tuple[int, int, int, int] = (1, 2048, 512, 16)  # (B, L, D, N)
    # HF's scan backward indexes one time step at a time, so autograd writes a full
    # (B, D, L, N) gradient per step: quadratic in L (~10 min at L = 2048 on this machine).
    # Its fwd+bwd is timed at this length and scaled linearly to the scan's L, which
    # UNDER-states HF's time at L, so the speedup printed is a lower bound.
    hf_scan_bwd_length: int = 512
    prefill_lengths: tuple[int, ...] = (512, 2048, 8192)
    train_shape: tuple[int, int] = (1, 512)  # (batch, seq)
    decode_prompt: int = 512
    decode_tokens: int = 64
    repeat: int = 3
    gemm_size: int = 2048
    bandwidth_mib: int = 512


QUICK = Plan(presets=QUICK_PRESETS, scan_shape=(1, 64, 64, 8), hf_scan_bwd_length=32, prefill_lengths=(16, 64),
             train_shape=(1, 16), decode_prompt=8, decode_tokens=3, repeat=1, gemm_size=512, bandwidth_mib=64)


@dataclass
class Row:
    """One measured figure. Times are seconds per unit of work (`work` tokens / steps / calls)."""

    bench: str  # scan | prefill | train | decode
    size: str  # e.g. "fwd", "bench-hybrid/2048"
    unit: str  # how the figures are printed: ms, tok/s, ms/tok
    work: float  # tokens (prefill, train, decode) or 1 (scan) per timed call
    jambalab_s: float
    transformers_s: float | None = None
    reference_s: float | None = None
    limit_s: float | None = None  # the physical-limit time for the same work
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def figure(self, seconds: float | None) -> float | None:
        if seconds is None:
            return None
        if self.unit == "tok/s":
            return self.work / seconds
        if self.unit == "ms/tok":
            return seconds / self.work * 1e3
        return seconds * 1e3  # ms per call

    def to_dict(self) -> dict:
        d = asdict(self)
        d["jambalab"] = self.figure(self.jambalab_s)
        d["transformers"] = self.figure(self.transformers_s)
        d["reference"] = self.figure(self.reference_s)
        d["limit"] = self.figure(self.limit_s)
        d["speedup"] = None if self.transformers_s is None else self.transformers_s / self.jambalab_s
        d["speedup_vs_reference"] = None if self.reference_s is None else self.reference_s / self.jambalab_s
        d["pct_of_limit"] = None if self.limit_s is None else 100 * self.limit_s / self.jambalab_s
        return d


# =======================================================================================
# What the machine could do: FLOPs and bytes counted from the config
# =======================================================================================
def matmul_params_per_token(cfg: JambaConfig) -> int:
    """Weights one token multiplies through, excluding the embedding (a lookup) and the lm_head."""
    d, D, N, R = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    total = 0
    for i in range(cfg.n_layers):
        if cfg.is_attention(i):
            total += d * q + 2 * d * kv + q * d
        else:
            total += d * 2 * D + D * (R + 2 * N) + R * D + D * d  # in_proj, x_proj, dt_proj, out_proj
        if cfg.d_ff and cfg.is_moe(i):
            total += d * cfg.n_experts + cfg.top_k * 3 * d * cfg.d_ff  # router + K SwiGLU experts
        elif cfg.d_ff:
            total += 3 * d * cfg.d_ff
    return total


def model_flops(cfg: JambaConfig, new: int, past: int = 0, kept: int = 1) -> float:
    """Forward FLOPs for `new` tokens after `past` cached ones, `kept` of them through the lm_head.

        2 * matmul_params_per_token * new              every weight: one multiply-add per token
      + 2 * d * V * kept                               the lm_head
      + 4 * d * sum_t (past + t + 1) per attention layer  QK^T and AV, causal (H * hd = d)
      + (7 * D * N + 2 * K * D) * new per Mamba layer  scan: exp(dt A), dt B x, h = dA h + ..,
                                                       y = h . C (6 flops + 1 exp per (d, n)); conv
    Norms, activations, softmax and the router's top-k are not counted (they are not matmul work).
    """
    flops = 2.0 * matmul_params_per_token(cfg) * new + 2.0 * cfg.d_model * cfg.vocab_size * kept
    attended = new * past + new * (new + 1) / 2  # sum over new tokens of the keys each sees
    flops += cfg.n_attention_layers * 4.0 * cfg.n_heads * cfg.head_dim * attended
    flops += cfg.n_mamba_layers * (7.0 * cfg.d_inner * cfg.d_state + 2.0 * cfg.d_conv * cfg.d_inner) * new
    return flops


def train_flops(cfg: JambaConfig, batch: int, seq: int) -> float:
    """One training step: forward with logits everywhere, backward = 2x forward (weights and inputs)."""
    return 3.0 * batch * model_flops(cfg, seq, 0, kept=seq)


def decode_bytes(cfg: JambaConfig, past: int, dtype_bytes: int = 4) -> float:
    """Bytes one decode token must read: active weights (lm_head included, one embedding row),
    small Mamba parameters, the SSM and conv states (read and written) and the KV cache."""
    d, D, N, K = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.d_conv
    weights = matmul_params_per_token(cfg) + d * cfg.vocab_size + d
    small = cfg.n_mamba_layers * (D * K + D + D * N + 2 * D + cfg.dt_rank + 2 * N)  # conv w/b, A, D, dt bias, norms
    norms = (2 * cfg.n_layers + 1) * d
    state = cfg.n_mamba_layers * 2 * (D * N * 4 + D * K * dtype_bytes)  # read + write, SSM state fp32
    kv = cfg.n_attention_layers * 2 * cfg.n_kv_heads * cfg.head_dim * (past + 1)
    return (weights + small + norms + kv) * dtype_bytes + state


# =======================================================================================
# Models on both sides
# =======================================================================================
def build_pair(preset: str, seed: int = 0, with_hf: bool = True, device: torch.device | str = "cpu"):
    """Our model and (if transformers is installed) HF's, with the same random weights, on `device`."""
    from jambalab.model import JambaLM

    cfg = JambaConfig.from_preset(preset)
    ours = JambaLM.from_config(cfg, seed=seed).eval()
    if not with_hf:
        return cfg, ours.to(device), None
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    return cfg, ours.to(device), hf.to(device)


def have_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Loading weights" bars would interleave with ours


# =======================================================================================
# The scan alone
# =======================================================================================
def scan_inputs(shape: tuple[int, int, int, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random scan inputs in our (B, L, D) layout; dt in Mamba's usual range (softplus of ~N(-4, 1))."""
    bsz, length, d_inner, d_state = shape
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(bsz, length, d_inner, generator=g),
        "dt": F.softplus(torch.randn(bsz, length, d_inner, generator=g) - 4.0),
        "A": -torch.arange(1, d_state + 1, dtype=torch.float32).expand(d_inner, d_state).contiguous(),
        "B": torch.randn(bsz, length, d_state, generator=g),
        "C": torch.randn(bsz, length, d_state, generator=g),
        "D": torch.ones(d_inner),
        "z": torch.randn(bsz, length, d_inner, generator=g),
    }


def _leaves(inputs: dict[str, torch.Tensor], grad: bool) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().requires_grad_(grad) for k, v in inputs.items()}


def scan_callable(impl: str, inputs: dict[str, torch.Tensor], backward: bool) -> Callable[[], None]:
    """A no-argument function running one scan (and its backward) with implementation `impl`."""
    from jambalab import ops

    if impl == "hf":
        from transformers.models.jamba.modeling_jamba import mamba_selective_scan

        # HF's layout: x, dt, z (B, D, L); B, C (B, N, L). Transposed once, outside the timing.
        t = {k: (v.transpose(1, 2).contiguous() if v.dim() == 3 else v) for k, v in inputs.items()}
        leaves = _leaves(t, backward)

        def run_hf():
            p = leaves
            return mamba_selective_scan(p["x"], p["dt"], p["A"], p["B"], p["C"], D=p["D"], z=p["z"])

        fn = run_hf
    else:
        scan = ops.selective_scan if impl == "jambalab" else ops.selective_scan_ref
        leaves = _leaves(inputs, backward)

        def run_ours():
            p = leaves
            return scan(p["x"], p["dt"], p["A"], p["B"], p["C"], p["D"], p["z"])[0]

        fn = run_ours
    if not backward:
        return lambda: _no_grad(fn)
    gy = torch.randn_like(fn().detach())

    def fwd_bwd():
        for v in leaves.values():
            v.grad = None
        fn().backward(gy)

    return fwd_bwd


def _no_grad(fn: Callable[[], object]) -> object:
    with torch.inference_mode():
        return fn()


def _on(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in inputs.items()}


def bench_scan(plan: Plan, hf: bool, step: Callable[[str], None], device: torch.device) -> list[Row]:
    bsz, length, d_inner, d_state = plan.scan_shape
    inputs = _on(scan_inputs(plan.scan_shape), device)
    rows = []
    for backward, name in ((False, "fwd"), (True, "fwd+bwd")):
        step(f"scan {name} jambalab")
        fn = machine.synced(scan_callable("jambalab", inputs, backward), device)
        ours = machine.best_time(fn, plan.repeat, min_time=0.05)
        step(f"scan {name} reference")
        ref = machine.best_time(machine.synced(scan_callable("ref", inputs, backward), device), plan.repeat)
        theirs, notes = None, ""
        if hf:
            step(f"scan {name} transformers")
            hf_len = min(plan.hf_scan_bwd_length, length) if backward else length
            hf_inputs = inputs if hf_len == length else _on(scan_inputs((bsz, hf_len, d_inner, d_state)), device)
            fn = machine.synced(scan_callable("hf", hf_inputs, backward), device)
            theirs = _slow_best(fn, plan.repeat) * length / hf_len
            if hf_len != length:
                notes = f"HF timed at L={hf_len}, scaled x{length // hf_len} (its backward is quadratic in L: a lower bound)"
        updates = bsz * length * d_inner * d_state
        rows.append(Row("scan", name, "ms", 1, ours, theirs, ref, notes=notes,
                        extra={"shape_BLDN": list(plan.scan_shape), "g_updates_per_s": updates / ours / 1e9}))
    return rows


def _slow_best(fn: Callable[[], object], repeat: int, slow_s: float = 5.0, very_slow_s: float = 20.0) -> float:
    """best_time for calls that may take many seconds (transformers' scan backward, its training step).

    The first call is timed too: past slow_s it counts as a sample and at most one more run is
    made; past very_slow_s it is the only one (a second run would change the ratio by a few %).
    """
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if first > very_slow_s:
        return first
    if first > slow_s:
        return min([first] + [machine.best_time(fn, 1, warmup=0) for _ in range(min(repeat, 2) - 1)])
    return machine.best_time(fn, repeat, warmup=0)


# =======================================================================================
# Whole models: prefill, decode, train
# =======================================================================================
def _ids(cfg: JambaConfig, batch: int, length: int, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, cfg.vocab_size, (batch, length), generator=g).to(device)


def prefill_callable(model, ids: torch.Tensor, hf: bool) -> Callable[[], torch.Tensor]:
    def run():
        with torch.inference_mode():
            if hf:
                return model(input_ids=ids, logits_to_keep=1, use_cache=False).logits
            return model(ids, logits_to_keep=1).logits

    return run


def our_decode_seconds(model, prompt: torch.Tensor, n: int) -> tuple[float, torch.Tensor]:
    """Greedy: prefill the prompt into a cache, then time n one-token steps. (s/token, tokens)."""
    cache = model.allocate_cache(prompt.shape[0], prompt.shape[1] + n + 1)
    sync = machine.synced(lambda: None, prompt.device)
    with torch.inference_mode():
        tok = model(prompt, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        out = [tok]
        sync()
        start = time.perf_counter()
        for _ in range(n):
            tok = model(tok, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
            out.append(tok)
        sync()
        return (time.perf_counter() - start) / n, torch.cat(out, 1)


def hf_decode_seconds(model, prompt: torch.Tensor, n: int) -> tuple[float, torch.Tensor]:
    """Greedy HF generate with its cache; per-token time from a streamer's timestamps (prefill excluded)."""
    from transformers.generation.streamers import BaseStreamer

    sync = machine.synced(lambda: None, prompt.device)

    class Clock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            sync()
            self.times.append(time.perf_counter())

        def end(self):
            pass

    clock = Clock()
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n + 1,
                             min_new_tokens=n + 1, do_sample=False, use_cache=True, streamer=clock,
                             pad_token_id=0)
    # put() is called once with the prompt, then once per new token: n + 1 new tokens, n intervals.
    new_times = clock.times[1:]
    return (new_times[-1] - new_times[0]) / n, out[:, prompt.shape[1]:]


def _best_decode(fn, model, prompt: torch.Tensor, n: int, repeat: int) -> tuple[float, torch.Tensor]:
    best, tokens = float("inf"), None
    for _ in range(max(1, repeat)):
        seconds, tokens = fn(model, prompt, n)
        best = min(best, seconds)
    return best, tokens


def train_step_callable(model, ids: torch.Tensor, hf: bool) -> Callable[[], None]:
    model.train()
    # Same optimizer on both sides: torch's fused AdamW (CPU or CUDA, as the model is).
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step():
        # ours: the trainer's call, the loss only (lm_head + loss in row chunks, no (B, L, V) logits held)
        out = model(input_ids=ids, labels=ids, use_cache=False) if hf else model(ids, labels=ids, return_logits=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_model(preset: str, plan: Plan, limits: dict, with_hf: bool, step: Callable[[str], None],
                device: torch.device) -> list[Row]:
    cfg, ours, hf = build_pair(preset, with_hf=with_hf, device=device)
    rows = []
    # Same weights, same answer: the largest gap between the two sides' last-token logits.
    ids = _ids(cfg, 1, plan.prefill_lengths[0], device=device)
    if hf is not None:
        diff = (prefill_callable(ours, ids, False)() - prefill_callable(hf, ids, True)()).abs().max().item()
    for length in plan.prefill_lengths:
        ids = _ids(cfg, 1, length, device=device)
        step(f"{preset} prefill {length} jambalab")
        t_ours = machine.best_time(machine.synced(prefill_callable(ours, ids, False), device), plan.repeat)
        t_hf = None
        if hf is not None:
            step(f"{preset} prefill {length} transformers")
            t_hf = _slow_best(machine.synced(prefill_callable(hf, ids, True), device), plan.repeat)
        limit = model_flops(cfg, length, 0, kept=1) / (limits["gemm_gflops"] * 1e9)
        rows.append(Row("prefill", f"{preset}/{length}", "tok/s", length, t_ours, t_hf, limit_s=limit,
                        extra={"flops": model_flops(cfg, length, 0, kept=1),
                               **({"max_abs_logit_diff_vs_hf": diff} if hf is not None else {})}))
        gc.collect()

    prompt = _ids(cfg, 1, plan.decode_prompt, seed=1, device=device)
    n = plan.decode_tokens
    step(f"{preset} decode jambalab")
    t_ours, toks_ours = _best_decode(our_decode_seconds, ours, prompt, n, plan.repeat)
    extra = {"prompt": plan.decode_prompt, "new_tokens": n, "bytes_per_token": decode_bytes(cfg, plan.decode_prompt)}
    t_hf = None
    if hf is not None:
        step(f"{preset} decode transformers")
        t_hf, toks_hf = _best_decode(hf_decode_seconds, hf, prompt, n, plan.repeat)
        m = min(toks_ours.shape[1], toks_hf.shape[1])
        # Informative only: random weights give near-flat logits, where 1e-6 can flip an argmax.
        extra["greedy_tokens_equal_hf"] = bool(torch.equal(toks_ours[:, :m], toks_hf[:, :m]))
    limit = decode_bytes(cfg, plan.decode_prompt) / (limits["read_gbs"] * 1e9)
    rows.append(Row("decode", preset, "ms/tok", 1, t_ours, t_hf, limit_s=limit, extra=extra))

    batch, seq = plan.train_shape
    ids = _ids(cfg, batch, seq, device=device)
    flops = train_flops(cfg, batch, seq)
    step(f"{preset} train jambalab")
    t_ours = machine.best_time(machine.synced(train_step_callable(ours, ids, False), device), plan.repeat)
    t_hf = None
    if hf is not None:
        step(f"{preset} train transformers")
        t_hf = _slow_best(machine.synced(train_step_callable(hf, ids, True), device), plan.repeat)
    rows.append(Row("train", preset, "tok/s", batch * seq, t_ours, t_hf,
                    limit_s=flops / (limits["gemm_gflops"] * 1e9),
                    extra={"batch": batch, "seq": seq, "flops": flops, "optimizer": "AdamW(fused=True)"}))
    del ours, hf
    gc.collect()
    return rows


# =======================================================================================
# Driver, table, targets, plot
# =======================================================================================
def run(plan: Plan, threads: int | None = None, with_hf: bool | None = None, progress: bool = True,
        device: torch.device | str = "cpu") -> dict:
    """Measure everything in `plan` on `device`; returns the JSON-ready results (machine, plan, rows, targets)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        from jambalab.errors import InputError

        raise InputError("--device cuda: this torch build or machine has no CUDA device")
    if device.type not in ("cpu", "cuda"):
        from jambalab.errors import InputError

        raise InputError(f"--device must be cpu or cuda, got {device}")
    if with_hf is None:
        with_hf = have_transformers()
    if with_hf:
        _quiet_transformers()
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        info = machine.machine_info(device)  # load average before our own work adds to it
        info["load_1min_end"] = None
        limits, rows = _measure(plan, with_hf, progress, device)
        info["load_1min_end"] = machine.load_average()
    finally:
        torch.set_num_threads(previous)
    info.update(limits)
    results = {"machine": info, "plan": asdict(plan), "transformers_compared": with_hf,
               "rows": [r.to_dict() for r in rows]}
    results["targets"] = check_targets(results["rows"]) if with_hf else []
    return results


def _measure(plan: Plan, with_hf: bool, progress: bool, device: torch.device) -> tuple[dict, list[Row]]:
    from tqdm import tqdm

    per_model = (2 if with_hf else 1) * (len(plan.prefill_lengths) + 2)
    total = 2 + (6 if with_hf else 4) + per_model * len(plan.presets)
    with warnings.catch_warnings(), tqdm(total=total, desc="bench kernels", unit="step", disable=not progress) as bar:
        warnings.simplefilter("ignore")  # transformers' generation-config and fallback notices
        started = [False]

        def step(label: str) -> None:
            if started[0]:
                bar.update(1)
            started[0] = True
            bar.set_postfix_str(label)

        step("GEMM rate")
        repeat = max(3, plan.repeat)
        limits = {"gemm_gflops": machine.gemm_gflops(plan.gemm_size, repeat=repeat, device=device)}
        step("memory bandwidth")
        limits["read_gbs"] = machine.read_bandwidth_gbs(plan.bandwidth_mib, repeat=repeat, device=device)
        limits["copy_gbs"] = machine.copy_bandwidth_gbs(plan.bandwidth_mib, repeat=repeat, device=device)
        rows = bench_scan(plan, with_hf, step, device)
        for preset in plan.presets:
            rows += bench_model(preset, plan, limits, with_hf, step, device)
        bar.update(1)
    return limits, rows


def check_targets(rows: list[dict]) -> list[dict]:
    out = []
    for bench, size, what, threshold in TARGETS:
        row = next((r for r in rows if r["bench"] == bench and r["size"] == size), None)
        if row is None or row[what] is None:
            continue
        unit = "x transformers" if what == "speedup" else "% of limit"
        out.append({"target": f"{bench} {size}: >= {threshold:g}{' ' if what == 'speedup' else ''}{unit}",
                    "measured": row[what], "met": row[what] >= threshold})
    return out


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _load(m: dict) -> str:
    start, end = m.get("load_1min"), m.get("load_1min_end")
    if start is None:
        return "unknown"
    return f"{start:.2f}" if end is None else f"{start:.2f} (start) / {end:.2f} (end)"


def table(results: dict) -> str:
    head = ["bench", "size", "unit", "jambalab", "transformers", "x HF", "reference", "x ref", "limit", "% limit"]
    lines = [head]
    for r in results["rows"]:
        lines.append([r["bench"], r["size"], r["unit"], _fmt(r["jambalab"]), _fmt(r["transformers"]),
                      "-" if r["speedup"] is None else f"{r['speedup']:.1f}x", _fmt(r["reference"]),
                      "-" if r["speedup_vs_reference"] is None else f"{r['speedup_vs_reference']:.1f}x",
                      _fmt(r["limit"]), "-" if r["pct_of_limit"] is None else f"{r['pct_of_limit']:.0f}%"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
            for line in lines]
    text.insert(1, "-" * len(text[0]))
    m = results["machine"]
    text.append("")
    where = f"{m['cpu']}, {m['threads']} threads" if m.get("device", "cpu") == "cpu" else f"GPU {m['device']} (host {m['cpu']})"
    text.append(f"machine: {where}, load {_load(m)}; fp32 GEMM "
                f"{m['gemm_gflops']:.0f} GFLOP/s, read {m['read_gbs']:.1f} GB/s, copy {m['copy_gbs']:.1f} GB/s; "
                f"huge pages {m.get('huge_pages', 'unknown')}")
    text.append("limit: prefill/train = model FLOPs / GEMM rate; decode = bytes per token / read bandwidth")
    for r in results["rows"]:
        if r["notes"]:
            text.append(f"note ({r['bench']} {r['size']}): {r['notes']}")
    for t in results["targets"]:
        text.append(f"target {t['target']}: {t['measured']:.1f} {'MET' if t['met'] else 'MISSED'}")
    return "\n".join(text)


def plot(results: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    labels = [f"{r['bench']} {r['size']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.5), sharey=True)
    speed = [r["speedup"] or 0 for r in rows]
    axes[0].barh(labels, speed, color="tab:blue")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("speedup over transformers (x, log)")
    axes[0].axvline(1, color="grey", lw=0.8)
    axes[1].barh(labels, [r["pct_of_limit"] or 0 for r in rows], color="tab:green")
    axes[1].set_xlabel("% of this machine's limit (GEMM rate or read bandwidth)")
    axes[1].set_xlim(0, 100)
    axes[0].invert_yaxis()
    m = results["machine"]
    where = f"{m['cpu']}, {m['threads']} threads" if m.get("device", "cpu") == "cpu" else f"GPU {m['device']}"
    fig.suptitle(f"jambalab vs transformers: {where}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# =======================================================================================
# Command line: `jambalab bench kernels` (registered in jambalab/commands/bench.py)
# =======================================================================================
def add_parser(group) -> None:
    p = group.add_parser("kernels", help="jambalab vs transformers: scan, prefill, train step, decode (+ %% of limits)",
                         description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny presets and sizes, one repeat (tests, smoke runs)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: speedups and %% of limit")
    p.add_argument("--repeat", type=int, help="timed runs per figure, best kept (default 3; 1 with --quick)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, = the cores)")
    p.add_argument("--presets", help=f"comma-separated presets (default {','.join(PRESETS)})")
    p.add_argument("--no-transformers", action="store_true", help="jambalab figures only")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where both sides run (default cpu); the limits are measured there")
    p.set_defaults(func=main)


def main(args) -> int:
    import json
    from dataclasses import replace

    from jambalab.errors import InputError

    plan = QUICK if args.quick else Plan()
    if args.repeat is not None:
        if args.repeat < 1:
            raise InputError(f"--repeat must be >= 1, got {args.repeat}")
        plan = replace(plan, repeat=args.repeat)
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be >= 1, got {args.threads}")
    if args.presets:
        names = tuple(s.strip() for s in args.presets.split(",") if s.strip())
        for name in names:
            JambaConfig.from_preset(name)  # an unknown preset fails before any run
        plan = replace(plan, presets=names)
    with_hf = have_transformers() and not args.no_transformers
    results = run(plan, threads=args.threads, with_hf=with_hf, device=args.device)
    if args.plot:
        plot(results, args.plot)
        results["plot"] = str(args.plot)
    print(json.dumps(results, indent=1) if args.json else table(results))
    return 0
