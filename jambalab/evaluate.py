"""Evaluation: perplexity / bits per byte, passkey and needle-in-a-haystack grids, attention maps.

Legend: B batch, L context length (tokens), H heads, V vocab, n text length (tokens).

    model, tok, where = load_for_eval(path_or_none, preset=None)   # checkpoint dir, train run, ablate run
    perplexity(model, ids, n_bytes, seq_len=512)                    -> {"val_loss", "ppl", "bits_per_byte", ...}
    needle_grid(model, tok, lengths, depths, trials, haystack=...)  -> accuracy (depths x lengths)
    attention_maps(model, ids)                                      -> {layer: (H, L, L) softmax(QK^T)}
    plot_heatmap / plot_attention                                   PNGs (matplotlib, imported when used)

A passkey answer counts as found only when every digit is the model's greedy choice: under teacher
forcing that is exactly "greedy decoding writes the key", at the cost of one forward per prompt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from jambalab.errors import InputError
from jambalab.hf import resolve_model_dir  # noqa: F401  (re-exported: the directory rules live with the loader)
from jambalab.model import Attention, JambaLM, rope_rotate

DEFAULT_LENGTHS = (256, 512, 1024, 2048)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


# ---------------------------------------------------------------------------------------
# Loading: a checkpoint directory, a `jambalab train` run, an ablation run, or a preset
# ---------------------------------------------------------------------------------------
def load_for_eval(path: str | Path | None = None, preset: str | None = None, seed: int = 0):
    """(model in eval mode, tokenizer, description). A preset gives a randomly initialised model."""
    from jambalab.tokenizer import load_tokenizer

    if preset is not None:
        import jambalab

        model = jambalab.from_preset(preset, seed=seed)
        return model.eval(), load_tokenizer(None, model.config), f"preset {preset} (random init, seed {seed})"
    if path is None:
        raise InputError("give a checkpoint directory or a preset")
    from jambalab.train.checkpoint import load_model

    model_dir = resolve_model_dir(path)
    model = load_model(model_dir)
    return model.eval(), load_tokenizer(model_dir, model.config), str(model_dir)


def run_name(path: str | Path | None, preset: str | None = None) -> str:
    """A short name for figure titles: the preset, or the run or checkpoint directory's own name
    (<run>/model -> <run>, <run>/checkpoints/step-N/model -> "<run> step-N"); never a whole path."""
    if preset is not None:
        return f"{preset} (random init)"
    p = Path(path).resolve()
    if p.name == "model":
        p = p.parent
    if p.parent.name == "checkpoints":
        return f"{p.parent.parent.name} {p.name}"
    return p.name


# ---------------------------------------------------------------------------------------
# Perplexity and bits per byte
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def perplexity(model: JambaLM, ids: torch.Tensor, n_bytes: int | None = None, seq_len: int = 512,
               stride: int | None = None, batch_size: int = 8) -> dict:
    """Mean next-token loss over ids (n,), in windows of seq_len; each window after the first scores only
    its last `stride` tokens (at most seq_len - 1: the rest is context), so every token but the first
    is scored exactly once.

    n_bytes (the UTF-8 size of the scored text) turns nats per token into bits per byte."""
    n = ids.numel()
    if n < 2:
        raise InputError(f"the text holds {n} token(s); perplexity needs at least 2")
    if seq_len < 2:
        raise InputError(f"the perplexity window must hold at least 2 tokens, got {seq_len}")
    stride = min(stride or seq_len, seq_len - 1)
    windows = []  # (start, end, first scored position within the window)
    done = 0  # tokens [0, done) are scored (or are the unscorable first token)
    while done < n:
        end = min(n, seq_len if done == 0 else done + stride)
        start = max(0, end - seq_len)
        windows.append((start, end, max(1, done - start)))  # done - start >= 1: stride < seq_len
        done = end
    by_shape: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (length, first) -> windows
    for start, end, first in windows:
        by_shape.setdefault((end - start, first), []).append((start, end))
    nll, count = 0.0, 0
    for (_, first), spans in by_shape.items():
        for i in range(0, len(spans), batch_size):
            x = torch.stack([ids[s:e] for s, e in spans[i:i + batch_size]])  # (b, l)
            logits = model(x).logits[:, first - 1:-1]  # (b, l - first, V): predicts x[:, first:]
            target = x[:, first:]
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
            count += target.numel()
    val_loss = nll / count
    out = {"tokens": count, "val_loss": val_loss, "ppl": math.exp(min(val_loss, 700)),
           "bits_per_token": val_loss / math.log(2)}
    if n_bytes:
        out["bytes"] = n_bytes
        out["bits_per_byte"] = nll / math.log(2) / n_bytes
    return out


def text_ids(tokenizer, text: str) -> torch.Tensor:
    """The text's token ids (n,), without special tokens."""
    ids = _encode(tokenizer, text)
    return torch.tensor(ids, dtype=torch.long)


def _encode(tokenizer, text: str) -> list[int]:
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:  # the byte tokenizer has no special tokens to leave out
        return list(tokenizer.encode(text))


def scored_bytes(tokenizer, ids: torch.Tensor) -> int:
    """UTF-8 bytes of the tokens perplexity scores (all but the first)."""
    from jambalab.tokenizer import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return ids.numel() - 1
    return len(tokenizer.decode(ids[1:].tolist()).encode("utf-8"))


def corpus_eval_text(tokenizer, source: str | None, seed: int = 0, max_tokens: int = 65536,
                     cache_dir: Path | None = None) -> tuple[torch.Tensor, int, str]:
    """(ids, bytes, description) of the text perplexity runs on: a text file as is, or the held-out split
    of a corpus (the embedded stdlib corpus by default) exactly as `jambalab train` splits it with this seed."""
    from jambalab.tokenizer import ByteTokenizer
    from jambalab.train.data import STDLIB, TextData, TokenStream, prepare_corpus

    if source is not None and Path(source).is_file():
        try:
            text = Path(source).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{source} is not UTF-8 text") from None
        ids = text_ids(tokenizer, text)[:max_tokens]
        return ids, scored_bytes(tokenizer, ids), f"{source} ({ids.numel()} tokens)"
    if not isinstance(tokenizer, ByteTokenizer):
        raise InputError("the embedded corpus / a directory is prepared byte-level; for a model with its own "
                         "tokenizer give --data FILE")
    src = source or STDLIB
    root = cache_dir or Path.home() / ".cache" / "jambalab" / "eval"
    out = root / ("corpus-" + __import__("hashlib").sha256(f"{src}:{seed}".encode()).hexdigest()[:12])
    prepare_corpus(src, out, tokenizer, seed, log=lambda s: None)
    stream = TokenStream.open(out)
    split = TextData(stream, 2, seed).split  # where `jambalab train` starts its validation split
    ids = torch.from_numpy(stream.read(split, min(len(stream), split + max_tokens)))
    return ids, ids.numel() - 1, f"{src} held-out split (seed {seed}, {ids.numel()} tokens)"


# ---------------------------------------------------------------------------------------
# Passkey / needle in a haystack (paper Fig. 4)
# ---------------------------------------------------------------------------------------
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is "


def needle_cases(tokenizer, seq_len: int, depth: float, n: int, seed: int = 0, haystack: str | None = None,
                 n_digits: int = 5) -> list[tuple[list[int], list[int]]]:
    """n (context ids, answer ids) pairs of about seq_len tokens with the key at `depth` (0 start, 1 end).

    haystack None: the passkey task's own repeated filler (for byte-level models exactly the samples
    `jambalab train --task passkey` trains on, from its held-out stream); else windows of that text."""
    from jambalab.tokenizer import ByteTokenizer
    from jambalab.train.tasks import VAL, Passkey

    if haystack is None and isinstance(tokenizer, ByteTokenizer):
        task = Passkey(n_digits=n_digits, depth=depth)
        task.check(seq_len, 256)
        ids, _ = task.batch_at(range(n), seq_len, seed, VAL)  # (n, L)
        return [(row[:-n_digits].tolist(), row[-n_digits:].tolist()) for row in ids]
    rng = np.random.default_rng([seed, int(depth * 1000), seq_len])
    hay = haystack or _filler_text()
    sample = hay[:4096]
    chars_per_token = len(sample) / max(1, len(_encode(tokenizer, sample)))
    cases = []
    for _ in range(n):
        key = "".join(str(d) for d in rng.integers(0, 10, size=n_digits))
        needle = NEEDLE.format(key=key)
        n_chars = max(0, int((seq_len - len(_encode(tokenizer, needle + QUESTION)) - n_digits) * chars_per_token))
        context = _insert(_window(hay, n_chars, rng), needle, depth) + QUESTION
        cases.append((_encode(tokenizer, context), _encode(tokenizer, key)))
    return cases


def _filler_text() -> str:
    from jambalab.train.tasks import _HAY

    return _HAY.decode() * 64


def _window(text: str, n_chars: int, rng: np.random.Generator) -> str:
    """n_chars of text from a random offset, repeating the text if it is shorter."""
    if n_chars <= 0:
        return ""
    reps = text * (n_chars // max(1, len(text)) + 2)
    start = int(rng.integers(0, max(1, len(text))))
    return reps[start:start + n_chars]


def _insert(hay: str, needle: str, depth: float) -> str:
    """The needle at the line (or sentence) boundary nearest depth * len(hay)."""
    want = int(round(depth * len(hay)))
    cuts = [0, len(hay)] + [i + 1 for i, c in enumerate(hay) if c == "\n"] + [i + 2 for i in range(len(hay) - 1) if hay[i:i + 2] == ". "]
    cut = min(cuts, key=lambda c: abs(c - want))
    return hay[:cut] + needle + hay[cut:]


@torch.no_grad()
def needle_accuracy(model: JambaLM, cases: list[tuple[list[int], list[int]]], batch_size: int = 8) -> float:
    """Fraction of cases whose every answer token is the greedy choice (= greedy decoding writes the key)."""
    by_len: dict[tuple[int, int], list[tuple[list[int], list[int]]]] = {}
    for ctx, ans in cases:
        by_len.setdefault((len(ctx), len(ans)), []).append((ctx, ans))
    hits = 0
    for (n_ctx, n_ans), group in by_len.items():
        for i in range(0, len(group), batch_size):
            part = group[i:i + batch_size]
            x = torch.tensor([c + a for c, a in part])  # (b, n_ctx + n_ans)
            logits = model(x, logits_to_keep=n_ans + 1).logits[:, :-1]  # (b, n_ans, V): predict the answer
            hits += int((logits.argmax(-1) == x[:, n_ctx:]).all(-1).sum())
    return hits / len(cases)


def needle_grid(model: JambaLM, tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int = 8,
                seed: int = 0, haystack: str | None = None, log=None) -> np.ndarray:
    """Accuracy, (len(depths), len(lengths)): the paper's Figure 4 grid."""
    grid = np.zeros((len(depths), len(lengths)))
    for j, seq_len in enumerate(lengths):
        for i, depth in enumerate(depths):
            grid[i, j] = needle_accuracy(model, needle_cases(tokenizer, seq_len, depth, trials, seed, haystack))
            if log is not None:
                log(f"  length {seq_len:6d}  depth {depth:4.2f}  accuracy {grid[i, j]:.2f}")
    return grid


def plot_heatmap(grid: np.ndarray, lengths: Sequence[int], depths: Sequence[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.6 * len(depths)))
    im = draw_heatmap(ax, grid, lengths, depths, title)
    fig.colorbar(im, ax=ax, label="retrieval accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_heatmap(ax, grid: np.ndarray, lengths: Sequence[int], depths: Sequence[float], title: str):
    """Accuracy (depths x lengths) on a matplotlib axis, the value in each cell; returns the image."""
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=9)
    return im


# ---------------------------------------------------------------------------------------
# Attention maps (paper Sec. 6.3: induction-like heads in the hybrid's attention layers)
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def attention_maps(model: JambaLM, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """{layer index: (H, L, L) softmax(QK^T / sqrt(hd)), causal} for the first row of ids (B, L).

    Recomputed from each Attention module's own projections by a forward hook, so the model code
    is untouched and the maps are the ones the model used."""
    maps: dict[int, torch.Tensor] = {}
    hooks = []
    for i, block in enumerate(model.layers):
        if block.is_attention:
            hooks.append(block.mixer.register_forward_hook(_capture_hook(i, maps)))
    try:
        model(ids[:1])
    finally:
        for h in hooks:
            h.remove()
    return maps


def _capture_hook(layer: int, maps: dict):
    def hook(mod: Attention, args, output) -> None:
        x, _state, _past, key_mask, pos = args
        maps[layer] = attention_probs(mod, x, pos, key_mask)[0]

    return hook


def attention_probs(mod: Attention, x: torch.Tensor, pos: torch.Tensor | None,
                    key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, L, L) attention weights of one uncached call, as Attention.forward computes them."""
    bsz, length, _ = x.shape
    q = mod.q_proj(x).view(bsz, length, mod.n_heads, mod.hd).transpose(1, 2)  # (B, H, L, hd)
    k = mod.k_proj(x).view(bsz, length, mod.n_kv, mod.hd).transpose(1, 2)  # (B, H_kv, L, hd)
    if mod.rope_theta is not None:
        q, k = rope_rotate(q, pos, mod.rope_theta), rope_rotate(k, pos, mod.rope_theta)
    k = k.repeat_interleave(mod.n_heads // mod.n_kv, dim=1)  # (B, H, L, hd): query head h reads KV head h // group
    scores = (q.float() @ k.float().transpose(-1, -2)) * mod.hd ** -0.5  # (B, H, L, L)
    allowed = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :length].bool()
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


def induction_ids(low: int, high: int, n: int = 32, seed: int = 0) -> torch.Tensor:
    """(1, 2n): n random tokens from [low, high), then the same n again. An induction head at
    position n + i attends to position i + 1 (the token that followed this one last time)."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(low, high, (n,), generator=g)
    return torch.cat([first, first])[None]


def induction_scores(maps: dict[int, torch.Tensor], n: int) -> dict[int, list[float]]:
    """{layer: per-head mean attention from position n + i to i + 1} on an induction_ids prompt."""
    q = torch.arange(n, 2 * n - 1)
    return {layer: [float(m[h, q, q - n + 1].mean()) for h in range(m.shape[0])] for layer, m in maps.items()}


def plot_attention(maps: dict[int, torch.Tensor], path: Path, labels: Sequence[str] | None = None,
                   title: str = "", scores: dict[int, list[float]] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(maps)
    if not layers:
        raise InputError("the model has no attention layers: there is no attention map to draw")
    n_heads = maps[layers[0]].shape[0]
    fig, axes = plt.subplots(len(layers), n_heads, figsize=(2.6 * n_heads, 2.6 * len(layers)), squeeze=False)
    for r, layer in enumerate(layers):
        for h in range(n_heads):
            ax = axes[r][h]
            ax.imshow(maps[layer][h].numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            name = f"layer {layer} head {h}"
            if scores is not None:
                name += f"\ninduction {scores[layer][h]:.2f}"
            ax.set_title(name, fontsize=8)
            if labels is not None and len(labels) <= 48:
                ax.set_xticks(range(len(labels)), labels, fontsize=4, rotation=90)
                ax.set_yticks(range(len(labels)), labels, fontsize=4)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
    fig.suptitle(title or "attention weights softmax(QK^T) (rows: query, columns: key)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
