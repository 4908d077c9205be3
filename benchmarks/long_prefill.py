"""Long-prompt prefill in chunks: peak memory and speed at 16K, 64K and 256K tokens.

    python benchmarks/long_prefill.py                       # bench-hybrid and bench-mamba, 16K/64K/256K
    python benchmarks/long_prefill.py --lengths 16384 --presets bench-mamba --chunk-size 4096

Each (preset, length) runs in a fresh child process, so peak resident memory is that run's
own. The child builds the model (random weights, fp32), allocates the cache for the whole
prompt, warms the kernels up, records its resident memory (the baseline) and resets the
kernel's high-water mark (/proc/self/clear_refs), then prefills the prompt in chunks with
logits_to_keep=1. It reports wall and CPU seconds (with one thread the CPU time is the steadier
figure on a shared machine), the load average, the peak resident memory during the prefill and
the growth over the baseline: for a pure Mamba model the growth is one chunk's activations, whatever the
length; a hybrid adds only its attention layers' KV cache (already in the baseline here, since
it is allocated up front) and the attention's per-chunk scratch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MIB = 2 ** 20
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`


# ---------------------------------------------------------------------------------------
# Child: one measurement
# ---------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def measure(preset: str, tokens: int, chunk: int, threads: int) -> dict:
    import torch

    import jambalab
    import jambalab.ops as ops
    from jambalab.generate import prefill

    torch.set_num_threads(threads)
    model = jambalab.from_preset(preset, seed=0).eval()
    ids = torch.randint(3, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    prefill(model, ids[:, :2 * min(chunk, tokens)], model.allocate_cache(1), chunk_size=chunk)  # warm up
    cache = model.allocate_cache(1, max_length=tokens)
    cache_bytes_allocated = sum(t.numel() * t.element_size() for s in cache.layers for t in vars(s).values())
    base_kib = _status_kib("VmRSS")
    reset = _reset_peak()
    from tqdm import tqdm

    bar = tqdm(total=tokens, unit="tok", unit_scale=True, desc=f"{preset} {tokens}", file=sys.stderr,
               mininterval=5.0)
    t0, c0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    logits = prefill(model, ids, cache, chunk_size=chunk, progress=bar.update)
    bar.close()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    peak_kib = _status_kib("VmHWM")
    assert torch.isfinite(logits).all()
    return {"preset": preset, "tokens": tokens, "chunk": chunk, "threads": threads, "seconds": seconds,
            "tok_per_s": tokens / seconds, "cpu_seconds": cpu_seconds,
            "load": max(load0, os.getloadavg()[0]), "base_rss": base_kib * 1024, "peak_rss": peak_kib * 1024,
            "peak_reset": reset, "kv_bytes": cache.kv_bytes(), "state_bytes": cache.state_bytes(),
            "cache_allocated": cache_bytes_allocated, "scan": f"{ops.selective_scan.__module__}.{ops.selective_scan.__name__}"}


# ---------------------------------------------------------------------------------------
# Parent: the table
# ---------------------------------------------------------------------------------------
def run_child(preset: str, tokens: int, chunk: int, threads: int, timeout: float, mmap_threshold: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", preset, str(tokens), str(chunk), str(threads)]
    env = dict(os.environ)
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    # The child's stderr (its progress bar, or a traceback) goes straight to ours.
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, cwd=ROOT, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"child {preset} {tokens} failed with exit code {r.returncode} (its stderr is above)")
    return json.loads(r.stdout.strip().splitlines()[-1])


HEADER = (f"{'preset':<13} {'tokens':>7} {'chunk':>6} {'time s':>8} {'tok/s':>8} {'CPU s':>8} {'load':>5} {'base MiB':>9} "
          f"{'peak MiB':>9} {'growth MiB':>10} {'KV MiB':>7} {'state MiB':>9}")


def row(r: dict) -> str:
    growth = (r["peak_rss"] - r["base_rss"]) / MIB
    return (f"{r['preset']:<13} {r['tokens']:>7} {r['chunk']:>6} {r['seconds']:>8.1f} {r['tok_per_s']:>8.0f} "
            f"{r['cpu_seconds']:>8.1f} {r['load']:>5.1f} "
            f"{r['base_rss'] / MIB:>9.0f} {r['peak_rss'] / MIB:>9.0f} {growth:>10.0f} "
            f"{r['kv_bytes'] / MIB:>7.1f} {r['state_bytes'] / MIB:>9.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["bench-mamba", "bench-hybrid"])
    p.add_argument("--lengths", nargs="+", type=int, default=[16384, 65536, 262144])
    p.add_argument("--chunk-size", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine, idle-spinning OpenMP threads distort timings)")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per child run")
    p.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="set glibc's MALLOC_MMAP_THRESHOLD_ in the children: a fixed threshold returns large "
                        "transient buffers to the OS at once, so peak RSS shows the tensors, not heap retention")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--child", nargs=4, metavar=("PRESET", "TOKENS", "CHUNK", "THREADS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        preset, tokens, chunk, threads = args.child
        print(json.dumps(measure(preset, int(tokens), int(chunk), int(threads))))
        return 0
    rows = []
    print(HEADER, flush=True)
    for preset in args.presets:
        for tokens in args.lengths:
            rows.append(run_child(preset, tokens, args.chunk_size, args.threads, args.timeout, args.mmap_threshold))
            print(row(rows[-1]), flush=True)
    print(f"scan kernel: {rows[0]['scan']}; peak reset via /proc/self/clear_refs: {rows[0]['peak_reset']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
