"""One measurement in a fresh process, so that runs cannot pollute each other's peak memory.

run_in_child(spec) runs, in a new interpreter,

    python -m jambalab.bench.probe '{"preset": "curves-hybrid", "batch": 4, "context": 1024, "decode": 16}'

which prints one JSON line (a ProbeResult). The child builds the model, allocates the cache for the
whole run (so the KV cache is resident before the baseline is taken), warms the
kernels up, records its resident memory, resets the kernel's peak counter
(/proc/self/clear_refs; read back as VmHWM, see peak_bytes), then prefills
the context in chunks with logits_to_keep=1 and decodes one token per step.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

_PAGE = 4096


@dataclass
class ProbeSpec:
    preset: str
    batch: int = 1
    context: int = 128  # prompt tokens, prefilled in chunks
    chunk: int = 2048  # prefill chunk (tokens per forward call); 0 = the whole prompt at once
    decode: int = 8  # tokens generated after the prompt, one per forward call
    dtype: str = "fp32"
    threads: int = 2
    trace: bool = False  # record time, resident memory and cache bytes after every decode step
    seed: int = 0


@dataclass
class ProbeResult:
    spec: dict
    runtime_bytes: int  # resident after importing torch and jambalab, before the model: the runtime's share
    baseline_bytes: int  # resident after model + cache + warm-up: runtime, weights, preallocated KV, state
    prefill_peak_bytes: int  # peak resident during the prefill
    peak_bytes: int  # peak resident over the whole measured run (VmHWM after the reset)
    prefill_s: float
    decode_s: float  # wall time of all decode steps
    cache_bytes: int  # bytes the cache holds for the positions seen, at the end
    step_s: list[float] = field(default_factory=list)  # per decode step (trace only)
    step_rss: list[int] = field(default_factory=list)
    step_cache_bytes: list[int] = field(default_factory=list)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int:
    """Peak resident bytes of this process since start or the last reset_peak().

    VmHWM, not getrusage's ru_maxrss: at exec, Linux folds the forked copy of the PARENT's
    resident size into the child's ru_maxrss (signal->maxrss), and clear_refs cannot reset that, so
    a child of a 400 MB parent "peaked" at 400 MB. VmHWM is this process's own high-water mark.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_probe(spec: ProbeSpec) -> ProbeResult:
    import torch

    from jambalab.config import JambaConfig
    from jambalab.model import JambaLM

    torch.set_num_threads(spec.threads)
    runtime = rss_bytes()
    cfg = JambaConfig.from_preset(spec.preset)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec.dtype]
    model = JambaLM.from_config(cfg, seed=spec.seed, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(spec.seed)
    ids = torch.randint(3, cfg.vocab_size, (spec.batch, spec.context), generator=gen)
    with torch.no_grad():
        _warm_up(model, spec.batch, min(spec.chunk or spec.context, spec.context))
        if spec.trace:  # grow the cache as a generation loop that does not know N would: memory shows growth
            cache = model.allocate_cache(spec.batch)
        else:
            cache = model.allocate_cache(spec.batch, max_length=spec.context + spec.decode)
            _touch(cache)
        baseline = rss_bytes()
        reset_peak()
        t0 = time.perf_counter()
        logits = _prefill(model, ids, cache, spec.chunk)
        prefill_s = time.perf_counter() - t0
        prefill_peak = peak_bytes()
        result = ProbeResult(spec=asdict(spec), runtime_bytes=runtime, baseline_bytes=baseline,
                             prefill_peak_bytes=prefill_peak, peak_bytes=0, prefill_s=prefill_s, decode_s=0.0,
                             cache_bytes=0)
        result.decode_s = _decode(model, logits, cache, spec.decode, result if spec.trace else None)
    result.peak_bytes = peak_bytes()
    result.cache_bytes = cache.nbytes()
    return result


def _warm_up(model, batch: int, chunk: int) -> None:
    """One full-size chunk, a continuation chunk and a decode step through a throwaway cache.

    Runs every code path of the measured run once, so that the library code pages it faults in
    (which count as resident memory, and how many depends on the page cache) are in before the
    baseline; with an 8-token warm-up the measured activation peak varied 2-4x between runs.
    """
    import torch

    cache = model.allocate_cache(batch)
    model(torch.full((batch, chunk), 3), cache=cache, logits_to_keep=1)
    logits = model(torch.full((batch, 8), 3), cache=cache, logits_to_keep=1).logits
    model(logits[:, -1].argmax(-1, keepdim=True), cache=cache)


def _touch(cache) -> None:
    # Preallocated K/V pages may be untouched (lazily mapped zeros); make them resident now, so the
    # baseline already holds the whole cache and peaks above it are activations only.
    for st in cache.layers:
        for t in vars(st).values():
            t.fill_(0)


def _prefill(model, ids, cache, chunk: int):
    step = chunk if chunk > 0 else ids.shape[1]
    logits = None
    for s in range(0, ids.shape[1], step):
        logits = model(ids[:, s:s + step], cache=cache, logits_to_keep=1).logits  # (B, 1, V)
    return logits


def _decode(model, logits, cache, steps: int, trace: ProbeResult | None) -> float:
    total = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1) greedy
        logits = model(nxt, cache=cache).logits
        dt = time.perf_counter() - t0
        total += dt
        if trace is not None:
            trace.step_s.append(dt)
            trace.step_rss.append(rss_bytes())
            trace.step_cache_bytes.append(cache.nbytes())
    return total


# ---- the parent's side ------------------------------------------------------------------
def run_in_child(spec: dict, timeout_s: int, module: str = "jambalab.bench.probe") -> dict:
    """Run `python -m module SPEC_JSON` (default this probe) in a fresh interpreter; returns the JSON
    object of its last output line, or {'error': ...}."""
    # A fixed mmap threshold makes glibc map every allocation >= 128 KiB on its own and unmap it on
    # free, so resident memory follows the live tensors. With the default (dynamic) threshold, freed
    # blocks stay cached in the heap and the same run's peak above baseline varied 2x between runs.
    env = {"MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072")}
    return run_module_json(module, [json.dumps(spec)], timeout_s, env)


def run_module_json(module: str, args: list[str], timeout_s: int, env: dict[str, str] | None = None) -> dict:
    """`python -m module *args` in a fresh interpreter importing this same jambalab (installed or
    not); returns the JSON object on its last stdout line, or {'error': ...}."""
    root = str(Path(__file__).resolve().parents[2])
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
                    **(env or {}))
    try:
        done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                              timeout=timeout_s, env=full_env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s} s"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = ProbeSpec(**json.loads(argv[0]))
    print(json.dumps(asdict(run_probe(spec))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
