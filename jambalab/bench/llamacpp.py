"""llama.cpp's side of `jambalab bench peers`: find a build, convert and quantize, run llama-bench.

    find_llama_cpp(bench, source)   the build: llama-bench, llama-quantize beside it, the source tree
    gguf_file(...)                  a transformers checkpoint as GGUF F32 / BF16 (convert_hf_to_gguf.py)
                                    or Q8_0 / Q4_0 / Q4_K_M (llama-quantize from F32); cached
    llama_bench(...)                llama-bench -t T -p P -n G -r R -o json -> prefill / decode samples
    gguf_bytes_per_token(...)       weight bytes one decode token reads, from the GGUF's tensor table
    greedy(...)                     greedy tokens and first logits through llama-cpp-python's ctypes
                                    bindings (when its sdist holds the source tree), for parity

Nothing here builds llama.cpp: docs/precision.md gives the recipe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import jambalab
from jambalab.errors import InputError

CONVERTED = {"F32": "f32", "BF16": "bf16"}  # written by the converter; the others by llama-quantize from F32


@dataclass
class LlamaCpp:
    bench: Path  # llama-bench
    quantize: Path  # llama-quantize, beside llama-bench
    source: Path  # the llama.cpp tree: convert_hf_to_gguf.py, gguf-py/

    @property
    def bindings(self) -> Path | None:
        """llama-cpp-python's package root when the tree is its sdist's vendor/llama.cpp, else None."""
        root = self.source.parents[1]
        return root if (root / "llama_cpp" / "llama_cpp.py").is_file() else None

    @property
    def lib_dir(self) -> Path | None:
        """Where libllama.so was built (a shared build puts it beside llama-bench)."""
        for where in (self.bench.parent, self.bench.parent.parent / "src"):
            if (where / "libllama.so").is_file():
                return where
        return None


def find_llama_cpp(bench: str | None, source: str | None) -> LlamaCpp | None:
    """The llama.cpp build named on the command line; None when neither path is given."""
    if bench is None and source is None:
        return None
    if bench is None or source is None:
        raise InputError("give both --llama-bench (the binary) and --llama-cpp-dir (the llama.cpp source tree)")
    b, s = Path(bench), Path(source)
    if not (b.is_file() and os.access(b, os.X_OK)):
        raise InputError(f"--llama-bench {b} is not an executable file")
    q = b.with_name("llama-quantize")
    if not (q.is_file() and os.access(q, os.X_OK)):
        raise InputError(f"no executable llama-quantize beside {b} (build the llama-quantize target too)")
    if not (s / "convert_hf_to_gguf.py").is_file() or not (s / "gguf-py").is_dir():
        raise InputError(f"--llama-cpp-dir {s} has no convert_hf_to_gguf.py and gguf-py/ (give the llama.cpp tree)")
    return LlamaCpp(b.resolve(), q.resolve(), s.resolve())


# ---------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------
def write_tokenizer(model_dir: Path, vocab_size: int = 1000) -> Path:
    """A small sentencepiece tokenizer.model (trained on jambalab's own source text): llama.cpp's
    converter needs one, and pads its vocabulary up to the config's vocab_size."""
    import io

    import sentencepiece as spm

    path = model_dir / "tokenizer.model"
    if path.is_file():
        return path
    root = Path(__file__).resolve().parents[1]
    lines = [ln for f in sorted(root.rglob("*.py")) for ln in f.read_text().splitlines() if ln.strip()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, pad_id=-1,
                                   unk_id=0, num_threads=1, minloglevel=2)
    path.write_bytes(buf.getvalue())
    return path


def gguf_file(llama: LlamaCpp, model_dir: Path, out_dir: Path, kind: str, threads: int, timeout_s: int) -> Path:
    """model_dir converted to GGUF of type `kind` (F32, BF16, Q8_0, Q4_0, Q4_K_M); cached in out_dir."""
    out = out_dir / f"{model_dir.name}-{kind.lower()}.gguf"
    if out.is_file():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    if kind in CONVERTED:
        write_tokenizer(model_dir)
        cmd = [sys.executable, str(llama.source / "convert_hf_to_gguf.py"), str(model_dir),
               "--outtype", CONVERTED[kind], "--outfile", str(tmp)]
    else:
        f32 = gguf_file(llama, model_dir, out_dir, "F32", threads, timeout_s)
        cmd = [str(llama.quantize), str(f32), str(tmp), kind, str(threads)]
    run_tool(cmd, timeout_s, f"{kind} conversion of {model_dir.name}")
    tmp.rename(out)
    return out


def run_tool(cmd: list[str], timeout_s: int, what: str) -> str:
    """stdout of cmd; RuntimeError naming `what` and the tool's last line if it fails. The tool runs in
    the environment its users give it: without what jambalab set for itself (jambalab.SET_ENV)."""
    env = {k: v for k, v in os.environ.items() if k not in jambalab.SET_ENV}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what} timed out after {timeout_s} s") from None
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {tail}")
    return done.stdout


# ---------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------
def llama_bench(llama: LlamaCpp, gguf: Path, threads: int, prompt: int, gen: int, repeat: int,
                timeout_s: int) -> dict:
    """llama-bench's prefill (pp) and decode (tg) tokens/s samples for one file."""
    out = run_tool([str(llama.bench), "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(gen),
                    "-r", str(repeat), "-o", "json"], timeout_s, f"llama-bench on {gguf.name}")
    try:
        return parse_llama_bench(json.loads(out))
    except (ValueError, KeyError, TypeError) as e:
        raise RuntimeError(f"llama-bench on {gguf.name} printed no usable JSON: {e}") from None


def parse_llama_bench(records: list[dict]) -> dict:
    """{"prefill": samples, "decode": samples, "model_size": bytes, "params": n} from llama-bench -o json."""
    out: dict = {}
    for r in records:
        what = "prefill" if r["n_prompt"] > 0 and r["n_gen"] == 0 else "decode" if r["n_gen"] > 0 else None
        if what:
            out[what] = [float(x) for x in r["samples_ts"]]
        out["model_size"], out["params"] = r.get("model_size"), r.get("model_n_params")
    return out


def gguf_bytes_per_token(llama: LlamaCpp, gguf: Path, top_k: int, n_experts: int) -> int:
    """Bytes of weights one decode token reads from a GGUF file: every tensor, except that the token
    embedding contributes one row (unless it doubles as the output matrix) and stacked experts K/E."""
    sys.path.insert(0, str(llama.source / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    tensors = {t.name: t for t in GGUFReader(str(gguf)).tensors}
    total = 0.0
    for name, t in tensors.items():
        size = int(t.n_bytes)
        if name == "token_embd.weight" and "output.weight" in tensors:
            size //= int(t.shape[-1])  # one row: gguf shapes are (d, V), innermost first
        elif "_exps." in name:
            size = size * top_k / n_experts
        total += size
    return int(total)


# ---------------------------------------------------------------------------------------
# Parity: llama.cpp's greedy tokens through llama-cpp-python's ctypes bindings
# ---------------------------------------------------------------------------------------
def _bindings(package_root: Path, lib_dir: Path):
    """llama-cpp-python's low-level module `llama_cpp.llama_cpp`, loaded from its source tree against
    the library built beside llama-bench. The package's __init__ is not run (it imports the high-level
    API and its extra dependencies); the ctypes module needs only typing_extensions."""
    import importlib
    import types

    os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    if "llama_cpp" not in sys.modules:
        pkg = types.ModuleType("llama_cpp")
        pkg.__path__ = [str(package_root / "llama_cpp")]
        sys.modules["llama_cpp"] = pkg
    return importlib.import_module("llama_cpp.llama_cpp")


def greedy(llama: LlamaCpp, gguf: Path, ids: list[int], n: int, threads: int) -> tuple[list[int], list[float]]:
    """llama.cpp's n greedy tokens after `ids`, and its logits for the token after `ids`."""
    L = _bindings(llama.bindings, llama.lib_dir)
    L.llama_backend_init()
    model = L.llama_model_load_from_file(str(gguf).encode(), L.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf}")
    params = L.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = len(ids) + n + 8
    params.n_threads = params.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, params)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    try:
        def step(tokens: list[int]) -> list[float]:
            arr = (L.llama_token * len(tokens))(*tokens)
            if L.llama_decode(ctx, L.llama_batch_get_one(arr, len(tokens))) != 0:
                raise RuntimeError("llama_decode failed")
            ptr = L.llama_get_logits_ith(ctx, -1)
            return [ptr[i] for i in range(n_vocab)]

        logits = step(ids)
        first, out = logits, []
        for _ in range(n):
            out.append(max(range(n_vocab), key=logits.__getitem__))
            logits = step([out[-1]])
        return out, first
    finally:
        L.llama_free(ctx)
        L.llama_model_free(model)
