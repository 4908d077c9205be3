"""The slot cache: max_batch rows, each holding one sequence with its own length.

Legend: B rows in a step, H_kv KV heads, S a row's length, hd head_dim, D d_inner, K d_conv,
N d_state.

Mamba layers keep one (n_slots, D, K) conv and (n_slots, D, N) fp32 SSM tensor: rows are
independent, so a slot is reset or overwritten without touching the others. Attention layers
keep a separate (1, H_kv, capacity, hd) K/V pair per slot, sized when the slot opens (the
request's prompt + max_tokens): KV memory is the sum of what the running requests reserved,
never n_slots x the longest one, and a row attends over its own length only (no padding).

A step's model call sees either one slot as a plain batch-1 HybridCache (prefill: the very
calls `generate` makes) or several slots as a SlotBatch (decode: one batched forward, each
row's attention on its own keys, see jambalab.model.attend_rows).
"""

from __future__ import annotations

import torch

from jambalab.cache import AttentionState, HybridCache, MambaState, cache_fingerprint


class SlotBatch:
    """The cache a ragged batched forward sees: the given slots in order, `length` their (B,) lengths."""

    def __init__(self, layers: list, lengths: list[int], fingerprint: str, gathered: bool):
        self.layers = layers  # SlotRows for attention layers, MambaState (B rows) for Mamba layers
        self.length = torch.tensor(lengths, dtype=torch.long)  # (B,)
        self.fingerprint = fingerprint
        self.batch_size = len(lengths)
        self.gathered = gathered  # Mamba rows are copies (scatter them back), not views

    def extend_mask(self, mask: torch.Tensor | None, new_len: int) -> None:
        # Rows never carry padding; the forward's per-row lengths say which keys each row sees.
        assert mask is None, "a ragged batch takes no attention_mask"
        return None


class SlotRows:
    """One attention layer's K/V for the rows of a SlotBatch (one batch-1 AttentionState each)."""

    def __init__(self, states: list[AttentionState]):
        self.states = states

    def append_rows(self, k_new: torch.Tensor, v_new: torch.Tensor,
                    starts: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """k_new, v_new (B, H_kv, L, hd): row b written at [starts[b], starts[b] + L) of its own slot."""
        return [st.append(k_new[b:b + 1], v_new[b:b + 1], starts[b]) for b, st in enumerate(self.states)]


class SlotCache:
    def __init__(self, model, n_slots: int):
        cfg = model.config
        p = model.embed.weight
        self.config, self.n_slots, self.dtype, self.device = cfg, n_slots, p.dtype, p.device
        self.fingerprint = cache_fingerprint(cfg)
        self.attention = [cfg.is_attention(i) for i in range(cfg.n_layers)]
        self.conv = {i: torch.zeros(n_slots, cfg.d_inner, cfg.d_conv, dtype=p.dtype, device=p.device)
                     for i, a in enumerate(self.attention) if not a}  # layer -> (n_slots, D, K)
        self.ssm = {i: torch.zeros(n_slots, cfg.d_inner, cfg.d_state, dtype=torch.float32, device=p.device)
                    for i, a in enumerate(self.attention) if not a}  # layer -> (n_slots, D, N) fp32
        self.kv: list[dict[int, AttentionState] | None] = [None] * n_slots  # slot -> layer -> K/V
        self.lengths = [0] * n_slots

    @property
    def has_attention(self) -> bool:
        return any(self.attention)

    # ---- opening and closing slots -----------------------------------------------------
    def open(self, slot: int, capacity: int) -> None:
        """An empty sequence in `slot`, with room for `capacity` KV positions (it never grows past)."""
        shape = (1, self.config.n_kv_heads, capacity, self.config.head_dim)
        self.kv[slot] = {i: AttentionState(torch.empty(shape, dtype=self.dtype, device=self.device),
                                           torch.empty(shape, dtype=self.dtype, device=self.device))
                         for i, a in enumerate(self.attention) if a}
        for i in self.conv:
            self.conv[i][slot].zero_()
            self.ssm[i][slot].zero_()
        self.lengths[slot] = 0

    def close(self, slot: int) -> None:
        self.kv[slot] = None  # the KV memory goes back to the allocator now
        self.lengths[slot] = 0

    # ---- what the model sees -------------------------------------------------------------
    def row_cache(self, slot: int) -> HybridCache:
        """Slot `slot` as a batch-1 HybridCache (views: the model's writes land in the slot)."""
        layers = [self.kv[slot][i] if a else MambaState(self.conv[i][slot:slot + 1], self.ssm[i][slot:slot + 1])
                  for i, a in enumerate(self.attention)]
        return HybridCache(layers, self.lengths[slot], None, self.fingerprint)

    def batch(self, slots: list[int]) -> SlotBatch:
        """The given slots as one ragged batch. Mamba rows are views when the slots are consecutive,
        else gathered copies that scatter_back() writes home after the forward."""
        consecutive = slots == list(range(slots[0], slots[0] + len(slots)))
        rows = slice(slots[0], slots[0] + len(slots)) if consecutive else torch.tensor(slots)
        layers = [SlotRows([self.kv[s][i] for s in slots]) if a else MambaState(self.conv[i][rows], self.ssm[i][rows])
                  for i, a in enumerate(self.attention)]
        return SlotBatch(layers, [self.lengths[s] for s in slots], self.fingerprint, not consecutive)

    def scatter_back(self, batch: SlotBatch, slots: list[int]) -> None:
        if not batch.gathered:
            return
        idx = torch.tensor(slots)
        for i, st in enumerate(batch.layers):
            if isinstance(st, MambaState):
                self.conv[i][idx] = st.conv
                self.ssm[i][idx] = st.ssm

    # ---- checkpoints (the prefix-state cache's unit) --------------------------------------
    def snapshot(self, slot: int) -> HybridCache:
        """A batch-1 copy of the slot's whole state: KV up to its length, every Mamba row."""
        n = self.lengths[slot]
        layers = [AttentionState(self.kv[slot][i].k[:, :, :n].clone(), self.kv[slot][i].v[:, :, :n].clone()) if a
                  else MambaState(self.conv[i][slot:slot + 1].clone(), self.ssm[i][slot:slot + 1].clone())
                  for i, a in enumerate(self.attention)]
        return HybridCache(layers, n, None, self.fingerprint)

    def snapshot_nbytes(self, slot: int) -> int:
        """What snapshot(slot) would hold, without copying anything."""
        cfg, n = self.config, self.lengths[slot]
        kv = 2 * cfg.n_kv_heads * cfg.head_dim * n * self.dtype.itemsize * sum(self.attention)
        return kv + sum(self.conv[i][0].nbytes + self.ssm[i][0].nbytes for i in self.conv)

    def restore(self, slot: int, state: HybridCache) -> None:
        """Write a snapshot into an open slot (its capacity must hold state.length positions)."""
        n = state.length
        for i, st in enumerate(state.layers):
            if isinstance(st, AttentionState):
                self.kv[slot][i].k[:, :, :n] = st.k[:, :, :n]
                self.kv[slot][i].v[:, :, :n] = st.v[:, :, :n]
            else:
                self.conv[i][slot:slot + 1] = st.conv
                self.ssm[i][slot:slot + 1] = st.ssm
        self.lengths[slot] = n
