"""Text for training: sources -> token ids (once) -> memory-mapped shards -> seeded windows.

Legend: B batch, L seq_len (tokens per training window).

    prepare_corpus(source, out_dir, tokenizer, seed)  tokenize once; writes shard-*.bin + meta.json
    TokenStream.open(out_dir)                          the shards as one memory-mapped token stream
    TextData(stream, seq_len, seed, val_fraction)      train/validation windows, deterministic order

A source is a text file, a directory (every file under it, recursively), a JSONL file (one
document per line, text in a field), or the embedded default: the Python standard library's own
source files, found through sysconfig. Documents are shuffled with the seed, joined with the
tokenizer's EOS id, and the tail of the stream is the validation split, so validation text is
held-out files, not held-out windows of files seen in training.

Sample order is a pure function of (seed, sample position): the data-loader state a checkpoint
keeps is one integer, and any number of processes can split a global batch without talking.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from jambalab.errors import InputError
from jambalab.tokenizer import ByteTokenizer

STDLIB = "stdlib"  # the name of the embedded default corpus
SHARD_TOKENS = 1 << 27  # tokens per shard file: 128 MiB of uint8, 256 MiB of uint16
META = "meta.json"
FORMAT = "jambalab-tokens-1"


# ---------------------------------------------------------------------------------------
# Sources -> documents
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Document:
    path: Path
    line: int | None = None  # JSONL: the 1-based line of the record; None for a whole file


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def find_documents(source: str | Path) -> list[Document]:
    """Every document of a source, in a stable (sorted) order; JSONL records are expanded later."""
    if str(source) == STDLIB:
        root = stdlib_root()
        # site-packages lives under the stdlib directory; third-party code is not the corpus.
        files = [p for p in root.rglob("*.py")
                 if p.is_file() and p.relative_to(root).parts[0] not in ("site-packages", "dist-packages")]
        return [Document(p) for p in sorted(files)]
    path = Path(source)
    if not path.exists():
        raise InputError(f"data path {path} does not exist")
    if path.is_file():
        return [Document(path)]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
    if not files:
        raise InputError(f"data directory {path} holds no files")
    return [Document(p) for p in files]


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def read_texts(doc: Document, text_field: str) -> Iterator[str]:
    """The texts of one file: itself, or one per JSONL record. Raises UnicodeDecodeError if not UTF-8."""
    raw = doc.path.read_bytes().decode("utf-8")
    if doc.path.suffix != ".jsonl":
        yield raw
        return
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{doc.path}:{n} is not valid JSON: {e.msg}") from None
        if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
            raise InputError(f"{doc.path}:{n} has no string field {text_field!r} (choose it with --text-field)")
        yield rec[text_field]


# ---------------------------------------------------------------------------------------
# Tokenize once -> shards
# ---------------------------------------------------------------------------------------
def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32)


def encode(tokenizer, text: str) -> np.ndarray:
    if isinstance(tokenizer, ByteTokenizer):
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)  # 100x faster than a list of ints
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def tokenizer_id(tokenizer) -> str:
    """What the token ids depend on; a cached corpus made with another tokenizer is not reused."""
    if isinstance(tokenizer, ByteTokenizer):
        return f"bytes:eos={tokenizer.eos_token_id}"
    vocab = json.dumps(sorted(tokenizer.tok.get_vocab(with_added_tokens=True).items()))
    return f"tokenizer.json:{hashlib.sha256(vocab.encode()).hexdigest()[:16]}:eos={tokenizer.eos_token_id}"


class _ShardWriter:
    """Appends token arrays to shard-00000.bin, shard-00001.bin, ... of at most SHARD_TOKENS each."""

    def __init__(self, out_dir: Path, dtype: np.dtype, shard_tokens: int = SHARD_TOKENS):
        self.out_dir, self.dtype, self.shard_tokens = out_dir, dtype, shard_tokens
        self.sizes: list[int] = []
        self._f = None

    def write(self, ids: np.ndarray) -> None:
        while ids.size:
            if self._f is None or self.sizes[-1] == self.shard_tokens:
                self._open_next()
            n = min(ids.size, self.shard_tokens - self.sizes[-1])
            self._f.write(ids[:n].astype(self.dtype, copy=False).tobytes())
            self.sizes[-1] += n
            ids = ids[n:]

    def _open_next(self) -> None:
        self.close()
        self._f = open(self.out_dir / f"shard-{len(self.sizes):05d}.bin", "wb")
        self.sizes.append(0)

    def close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None


def prepare_corpus(source: str | Path, out_dir: str | Path, tokenizer, seed: int, text_field: str = "text",
                   log=print) -> dict:
    """Tokenize a source into out_dir (once: a matching meta.json is reused). Returns the meta dict."""
    out_dir = Path(out_dir)
    want = {"format": FORMAT, "source": _source_name(source), "tokenizer": tokenizer_id(tokenizer), "seed": seed}
    meta = _read_meta(out_dir)
    if meta is not None and all(meta.get(k) == v for k, v in want.items()):
        return meta
    docs = find_documents(source)
    log(f"data: tokenizing {len(docs)} file(s) of {source} into {out_dir} (once; later runs reuse it)")
    order = np.random.default_rng(seed).permutation(len(docs))  # held-out split = a random set of files
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_shards(out_dir)
    writer = _ShardWriter(out_dir, token_dtype(tokenizer.vocab_size))
    eos = tokenizer.eos_token_id
    sep = np.array([] if eos is None else [eos], dtype=np.int64)
    skipped, n_docs = 0, 0
    try:
        for i in order:
            try:
                texts = list(read_texts(docs[i], text_field))
            except UnicodeDecodeError:
                skipped += 1
                continue
            for text in texts:
                if not text:
                    continue
                writer.write(encode(tokenizer, text))
                writer.write(sep)
                n_docs += 1
    finally:
        writer.close()
    if skipped:
        log(f"warning: skipped {skipped} of {len(docs)} file(s) that are not UTF-8 text")
    if sum(writer.sizes) == 0:
        raise InputError(f"data source {source} holds no text ({len(docs)} file(s), {skipped} not UTF-8)")
    meta = {**want, "n_documents": n_docs, "n_skipped": skipped, "dtype": writer.dtype.name,
            "shard_sizes": writer.sizes, "n_tokens": sum(writer.sizes)}
    _write_json_atomic(out_dir / META, meta)
    return meta


def _source_name(source: str | Path) -> str:
    return STDLIB if str(source) == STDLIB else str(Path(source).resolve())


def _read_meta(out_dir: Path) -> dict | None:
    try:
        meta = json.loads((out_dir / META).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    ok = isinstance(meta, dict) and all((out_dir / f"shard-{i:05d}.bin").is_file()
                                        for i in range(len(meta.get("shard_sizes", []))))
    return meta if ok else None


def _remove_shards(out_dir: Path) -> None:
    (out_dir / META).unlink(missing_ok=True)  # first: a half-written corpus is never taken as done
    for p in out_dir.glob("shard-*.bin"):
        p.unlink()


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# Shards -> one stream -> windows
# ---------------------------------------------------------------------------------------
class TokenStream:
    """The shards of a prepared corpus as one read-only token sequence (numpy memmaps)."""

    def __init__(self, shards: list[np.ndarray], meta: dict):
        self.shards = shards
        self.meta = meta
        self.starts = np.cumsum([0] + [len(s) for s in shards])  # (n_shards + 1,)

    @classmethod
    def open(cls, out_dir: str | Path) -> TokenStream:
        out_dir = Path(out_dir)
        meta = _read_meta(out_dir)
        if meta is None:
            raise InputError(f"{out_dir} holds no prepared corpus ({META} missing or shards incomplete)")
        shards = [np.memmap(out_dir / f"shard-{i:05d}.bin", dtype=meta["dtype"], mode="r", shape=(n,))
                  for i, n in enumerate(meta["shard_sizes"])]
        return cls(shards, meta)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) as int64, across shard boundaries."""
        parts = []
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < end:
            lo = start - self.starts[i]
            n = min(end - start, len(self.shards[i]) - lo)
            parts.append(np.asarray(self.shards[i][lo:lo + n], dtype=np.int64))
            start += n
            i += 1
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def byte_histogram(self, start: int, end: int, vocab_size: int) -> np.ndarray:
        """Token counts over [start, end), read in 16M-token pieces to bound memory."""
        counts = np.zeros(vocab_size, dtype=np.int64)
        for s in range(start, end, 1 << 24):
            counts += np.bincount(self.read(s, min(end, s + (1 << 24))), minlength=vocab_size)[:vocab_size]
        return counts


class TextData:
    """Non-overlapping windows of L tokens over the train split, in a seeded order per epoch.

    The model shifts labels itself (labels = input_ids), so a window of L tokens trains L - 1
    predictions. The validation split is the stream's tail: val_fraction of it, and at least one window.
    """

    def __init__(self, stream: TokenStream, seq_len: int, seed: int, val_fraction: float = 0.01):
        n = len(stream)
        n_val = max(math.ceil(val_fraction * n), seq_len)
        if n - n_val < seq_len:
            raise InputError(f"the data holds {n} tokens: too few for one {seq_len}-token training window "
                             f"plus a validation window; lower --seq-len or add data")
        self.stream, self.seq_len, self.seed = stream, seq_len, seed
        self.split = n - n_val  # train: [0, split), validation: [split, n)
        self.n_train = self.split // seq_len
        self.n_val = n_val // seq_len
        self._perm_epoch, self._perm = -1, np.zeros(0, dtype=np.int64)

    def _window_index(self, position: int) -> int:
        """Which train window the position-th sample (counting from 0, across epochs) is."""
        epoch, i = divmod(position, self.n_train)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_train)
            self._perm_epoch = epoch
        return int(self._perm[i])

    def train_batch(self, positions: range) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples at the given global positions -> (input_ids, labels), both (B, L) long."""
        rows = [self.stream.read(w * self.seq_len, (w + 1) * self.seq_len)
                for w in (self._window_index(p) for p in positions)]
        ids = torch.from_numpy(np.stack(rows))  # (B, L)
        return ids, ids

    def val_batches(self, n_batches: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed set of validation windows (the same at every evaluation), evenly spread over the split."""
        n = min(n_batches * batch_size, self.n_val)
        picks = np.linspace(0, self.n_val - 1, n).round().astype(np.int64)  # (n,)
        out = []
        for s in range(0, n, batch_size):
            rows = [self.stream.read(self.split + w * self.seq_len, self.split + (w + 1) * self.seq_len)
                    for w in picks[s:s + batch_size]]
            ids = torch.from_numpy(np.stack(rows))
            out.append((ids, ids))
        return out

    def unigram_entropy(self, vocab_size: int) -> float:
        """Entropy (nats per token) of the train split's token frequencies: the loss of the best
        model that ignores context. A model that learned anything beats it."""
        counts = self.stream.byte_histogram(0, self.split, vocab_size).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())
