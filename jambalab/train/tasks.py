"""Synthetic recall tasks, generated from a seed: MQAR, key-value needle, passkey retrieval, selective copying.

Legend: B batch, L seq_len, V vocab.

Every task makes (input_ids, labels) batches of shape (B, L) where labels is -100 everywhere but
the answer tokens, so the model's loss (which shifts labels by one) trains only the answers and
`accuracy` scores only them. Sample i of a seed is a pure function of (seed, split, i): a batch
is the same however it is split across processes, and validation samples never appear in training.

    task = make_task("mqar", n_pairs=16)
    ids, labels = task.batch(seq_len=256, batch_size=32, seed=0)    # (B, L), (B, L)
    acc = evaluate(model, task, seq_len=512, n_samples=256)        # recall accuracy at 512 tokens

Token ids (for MQAR and copying) stay below `vocab_size` (default 256, so byte-level models can
learn them); 0 is the blank/filler, 1 the copy task's separator, 2 is left free (the presets' EOS).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from jambalab.errors import InputError

IGNORE = -100  # labels the loss and the accuracy skip
BLANK, SEP, FIRST_ID = 0, 1, 3
TRAIN, VAL = 0, 1  # seed streams: training samples and held-out samples


class Task:
    """A generator of (input_ids, labels) samples; subclasses define `sample` and `check`."""

    name = "task"

    def sample(self, rng: np.random.Generator, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """One sample: (ids (L,), labels (L,)) int64, labels IGNORE except the answers."""
        raise NotImplementedError

    def check(self, seq_len: int, vocab_size: int) -> None:
        """Raise InputError if samples of this length do not fit, or need more ids than the model has."""
        raise NotImplementedError

    def batch_at(self, positions: range, seq_len: int, seed: int, split: int = TRAIN) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples at the given positions of a seed's stream -> (input_ids, labels), (B, L) long."""
        pairs = [self.sample(np.random.default_rng([seed, split, p]), seq_len) for p in positions]
        ids, labels = (torch.from_numpy(np.stack(x)) for x in zip(*pairs))
        return ids, labels

    def batch(self, seq_len: int, batch_size: int, seed: int = 0, split: int = TRAIN) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch_at(range(batch_size), seq_len, seed, split)

    @staticmethod
    def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
        return answer_accuracy(logits, labels)


def answer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of answer tokens predicted exactly (greedy). logits (B, L, V), labels (B, L).

    Position t's logits predict token t + 1, as in the model's loss."""
    preds = logits[:, :-1].argmax(-1)  # (B, L-1)
    target = labels[:, 1:]
    mask = target != IGNORE
    if not bool(mask.any()):
        raise InputError("labels hold no answer positions (all -100)")
    return float((preds == target)[mask].float().mean())


@torch.no_grad()
def evaluate(model, task: Task, seq_len: int, n_samples: int = 256, batch_size: int = 32, seed: int = 0) -> float:
    """Answer accuracy on n_samples held-out samples of length seq_len."""
    task.check(seq_len, model.config.vocab_size)
    was_training = model.training
    model.eval()
    hits, total = 0.0, 0
    for start in range(0, n_samples, batch_size):
        pos = range(start, min(start + batch_size, n_samples))
        ids, labels = task.batch_at(pos, seq_len, seed, VAL)
        n = int((labels[:, 1:] != IGNORE).sum())
        hits += answer_accuracy(model(ids).logits, labels) * n
        total += n
    model.train(was_training)
    return hits / total


def _check_vocab(task: Task, needed: int, vocab_size: int) -> None:
    if needed > vocab_size:
        raise InputError(f"task {task.name} uses token ids up to {needed - 1}, the model's vocabulary has {vocab_size}")


# ---------------------------------------------------------------------------------------
# Multi-query associative recall (Zoology, Arora et al. 2023, arXiv 2312.04927)
# ---------------------------------------------------------------------------------------
@dataclass
class MQAR(Task):
    """k1 v1 k2 v2 ... kn vn, then n_queries keys at random places in blank filler, each followed
    by its value. Loss and accuracy on the values after the queries only."""

    n_pairs: int = 8
    n_queries: int | None = None  # None: every key is queried once
    vocab_size: int = 256
    name = "mqar"

    @property
    def _n_keys(self) -> int:
        return (self.vocab_size - FIRST_ID) // 2

    def check(self, seq_len: int, vocab_size: int) -> None:
        _check_vocab(self, self.vocab_size, vocab_size)
        nq = self.n_queries or self.n_pairs
        if not 0 < nq <= self.n_pairs:
            raise InputError(f"mqar: n_queries={nq} must lie in [1, n_pairs={self.n_pairs}]")
        if self.n_pairs > self._n_keys:
            raise InputError(f"mqar: n_pairs={self.n_pairs} exceeds the {self._n_keys} distinct keys "
                             f"of vocab {self.vocab_size}")
        need = 2 * self.n_pairs + 2 * nq
        if need > seq_len:
            raise InputError(f"mqar: {self.n_pairs} pairs and {nq} queries need seq_len >= {need}, got {seq_len}")

    def sample(self, rng: np.random.Generator, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        n, nq, k = self.n_pairs, self.n_queries or self.n_pairs, self._n_keys
        keys = FIRST_ID + rng.choice(k, size=n, replace=False)  # distinct keys
        values = FIRST_ID + k + rng.integers(0, k, size=n)
        ids = np.full(seq_len, BLANK, dtype=np.int64)
        labels = np.full(seq_len, IGNORE, dtype=np.int64)
        ids[0:2 * n:2], ids[1:2 * n:2] = keys, values
        # Queries occupy two-token slots after the pairs: key at 2j, its value (the answer) at 2j + 1.
        n_slots = (seq_len - 2 * n) // 2
        slots = np.sort(rng.choice(n_slots, size=nq, replace=False))
        asked = rng.choice(n, size=nq, replace=False)
        at = 2 * n + 2 * slots  # (nq,)
        ids[at], ids[at + 1] = keys[asked], values[asked]
        labels[at + 1] = values[asked]
        return ids, labels


# ---------------------------------------------------------------------------------------
# Passkey retrieval (Mohtashami & Jaggi 2023, arXiv 2305.16300), in bytes
# ---------------------------------------------------------------------------------------
_HAY = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass
class Passkey(Task):
    """A number hidden at some depth of repeated filler text, asked for at the end. Byte tokens;
    loss and accuracy on the answer's digits only."""

    n_digits: int = 5
    depth: float | None = None  # where the needle sits, as a fraction of the haystack; None: uniform
    name = "passkey"

    def _parts(self, key: bytes) -> tuple[bytes, bytes]:
        needle = b"The pass key is " + key + b". Remember it. " + key + b" is the pass key. "
        return needle, b"What is the pass key? The pass key is "

    def check(self, seq_len: int, vocab_size: int) -> None:
        _check_vocab(self, 256, vocab_size)
        if self.n_digits <= 0:
            raise InputError(f"passkey: n_digits must be positive, got {self.n_digits}")
        if self.depth is not None and not 0 <= self.depth <= 1:
            raise InputError(f"passkey: depth must lie in [0, 1], got {self.depth}")
        needle, question = self._parts(b"0" * self.n_digits)
        need = len(needle) + len(question) + self.n_digits
        if seq_len < need:
            raise InputError(f"passkey: seq_len must be >= {need} (needle, question and answer), got {seq_len}")

    def sample(self, rng: np.random.Generator, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        key = "".join(str(d) for d in rng.integers(0, 10, size=self.n_digits)).encode()
        needle, question = self._parts(key)
        n_hay = seq_len - len(needle) - len(question) - len(key)
        hay = (_HAY * (n_hay // len(_HAY) + 1))[:n_hay]
        depth = rng.random() if self.depth is None else self.depth
        # The needle goes at the sentence boundary nearest the depth, so no filler word is cut.
        bounds = np.array([0] + [i + 2 for i in range(n_hay - 1) if hay[i:i + 2] == b". "])
        cut = int(bounds[np.abs(bounds - depth * n_hay).argmin()])
        text = hay[:cut] + needle + hay[cut:] + question + key
        ids = np.frombuffer(text, dtype=np.uint8).astype(np.int64)  # (L,)
        labels = np.full(seq_len, IGNORE, dtype=np.int64)
        labels[-len(key):] = ids[-len(key):]
        return ids, labels


# ---------------------------------------------------------------------------------------
# Selective copying (Mamba, Gu & Dao 2023, arXiv 2312.00752, Sec. 4.1.1)
# ---------------------------------------------------------------------------------------
@dataclass
class SelectiveCopy(Task):
    """n_tokens data tokens scattered among blanks, a separator, then the data tokens in order.
    Loss and accuracy on the copied tokens only (their positions must be remembered, not found)."""

    n_tokens: int = 16
    vocab_size: int = 256
    name = "copy"

    def check(self, seq_len: int, vocab_size: int) -> None:
        _check_vocab(self, self.vocab_size, vocab_size)
        if self.n_tokens <= 0:
            raise InputError(f"copy: n_tokens must be positive, got {self.n_tokens}")
        if seq_len < 2 * self.n_tokens + 1:
            raise InputError(f"copy: seq_len must be >= {2 * self.n_tokens + 1} for {self.n_tokens} tokens, got {seq_len}")

    def sample(self, rng: np.random.Generator, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        n = self.n_tokens
        region = seq_len - n - 1  # where the data tokens hide among blanks
        data = rng.integers(FIRST_ID, self.vocab_size, size=n)
        where = np.sort(rng.choice(region, size=n, replace=False))
        ids = np.full(seq_len, BLANK, dtype=np.int64)
        ids[where] = data
        ids[region] = SEP
        ids[region + 1:] = data
        labels = np.full(seq_len, IGNORE, dtype=np.int64)
        labels[region + 1:] = data
        return ids, labels


# ---------------------------------------------------------------------------------------
# Key-value needle in a haystack (token-level; RULER's multi-key NIAH, arXiv 2404.06654)
# ---------------------------------------------------------------------------------------
@dataclass
class Needle(Task):
    """Key-value pairs (single tokens) scattered in filler, one pair every `pair_every` tokens; then
    SEP and n_queries distinct keys, each followed by its value. The first key asked is the needle,
    which sits at `depth` of the haystack; the other pairs are distractors, so the facts to hold
    grow with the context, as in a long document. Loss on every answer; `FirstAnswer(Needle(...))`
    keeps the needle's answer only (what the heatmap scores).

    n_queries None asks half of the pairs: asking all of them would let a model answer the last
    queries by elimination (a value of the context not yet given) without looking anything up.

    Ids: SEP = 1, filler FIRST_ID.., then n_keys keys, then n_values values."""

    n_filler: int = 16
    n_keys: int = 64
    n_values: int = 16
    pair_every: int = 16  # haystack tokens per key-value pair
    n_queries: int | None = None  # None: half of the pairs (at least one)
    depth: float | None = None  # the needle's start as a fraction of the haystack; None: uniform
    name = "needle"

    @property
    def vocab_needed(self) -> int:
        return FIRST_ID + self.n_filler + self.n_keys + self.n_values

    def n_pairs(self, seq_len: int) -> int:
        return max(1, seq_len // self.pair_every)

    def queries(self, seq_len: int) -> int:
        return self.n_queries or max(1, self.n_pairs(seq_len) // 2)

    def haystack_len(self, seq_len: int) -> int:
        return seq_len - 1 - 2 * self.queries(seq_len)

    def needle_at(self, seq_len: int, depth: float) -> int:
        """The needle key's position: depth 0 the haystack's first token, 1 its last pair slot."""
        return round(depth * (self.haystack_len(seq_len) - 2))

    def check(self, seq_len: int, vocab_size: int) -> None:
        _check_vocab(self, self.vocab_needed, vocab_size)
        for f in ("n_filler", "n_keys", "n_values", "pair_every", "n_queries"):
            if getattr(self, f) is not None and getattr(self, f) < 1:
                raise InputError(f"needle: {f} must be positive, got {getattr(self, f)}")
        if self.depth is not None and not 0 <= self.depth <= 1:
            raise InputError(f"needle: depth must lie in [0, 1], got {self.depth}")
        p = self.n_pairs(seq_len)
        if p > self.n_keys:
            raise InputError(f"needle: seq_len={seq_len} holds {p} pairs (one per {self.pair_every} tokens), "
                             f"more than the {self.n_keys} distinct keys")
        if self.queries(seq_len) > p:
            raise InputError(f"needle: n_queries={self.n_queries} exceeds the {p} pairs of seq_len={seq_len}")
        if self.haystack_len(seq_len) < 4 * p:
            raise InputError(f"needle: seq_len={seq_len} is too short for {p} pairs and their queries")

    def sample(self, rng: np.random.Generator, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        p, nq, hay = self.n_pairs(seq_len), self.queries(seq_len), self.haystack_len(seq_len)
        first_key = FIRST_ID + self.n_filler
        keys = first_key + rng.choice(self.n_keys, size=p, replace=False)  # (P,) distinct; keys[0] the needle
        values = first_key + self.n_keys + rng.integers(0, self.n_values, size=p)
        ids = FIRST_ID + rng.integers(0, self.n_filler, size=seq_len)  # filler
        labels = np.full(seq_len, IGNORE, dtype=np.int64)
        at = self.needle_at(seq_len, rng.random() if self.depth is None else self.depth)
        # Distractors on the needle's parity, so no two pairs overlap.
        slots = np.array([s for s in range(at % 2, hay - 1, 2) if s != at])
        starts = np.concatenate([[at], rng.choice(slots, size=p - 1, replace=False)]).astype(np.int64)
        ids[starts], ids[starts + 1] = keys, values
        asked = np.concatenate([[0], 1 + rng.choice(p - 1, size=nq - 1, replace=False)]).astype(np.int64)
        q = hay + 1 + 2 * np.arange(nq)  # (nq,) query key positions after SEP
        ids[hay] = SEP
        ids[q], ids[q + 1] = keys[asked], values[asked]
        labels[q + 1] = values[asked]
        return ids.astype(np.int64), labels


@dataclass
class FirstAnswer(Task):
    """Another task's samples scored on their first answer only: for Needle, the needle's."""

    inner: Task

    @property
    def name(self) -> str:
        return self.inner.name

    def check(self, seq_len: int, vocab_size: int) -> None:
        self.inner.check(seq_len, vocab_size)

    def sample(self, rng: np.random.Generator, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        ids, labels = self.inner.sample(rng, seq_len)
        first = int(np.argmax(labels != IGNORE))
        only = np.full_like(labels, IGNORE)
        only[first] = labels[first]
        return ids, only


TASKS = {"mqar": MQAR, "passkey": Passkey, "copy": SelectiveCopy, "needle": Needle}


def make_task(name: str, **kwargs) -> Task:
    if name not in TASKS:
        raise InputError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    try:
        return TASKS[name](**kwargs)
    except TypeError as e:
        raise InputError(f"task {name}: {e}") from None


class TaskData:
    """A task as a training data source: the same interface as data.TextData."""

    def __init__(self, task: Task, seq_len: int, seed: int, vocab_size: int):
        task.check(seq_len, vocab_size)
        self.task, self.seq_len, self.seed = task, seq_len, seed

    def train_batch(self, positions: range) -> tuple[torch.Tensor, torch.Tensor]:
        return self.task.batch_at(positions, self.seq_len, self.seed, TRAIN)

    def val_batches(self, n_batches: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.task.batch_at(range(b * batch_size, (b + 1) * batch_size), self.seq_len, self.seed, VAL)
                for b in range(n_batches)]
