"""`jambalab generate`: stream text from a checkpoint (or a randomly initialised preset).

The prompt is prefilled in chunks (--chunk-size) with a progress bar when it spans several
chunks, so a prompt of a million tokens runs in bounded memory (plus the attention layers'
KV cache). Text goes to stdout as it is generated; the progress bar and --stats go to stderr.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

from jambalab.commands.common import add_model_source
from jambalab.errors import InputError


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint (--model) or a random preset")
    add_model_source(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", help="a UTF-8 text file holding the prompt (any length)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with mass >= p")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--chunk-size", type=int, default=2048, help="prefill chunk length in tokens (default 2048)")
    p.add_argument("--int8", action="store_true", help="int8 weight-only quantization (see jambalab.quant)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn of the chat template")
    p.add_argument("--stats", action="store_true", help="print prefill/decode speed, peak memory, cache bytes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jambalab.generate import stream_generate
    from jambalab.tokenizer import load_tokenizer

    _check_args(args)
    model = load_model(args)
    tok = load_tokenizer(args.model, model.config)
    ids = torch.tensor([encode_prompt(tok, read_prompt(args), args.chat)])  # (1, L)
    cache = model.allocate_cache(1, max_length=ids.shape[1] + args.max_new_tokens)
    bar = _progress_bar(ids.shape[1], args.chunk_size)
    stream = stream_generate(model, ids, args.max_new_tokens, do_sample=args.temperature > 0,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                             eos_token_id=tok.eos_token_id, chunk_size=args.chunk_size, cache=cache,
                             progress=None if bar is None else bar.update)
    printer = TextPrinter(tok)
    t0 = time.perf_counter()
    t_first, n_new = None, 0
    for token in stream:
        if t_first is None:
            t_first = time.perf_counter()
            if bar is not None:
                bar.close()
        printer.add(int(token[0]))
        n_new += 1
    t_end = time.perf_counter()
    printer.finish()
    if args.stats:
        print_stats(ids.shape[1], t_first - t0, n_new, t_end - t_first, cache, model, args.chunk_size)
    return 0


def _check_args(args: argparse.Namespace) -> None:
    # The same checks run again inside generate; here they fail before the model is loaded.
    if args.max_new_tokens <= 0:
        raise InputError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise InputError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise InputError(f"--top-p must lie in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k <= 0:
        raise InputError(f"--top-k must be positive, got {args.top_k}")
    if args.chunk_size <= 0:
        raise InputError(f"--chunk-size must be positive, got {args.chunk_size}")


# ---------------------------------------------------------------------------------------
# Model, prompt
# ---------------------------------------------------------------------------------------
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_model(args: argparse.Namespace):
    """--model DIR loads a checkpoint; --preset / --config give random weights (seed 0), for trying the CLI.
    args.dtype ("fp32" | "bf16"), where the command has it, converts the weights (None keeps them)."""
    import jambalab
    from jambalab.config import JambaConfig
    from jambalab.quant import quantize_int8

    dtype = TORCH_DTYPES[args.dtype] if getattr(args, "dtype", None) else None
    if args.model:
        model = jambalab.from_pretrained(args.model, dtype=dtype)
    elif args.preset:
        model = jambalab.from_preset(args.preset, seed=0)
    else:
        model = jambalab.JambaLM.from_config(JambaConfig.from_file(args.config), seed=0)
    if dtype is not None:
        model.to(dtype)
    model.eval()
    return quantize_int8(model) if args.int8 else model


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        text = args.prompt
    else:
        text = read_text_file(Path(args.prompt_file))
    if not text:
        raise InputError("the prompt is empty")
    return text


def read_text_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"prompt file {path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"prompt file {path} is a directory") from None
    # NUL bytes are valid UTF-8 but mark binary files (images, archives, tensors).
    if b"\x00" in data:
        raise InputError(f"prompt file {path} is not text (it holds NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"prompt file {path} is not UTF-8 text (bad byte at offset {e.start})") from None


def encode_prompt(tok, text: str, chat: bool) -> list[int]:
    if not chat:
        return tok.encode(text)
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    # A chat template writes its own BOS; the tokenizer must not add a second one.
    return tok.encode(rendered, add_special_tokens=False)


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------
class TextPrinter:
    """Print decoded text as tokens arrive. Decoding restarts after each newline (so the work per
    token stays bounded) and holds back a trailing U+FFFD (a character cut between tokens)."""

    def __init__(self, tok, out=None):
        self.tok, self.out = tok, out or sys.stdout
        self.tokens: list[int] = []
        self.printed = 0

    def add(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tok.decode(self.tokens)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        if text.endswith("\n"):
            self.tokens, self.printed = [], 0
        else:
            self.printed = len(text)

    def finish(self) -> None:
        self.out.write(self.tok.decode(self.tokens)[self.printed:] + "\n")
        self.out.flush()


def _progress_bar(n_tokens: int, chunk_size: int):
    if n_tokens <= chunk_size:
        return None
    from tqdm import tqdm

    return tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="prefill", file=sys.stderr)


def print_stats(n_prompt: int, t_prefill: float, n_new: int, t_decode: float, cache, model, chunk: int) -> None:
    from jambalab.quant import weight_bytes

    decode_steps = n_new - 1  # the first new token comes from the prefill's logits
    mib = 2 ** 20
    lines = [
        f"prefill: {n_prompt} tokens in {t_prefill:.2f} s ({n_prompt / max(t_prefill, 1e-9):.0f} tok/s, chunks of {chunk})",
        f"decode: {decode_steps} steps in {t_decode:.2f} s ({decode_steps / max(t_decode, 1e-9):.1f} tok/s)",
        f"peak memory: {peak_rss_bytes() / mib:.0f} MiB RSS" + _cuda_peak(),
        f"cache: {cache.nbytes() / mib:.2f} MiB (KV {cache.kv_bytes() / mib:.2f} MiB + "
        f"Mamba state {cache.state_bytes() / mib:.2f} MiB); weights: {weight_bytes(model) / mib:.1f} MiB",
    ]
    print("\n".join(lines), file=sys.stderr)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _cuda_peak() -> str:
    if not torch.cuda.is_available():
        return ""
    return f", {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MiB CUDA"
