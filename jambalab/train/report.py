"""What a finished run prints and draws: the loss curve, a generated sample, cache memory.

Plotting imports matplotlib here (and only here), so `import jambalab` stays light.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from jambalab.config import JambaConfig
from jambalab.model import JambaLM
from jambalab.stats import kv_bytes_per_token, ssm_state_bytes


def plot_losses(metrics: Path, out: Path, unigram_entropy: float | None = None,
                ylabel: str = "nats per token") -> None:
    """Training and validation loss against step, from metrics.jsonl, written atomically to out
    (with the data's unigram entropy as a reference line, for text)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; set before pyplot is imported
    import matplotlib.pyplot as plt

    train, val = [], []
    for line in metrics.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in r:
            train.append((r["step"], r["loss"]))
        if "val_loss" in r:
            val.append((r["step"], r["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), lw=0.8, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", ms=3, label="validation cross-entropy")
    if unigram_entropy is not None:
        ax.axhline(unigram_entropy, color="gray", ls="--", lw=0.8, label="unigram entropy (no context)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out)


@torch.no_grad()
def sample_text(model: JambaLM, tokenizer, prompt: str, n_tokens: int = 300, temperature: float = 0.8,
                seed: int = 0) -> str:
    """The prompt and a sampled continuation (stops at EOS), via the cached decode path."""
    model.eval()
    ids = torch.tensor([tokenizer.encode(prompt)], device=next(model.parameters()).device)  # (1, L)
    out = model.generate(ids, n_tokens, do_sample=True, temperature=temperature, top_k=40, seed=seed,
                         eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0].tolist())


def memory_table(cfg: JambaConfig, lengths: tuple[int, ...] = (4096, 262144)) -> list[str]:
    """The hybrid's KV cache + Mamba state beside a pure Transformer of the same shape (every layer
    attention, same heads), per sequence in bf16: the paper's Table 1 argument at this size."""
    dense = cfg.replace(attn_layer_period=1, attn_layer_offset=0)
    rows = [f"{'cache per sequence (bf16)':<34}" + "".join(f"{_tokens(n):>14}" for n in lengths)]
    for name, c in ((f"this model ({cfg.n_attention_layers} attn + {cfg.n_mamba_layers} Mamba)", cfg),
                    (f"pure Transformer ({dense.n_layers} attn)", dense)):
        kv, state = kv_bytes_per_token(c, "bf16"), ssm_state_bytes(c, "bf16")
        rows.append(f"{name:<34}" + "".join(f"{_mib(kv * n + state):>14}" for n in lengths))
    kv, state = kv_bytes_per_token(cfg, "bf16"), ssm_state_bytes(cfg, "bf16")
    rows.append(f"  (this model: {kv / 1024:.1f} KiB KV per token + {state / 2**20:.2f} MiB Mamba state; "
                f"Transformer: {kv_bytes_per_token(dense, 'bf16') / 1024:.1f} KiB KV per token)")
    return rows


def _tokens(n: int) -> str:
    return f"{n // 1024}K tokens" if n % 1024 == 0 else f"{n} tokens"


def _mib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def bits(nats: float) -> float:
    return nats / math.log(2)
