"""Build and load the fused CPU kernels (jambalab/ops/csrc/*.cpp), once per machine.

The library is compiled just in time with torch.utils.cpp_extension (ninja +
the system C++ compiler, `-O3 -march=native -fopenmp`) into

    $XDG_CACHE_HOME/jambalab/torch_extensions/<key>/    (default ~/.cache/...)

where <key> hashes the sources, the compile flags, the torch and Python
versions and this CPU's model and feature flags: a `-march=native` binary is
never reused on another CPU, and a cached one loads without ninja or a compiler.
JAMBALAB_MARCH=<name> compiles for that -march instead (x86-64-v3: AVX2 and FMA,
no AVX-512), to run and measure on this CPU what a lesser one would run.
Its ops live in `torch.ops.jambalab_kernels` (scan_fwd, scan_bwd,
state_update, conv_update, conv_fwd, conv_bwd, dt_softplus_fwd/bwd, gemv, rms_norm, mamba_decode, mlp_decode,
moe_decode, decode_step, bf16dot_native, aten_threads, ce_fwd, ce_bwd, ce_bwd_, decode_attention, wgemv, wgemv_a8, wgemm_a8, wgemm_a8_available, act_round,
a8_native, dequant); jambalab/ops/fused.py
and jambalab/ops/lowp.py wrap them.

`kernels()` tries once per process. If the build fails it warns once and
returns None, and the callers use the pure-PyTorch references. A build killed
with SIGKILL can leave build_dir/lock behind; torch then waits on it: delete it.

Legend (the fake kernels): B batch, L length, D d_inner, N d_state, T chunk_size.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import re
import shutil
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_LIB = "jambalab_kernels"  # the TORCH_LIBRARY namespace in the sources

_state: dict[str, Any] = {"tried": False, "ops": None, "error": None, "wgemm_a8": False}
_lock = threading.Lock()  # a second thread's first call waits for the build instead of skipping it


class KernelBuildError(RuntimeError):
    """The fused kernels could not be compiled or loaded on this machine."""


def kernels() -> Any | None:
    """torch.ops.jambalab_kernels, building it on first call; None (after one warning) if that fails."""
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                _try_load()
    return _state["ops"]


TESTED_TORCH = "2.13.0"  # pyproject.toml pins it: its cpp_extension compiles C++20, which the kernels use


def torch_version_note(version: str) -> str:
    """A sentence for the build-failure warning when torch is not the version the kernels are tested with
    (torch 2.11's cpp_extension compiles C++17, and the kernels then fail on std::bit_cast); else ""."""
    if version.split("+")[0] == TESTED_TORCH:
        return ""
    return (f"The kernels are built and tested with torch {TESTED_TORCH} (pinned in jambalab's requirements), "
            f"whose extensions compile as C++20; this is torch {version}. ")


def has_wgemm_a8() -> bool:
    """Whether the kernels have wgemm_a8, the int8-activation prefill GEMM (AVX512-VNNI or AVX2). A plain bool read
    once at load, so torch.compile folds it (the op itself returns a non-tensor, which dynamo cannot trace)."""
    return kernels() is not None and _state["wgemm_a8"]


@torch.compiler.disable  # the build is file and subprocess work: never traced, even on a first call under compile
def _try_load() -> None:
    try:
        _state["ops"] = load_extension()
        _state["wgemm_a8"] = bool(_state["ops"].wgemm_a8_available())
        _register_fakes()
    except KernelBuildError as err:
        _state["error"] = err
        warnings.warn(
            f"jambalab: fused CPU kernels unavailable, using the slow pure-PyTorch reference ({err}). "
            f"{torch_version_note(torch.__version__)}Set JAMBALAB_KERNELS=ref to choose it explicitly.",
            RuntimeWarning,
            stacklevel=5,  # _try_load <- kernels() <- fused helper <- fused op <- the caller
        )
    _state["tried"] = True


def _register_fakes() -> None:
    """Shape-only twins of the ops, so that torch.compile (FakeTensor tracing) can see through them."""

    def scan_fwd(x, dt, A, B, C, D, z, h0, chunk, save_ckpt):
        bsz, length, d_inner = x.shape
        d_state, n_ckpt = A.shape[1], (length + chunk - 1) // chunk
        state = A.new_empty(bsz, d_inner, d_state)  # h_last (B, D, N); checkpoints (B, L/T, D, N)
        return x.new_empty(x.shape), state, A.new_empty(bsz if save_ckpt else 0, n_ckpt, d_inner, d_state)

    def scan_bwd(x, dt, A, B, C, D, z, ckpt, dy, dh_last, chunk):
        bsz, length, d_inner = x.shape
        d_state = A.shape[1]
        return (
            x.new_empty(x.shape),
            x.new_empty(x.shape),
            A.new_empty(A.shape),
            A.new_empty(bsz, length, d_state),
            A.new_empty(bsz, length, d_state),
            A.new_empty(d_inner),
            x.new_empty(bsz if z is not None else 0, length, d_inner),
            A.new_empty(bsz, d_inner, d_state),
        )

    def state_update(h, x, dt, A, B, C, D, z):
        return x.new_empty(h.shape[:2])

    def conv_update(x, conv_state, weight, bias):
        return x.new_empty(conv_state.shape[:2])

    def conv_fwd(x, weight, bias, conv_state):
        return x.new_empty(x.shape)

    def conv_bwd(x, weight, bias, conv_state, dout):
        return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])

    def dt_softplus_fwd(dt, bias):
        return dt.new_empty(dt.shape)

    def dt_softplus_bwd(dt, bias, dout):
        return dt.new_empty(dt.shape)

    def gemv(x, weight, bias):
        return x.new_empty(x.shape[0], weight.shape[0])

    def rms_norm(x, weight, eps):
        return x.new_empty(x.shape, dtype=x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype))

    def mamba_decode(x, in_w, in_b, conv_state, conv_w, conv_b, x_proj_w, inner_norm, dt_norm_w, b_norm_w, c_norm_w,
                     norm_eps, dt_proj_w, dt_proj_b, A, D, ssm_state, out_w, out_b):
        return x.new_empty(x.shape[0], out_w.shape[0])

    def mlp_decode(x, w_gate, w_up, w_down):
        return x.new_empty(x.shape[0], w_down.shape[0])

    def moe_decode(x, router_w, w_gate, w_up, w_down, top_k):
        return x.new_empty(x.shape[0], w_down.shape[1]), x.new_empty(x.shape[0], router_w.shape[0])

    def decode_step(ids, weights, scales, states, meta, past, eps):
        return weights[0].new_empty(ids.shape[0], weights[2].shape[0])

    def ce_fwd(logits, target, ignore_index):
        return (logits.new_empty((), dtype=torch.float64), logits.new_empty(logits.shape[0]),
                logits.new_empty((), dtype=torch.long))

    def ce_bwd(logits, target, lse, ignore_index, scale):
        return logits.new_empty(logits.shape)

    def ce_bwd_(logits, target, lse, ignore_index, scale):
        return logits

    def decode_attention(q, k, v):
        return q.new_empty(q.shape)

    def wgemv(x, weight, scales, group_size, bias):
        return x.new_empty(x.shape[0], weight.shape[0])

    def wgemv_a8(x, weight, scales, group_size, bias):
        return x.new_empty(x.shape[0], weight.shape[0])

    def wgemm_a8(x, weight, scales, group_size, bias):
        return x.new_empty(x.shape[0], weight.shape[0])

    def act_round(x, dtype):
        return x.new_empty(x.shape, dtype=dtype)

    def dequant(weight, scales, group_size, lo, hi, dtype):
        k = weight.shape[1] * (2 if weight.dtype == torch.uint8 else 1)
        return weight.new_empty(hi - lo, k, dtype=dtype)

    for fn in (scan_fwd, scan_bwd, state_update, conv_update, conv_fwd, conv_bwd, dt_softplus_fwd, dt_softplus_bwd,
               gemv, rms_norm, mamba_decode, mlp_decode, moe_decode, decode_step, ce_fwd, ce_bwd, ce_bwd_, decode_attention, wgemv, wgemv_a8,
               wgemm_a8, act_round, dequant):
        torch.library.register_fake(f"{_LIB}::{fn.__name__}", fn)


@contextlib.contextmanager
def one_aten_thread() -> Iterator[None]:
    """ATen ops in the block run on the calling thread alone: its OpenMP thread count and MKL's
    thread-local one are 1 until the block ends (settings of that thread only; a no-op without the
    kernels). For the small ops between decode steps, such as sampling over the vocabulary: on 2
    threads each one woke torch's OpenMP workers, which then spun for milliseconds beside the step's
    own threads (csrc/step_common.h's SerialAten does the same inside a bf16 model's step)."""
    ops = kernels()
    if ops is None:
        yield
        return
    omp, mkl = ops.aten_threads(1, 1)
    try:
        yield
    finally:
        ops.aten_threads(omp, mkl)


def build_error() -> KernelBuildError | None:
    """Why kernels() returned None (for test skip reasons), else None."""
    return _state["error"]


def load_extension() -> Any:
    """Compile (or reuse the cached build) and load the kernels; raises KernelBuildError."""
    sources = sorted(_CSRC.glob("*.cpp"))
    if not sources:
        raise KernelBuildError(f"no C++ sources in {_CSRC} (package data missing?)")
    flags = _compile_flags()
    key = _build_key(sources + sorted(_CSRC.glob("*.h")), flags)  # a changed header must rebuild too
    build_dir = _cache_root() / key
    name = f"{_LIB}_{key[:12]}"
    try:
        _load_or_build(name, sources, flags, build_dir)
    except Exception as err:  # compiler, ninja, linker or dlopen failure: all mean "use the reference"
        march = os.environ.get(MARCH_ENV, "").strip()
        note = f" (compiled for {MARCH_ENV}={march})" if march else ""
        raise KernelBuildError(f"{type(err).__name__}: {_reason(err)}{note}") from err
    return getattr(torch.ops, _LIB)


def _load_or_build(name: str, sources: list[Path], flags: list[str], build_dir: Path) -> None:
    library = build_dir / f"{name}.so"
    marker = build_dir / f"{name}.so.sha256"  # written after a build completed and loaded
    # A verified build loads directly: no ninja or compiler needed, no ~100 ms ninja check.
    # Unverified, it may be a truncated leftover of a killed build, and dlopen of that
    # dies with SIGBUS (no exception to catch): relink it, unless another process is
    # building right now (its lock file exists; torch's load() then waits for it).
    if library.exists() and marker.exists() and marker.read_text() == _digest(library):
        torch.ops.load_library(str(library))
        return
    if library.exists() and not (build_dir / "lock").exists():
        library.unlink()
    from torch.utils import cpp_extension

    _put_pip_ninja_on_path()
    build_dir.mkdir(parents=True, exist_ok=True)
    log.info("jambalab: compiling fused CPU kernels into %s (once per machine)", build_dir)
    cpp_extension.load(
        name=name,
        sources=[str(s) for s in sources],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    marker.write_text(_digest(library))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


MARCH_ENV = "JAMBALAB_MARCH"  # the instruction set the kernels compile for, instead of this CPU's own


def _arch_flag() -> str:
    """-march=native (-mcpu=native on Arm), or -march=$JAMBALAB_MARCH: an older instruction set than this
    CPU's (say x86-64-v3, AVX2 without AVX-512), to build and measure the kernels a lesser CPU would run."""
    want = os.environ.get(MARCH_ENV, "").strip()
    if not want:
        return "-mcpu=native" if platform.machine().lower() in ("arm64", "aarch64") else "-march=native"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", want):
        raise KernelBuildError(f"{MARCH_ENV}={want!r} is not a -march name (for example x86-64-v3 or haswell)")
    return f"-march={want}"


def _compile_flags() -> list[str]:
    # -fopenmp links libgomp.so.1, the soname torch's wheel ships, so both share one thread pool.
    # -fno-trapping-math: we never unmask FP exceptions, and without it GCC will not if-convert
    # float compares (the clamps in causal_conv1d.cpp's exp), so those loops stay scalar.
    return ["-O3", _arch_flag(), "-fopenmp", "-fno-trapping-math"]


def _build_key(sources: list[Path], flags: list[str]) -> str:
    h = hashlib.sha256()
    for src in sources:
        h.update(src.name.encode() + b"\0" + src.read_bytes())
    for part in (*flags, torch.__version__, sys.version, platform.machine(), _cpu_fingerprint()):
        h.update(part.encode() + b"\0")
    h.update(os.environ.get("CXX", "c++").encode())
    return h.hexdigest()[:24]


def _cpu_fingerprint() -> str:
    """The CPU model and feature flags that -march=native compiles for."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags", "features", "cpu part", "cpu implementer")
    lines = {ln.split(":", 1)[0].strip().lower(): ln for ln in text.splitlines() if ":" in ln}
    return "\n".join(lines[k] for k in wanted if k in lines)


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "jambalab" / "torch_extensions"


def _put_pip_ninja_on_path() -> None:
    # `pip install ninja` puts the binary in the environment's bin dir, which is not
    # on PATH when a venv's python is run without activating the venv.
    if shutil.which("ninja"):
        return
    try:
        import ninja  # type: ignore[import-not-found]
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _reason(err: Exception) -> str:
    """The telling line of a build failure, not ninja's echo of the compile command."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    noise = ("[", "FAILED", "ninja:", "Error building extension")
    useful = [ln for ln in lines if not ln.startswith(noise) and " -c " not in ln]
    errors = [ln for ln in useful if "error" in ln.lower() or "not found" in ln.lower()]
    text = (errors or useful or lines or ["no message"])[0]
    return text if len(text) <= 300 else text[:297] + "..."
