"""The inference cache: an explicit object the caller owns and passes to the model.

Legend: B batch, H_kv KV heads, S cached length, hd head_dim, D d_inner,
K d_conv, N d_state.

Only attention layers keep K/V (growing with the context); Mamba layers keep a
constant-size conv state (B, D, K) and an fp32 SSM state (B, D, N). This is
why a 1:7 hybrid's cache is ~8x smaller than a Transformer's (paper Table 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from jambalab.errors import CheckpointError, InputError


@dataclass
class AttentionState:
    k: torch.Tensor  # (B, H_kv, capacity, hd)
    v: torch.Tensor  # (B, H_kv, capacity, hd)

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, H_kv, L, hd) at [start, start+L) and return views of [0, start+L)."""
        end = start + k_new.shape[2]
        if end > self.k.shape[2]:
            self._grow(end)
        self.k[:, :, start:end] = k_new
        self.v[:, :, start:end] = v_new
        return self.k[:, :, :end], self.v[:, :, :end]

    def reserve(self, length: int) -> None:
        """Room for `length` positions (jambalab.decode_step writes the next one in place)."""
        if length > self.k.shape[2]:
            self._grow(length)

    def _grow(self, needed: int) -> None:
        # Amortised doubling: a chunked prefill of n tokens copies O(n) bytes in total.
        cap = max(needed, 2 * self.k.shape[2], 16)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[0], old.shape[1], cap, old.shape[3])
            new[:, :, : old.shape[2]] = old
            setattr(self, name, new)


@dataclass
class MambaState:
    conv: torch.Tensor  # (B, D, K): the last K pre-conv inputs
    ssm: torch.Tensor  # (B, D, N) fp32


class HybridCache:
    """Per-layer states for a batch of sequences that all have seen `length` positions.

    `key_mask` (B, capacity) marks which cached positions are real tokens (False for
    left padding); None means every position is real.
    """

    def __init__(self, layers: list[AttentionState | MambaState], length: int = 0,
                 key_mask: torch.Tensor | None = None, fingerprint: str = ""):
        self.layers = layers
        self.length = length
        self.key_mask = key_mask
        self.fingerprint = fingerprint  # which model shape this cache was built for

    # ---- construction --------------------------------------------------------------
    @classmethod
    def allocate(cls, config, batch_size: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 max_length: int = 0) -> HybridCache:
        if batch_size <= 0:
            raise InputError(f"cache batch_size must be positive, got {batch_size}")
        layers: list[AttentionState | MambaState] = []
        for i in range(config.n_layers):
            if config.is_attention(i):
                shape = (batch_size, config.n_kv_heads, max(max_length, 0), config.head_dim)
                layers.append(AttentionState(torch.zeros(shape, dtype=dtype, device=device),
                                             torch.zeros(shape, dtype=dtype, device=device)))
            else:
                layers.append(MambaState(
                    torch.zeros(batch_size, config.d_inner, config.d_conv, dtype=dtype, device=device),
                    torch.zeros(batch_size, config.d_inner, config.d_state, dtype=torch.float32, device=device)))
        return cls(layers, 0, None, cache_fingerprint(config))

    # ---- facts -----------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        first = self.layers[0]
        return (first.k if isinstance(first, AttentionState) else first.ssm).shape[0]

    def nbytes(self) -> int:
        """Bytes held for the positions seen so far (KV up to `length`, plus all Mamba state)."""
        total = 0
        for st in self.layers:
            if isinstance(st, AttentionState):
                b, h, _, hd = st.k.shape
                total += 2 * b * h * self.length * hd * st.k.element_size()
            else:
                total += st.conv.numel() * st.conv.element_size() + st.ssm.numel() * st.ssm.element_size()
        return total

    def kv_bytes(self) -> int:
        return sum(2 * st.k.shape[0] * st.k.shape[1] * self.length * st.k.shape[3] * st.k.element_size()
                   for st in self.layers if isinstance(st, AttentionState))

    def state_bytes(self) -> int:
        return self.nbytes() - self.kv_bytes()

    # ---- mask bookkeeping -------------------------------------------------------------
    def extend_mask(self, mask: torch.Tensor | None, new_len: int) -> torch.Tensor | None:
        """Record the validity of the next new_len positions; returns the mask over [0, length+new_len)."""
        if mask is None and self.key_mask is None:
            return None
        bsz, end = self.batch_size, self.length + new_len
        if self.key_mask is None:
            self.key_mask = torch.ones(bsz, self.length, dtype=torch.bool, device=mask.device)
        if self.key_mask.shape[1] < end:
            grown = torch.ones(bsz, max(end, 2 * self.key_mask.shape[1]), dtype=torch.bool, device=self.key_mask.device)
            grown[:, : self.key_mask.shape[1]] = self.key_mask
            self.key_mask = grown
        self.key_mask[:, self.length:end] = True if mask is None else mask.bool()
        return self.key_mask[:, :end]

    # ---- batch surgery, copies, files ---------------------------------------------------
    def select(self, rows: torch.Tensor | list[int]) -> HybridCache:
        """A new cache holding the given batch rows (in that order; repeats allowed)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.batch_size):
            raise InputError(f"cache rows {idx.tolist()} out of range for batch size {self.batch_size}")
        layers = [AttentionState(s.k[idx].clone(), s.v[idx].clone()) if isinstance(s, AttentionState)
                  else MambaState(s.conv[idx].clone(), s.ssm[idx].clone()) for s in self.layers]
        mask = None if self.key_mask is None else self.key_mask[idx].clone()
        return HybridCache(layers, self.length, mask, self.fingerprint)

    def copy(self) -> HybridCache:
        """A deep copy: continue several generations from one shared prefix state."""
        return self.select(list(range(self.batch_size)))

    def expand(self, n: int) -> HybridCache:
        """Repeat a batch-1 cache n times (one prefix, n continuations)."""
        if self.batch_size != 1:
            raise InputError(f"expand needs a batch-1 cache, this one has batch size {self.batch_size}")
        return self.select([0] * n)

    def save(self, path: str | Path) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for i, s in enumerate(self.layers):
            if isinstance(s, AttentionState):
                tensors[f"{i}.k"] = s.k[:, :, : self.length].contiguous()
                tensors[f"{i}.v"] = s.v[:, :, : self.length].contiguous()
            else:
                tensors[f"{i}.conv"], tensors[f"{i}.ssm"] = s.conv.contiguous(), s.ssm.contiguous()
        if self.key_mask is not None:
            tensors["key_mask"] = self.key_mask[:, : self.length].contiguous()
        torch.save({"format": "jambalab-cache-1", "length": self.length, "fingerprint": self.fingerprint,
                    "tensors": tensors}, Path(path))

    @classmethod
    def load(cls, path: str | Path, config=None) -> HybridCache:
        path = Path(path)
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"cache file {path} does not exist") from None
        except Exception as e:  # torch raises many types for a corrupt pickle/zip
            raise CheckpointError(f"cache file {path} is corrupt or not a jambalab cache: {e}") from None
        if not isinstance(blob, dict) or blob.get("format") != "jambalab-cache-1":
            raise CheckpointError(f"cache file {path} is not a jambalab cache (format tag missing)")
        if config is not None and blob["fingerprint"] != cache_fingerprint(config):
            raise CheckpointError(f"cache file {path} was built for another model shape "
                                  f"({blob['fingerprint']} vs {cache_fingerprint(config)})")
        t = blob["tensors"]
        layers: list[AttentionState | MambaState] = []
        i = 0
        while f"{i}.k" in t or f"{i}.conv" in t:
            layers.append(AttentionState(t[f"{i}.k"], t[f"{i}.v"]) if f"{i}.k" in t
                          else MambaState(t[f"{i}.conv"], t[f"{i}.ssm"]))
            i += 1
        return cls(layers, int(blob["length"]), t.get("key_mask"), blob["fingerprint"])


def cache_fingerprint(config) -> str:
    """What a cache must agree on with the model that uses it."""
    return (f"L{config.n_layers}:{''.join('A' if config.is_attention(i) else 'M' for i in range(config.n_layers))}"
            f":kv{config.n_kv_heads}x{config.head_dim}:D{config.d_inner}:K{config.d_conv}:N{config.d_state}")
