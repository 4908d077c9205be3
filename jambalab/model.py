"""The Jamba/Mamba/Transformer hybrid, in plain single-device PyTorch.

Legend: B batch, L new tokens, S attended length (cached + new), d d_model,
H heads, H_kv KV heads, hd head_dim, D d_inner, N d_state, R dt_rank,
K d_conv, E experts, F d_ff, T tokens (B*L), V vocab.

Numerics follow HF transformers 5.23 (modeling_jamba / modeling_mamba /
modeling_falcon_mamba), see shared/REFERENCE.md: same weights in, same logits out.
Paper: Jamba, arXiv 2403.19887 (Sec. 2 architecture, Sec. 6 ablations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from jambalab import ops
from jambalab.cache import AttentionState, HybridCache, MambaState, cache_fingerprint
from jambalab.config import JambaConfig
from jambalab.decode_step import decode_step
from jambalab.errors import InputError

# SDPA materialises at most this many mask entries per call; longer chunks are split by query rows.
_MAX_MASK_ELEMENTS = 1 << 25


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, L_kept, V) fp32; None when forward(..., return_logits=False)
    loss: torch.Tensor | None = None  # ce_loss + router_aux_loss_coef * aux_loss (when labels given)
    ce_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # router load-balancing loss (MoE models, when labels given)


# ---------------------------------------------------------------------------------------
# Norms, FFNs
# ---------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """HF op order: normalise in fp32, cast back, then scale. weight=False gives Falcon Mamba's weightless norm."""

    def __init__(self, dim: int, eps: float, weight: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)  # one kernel call in fp32 inference (38 per decode token)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up. Without autograd, computed in place in `gate` (a fresh projection output):
    two (T, F) temporaries fewer, ~15% of a dense MLP's time at 2048 tokens."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return F.silu(gate) * up
    return F.silu(gate, inplace=True).mul_(up)


class Linear(nn.Linear):
    """nn.Linear through ops.linear: a multithreaded GEMV kernel for decode-sized inputs (same parameters,
    same state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate_proj = Linear(d, f, bias=False)
        self.up_proj = Linear(d, f, bias=False)
        self.down_proj = Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        h = x.reshape(-1, x.shape[-1])  # (T, d)
        weights = (self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
        if ops.decode_fusable(h, *weights):  # decode-sized: the whole layer in one kernel call
            return ops.mlp_decode(h, *weights).view(x.shape), None
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x))), None


class MoE(nn.Module):
    """Sparse MoE (paper Sec. 2): softmax router, top-K weights NOT renormalised, SwiGLU experts.

    Experts are stacked (E, F, d) tensors; each expert runs only on the tokens routed to it
    (tokens are sorted by expert, gathered, computed, scattered back).
    """

    def __init__(self, d: int, f: int, n_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.router = Linear(d, n_experts, bias=False)
        self.w_gate = nn.Parameter(torch.empty(n_experts, f, d))
        self.w_up = nn.Parameter(torch.empty(n_experts, f, d))
        self.w_down = nn.Parameter(torch.empty(n_experts, d, f))

    @property
    def n_experts(self) -> int:
        return self.w_gate.shape[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        h = x.reshape(-1, shape[-1])  # (T, d)
        weights = (self.router.weight, self.w_gate, self.w_up, self.w_down)
        if ops.decode_fusable(h, *weights):  # decode-sized: router and experts in one kernel call
            out, router_logits = ops.moe_decode(h, *weights, self.top_k)
            return out.view(shape), router_logits
        router_logits = self.router(h)  # (T, E)
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # (T, K)
        out = self.dispatch(h, weights.to(h.dtype), experts)
        return out.view(shape), router_logits

    def dispatch(self, h: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        if h.shape[0] == 1:
            return self._one_token(h, weights, experts)
        flat = experts.reshape(-1)  # (T*K,)
        order = torch.argsort(flat, stable=True)  # token-slots grouped by expert, ascending
        token = order // self.top_k  # (T*K,) source token of each sorted slot
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        experts_w = self.expert_weights()
        outs = []
        # index_select, not h[token]: same rows, but its backward is index_add_ (3x faster than index_put_).
        for e, xs in enumerate(torch.split(h.index_select(0, token), counts)):
            if counts[e]:
                outs.append(self.expert(xs, *experts_w[e]))
        y = torch.cat(outs) * weights.reshape(-1)[order, None]  # (T*K, d)
        return torch.zeros_like(h).index_add_(0, token, y.to(h.dtype))

    def expert_weights(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(gate, up, down) of each expert. The stacks are unbound once per call: indexing W[e] inside
        the expert loop makes the backward ~6x slower. quant.QuantMoE returns quantized weights."""
        return list(zip(self.w_gate.unbind(0), self.w_up.unbind(0), self.w_down.unbind(0)))

    @staticmethod
    def expert(x: torch.Tensor, w_gate, w_up, w_down) -> torch.Tensor:
        """One SwiGLU expert on its tokens x (T_e, d) -> (T_e, d)."""
        return ops.linear(swiglu(ops.linear(x, w_gate), ops.linear(x, w_up)), w_down)

    def _one_token(self, h: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Batch-1 decode: run the token's K experts directly (a third of dispatch's ops, no sort or scatter).

        Summed in ascending expert order, as dispatch's index_add_ over sorted slots: bitwise the same.
        """
        ids = experts[0].tolist()
        experts_w = self.expert_weights()
        out = None
        for k in sorted(range(len(ids)), key=ids.__getitem__):
            y = self.expert(h, *experts_w[ids[k]]) * weights[0, k]
            out = y if out is None else out + y
        return out.to(h.dtype)


def router_aux_loss(router_logits: list[torch.Tensor], top_k: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Switch-style load balancing over all MoE layers, as HF: E * sum_e(frac_tokens_e * mean_prob_e).

    Counts and probabilities are pooled over layers before the product (HF's
    load_balancing_loss_func); padding positions (mask False) are excluded. Balanced routing gives K.
    """
    n_experts = router_logits[0].shape[-1]
    w = None if mask is None else mask.reshape(-1).float()
    counts = router_logits[0].new_zeros(n_experts, dtype=torch.float32)
    prob_sum = torch.zeros_like(counts)
    rows = 0.0
    for logits in router_logits:
        probs = F.softmax(logits.float(), dim=-1)  # (T, E)
        chosen = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)
        ones = torch.ones_like(chosen, dtype=torch.float32) if w is None else w.repeat_interleave(top_k)
        counts = counts + torch.zeros_like(counts).scatter_add_(0, chosen, ones)
        prob_sum = prob_sum + (probs if w is None else probs * w[:, None]).sum(0)
        rows = rows + (probs.shape[0] if w is None else w.sum())
    return n_experts * torch.sum((counts / rows) * (prob_sum / rows))


# ---------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------
def rope_rotate(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (half-split layout, as Llama in HF). x (B, H, L, hd), pos (B, L)."""
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd))  # (hd/2,)
    ang = pos.float()[..., None] * inv  # (B, L, hd/2)
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[:, None], torch.cat([ang.sin(), ang.sin()], -1)[:, None]
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    """Causal GQA attention via SDPA. No positional encoding unless config.rope (paper Sec. 2, Table 8)."""

    def __init__(self, cfg: JambaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.rope_theta = cfg.rope_theta if cfg.rope else None
        self.q_proj = Linear(cfg.d_model, cfg.n_heads * self.hd, bias=False)
        self.k_proj = Linear(cfg.d_model, cfg.n_kv_heads * self.hd, bias=False)
        self.v_proj = Linear(cfg.d_model, cfg.n_kv_heads * self.hd, bias=False)
        self.o_proj = Linear(cfg.n_heads * self.hd, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, state: AttentionState | None, past: int | torch.Tensor,
                key_mask: torch.Tensor | None, pos: torch.Tensor | None) -> torch.Tensor:
        bsz, length, _ = x.shape
        q = self.q_proj(x).view(bsz, length, self.n_heads, self.hd).transpose(1, 2)  # (B, H, L, hd)
        k = self.k_proj(x).view(bsz, length, self.n_kv, self.hd).transpose(1, 2)  # (B, H_kv, L, hd)
        v = self.v_proj(x).view(bsz, length, self.n_kv, self.hd).transpose(1, 2)
        if self.rope_theta is not None:
            q, k = rope_rotate(q, pos, self.rope_theta), rope_rotate(k, pos, self.rope_theta)
        if torch.is_tensor(past):  # a ragged batch (the serving engine's slots)
            y = attend_rows(q, k, v, state, past.tolist())
        else:
            if state is not None:
                k, v = state.append(k, v, past)  # (B, H_kv, S, hd)
            y = attend(q, k, v, past, key_mask)  # (B, H, L, hd)
        return self.o_proj(y.transpose(1, 2).reshape(bsz, length, -1))


def attend_rows(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, state, past: list[int]) -> torch.Tensor:
    """A ragged batch: row b's L queries sit at positions past[b].. and see only its own past[b] + L keys.

    state.append_rows writes each row's new K/V at its own offset and returns per-row views
    (1, H_kv, past[b] + L, hd) (jambalab.serve.slots.SlotBatch); each row then takes attend's
    batch-1 path, the same kernels as the sequence alone, with no padding and no mask."""
    rows = state.append_rows(k_new, v_new, past)
    return torch.cat([attend(q[b:b + 1], k, v, past[b], None) for b, (k, v) in enumerate(rows)])  # (B, H, L, hd)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Causal attention of L new queries (absolute positions past..past+L) over S = past+L keys."""
    length, s = q.shape[2], k.shape[2]
    if key_mask is None and past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if key_mask is None and length == 1:
        return _attend_one_query(q, k, v)
    if key_mask is None and _split_attention_ok(q, k, v):
        return _attend_past_and_new(q, k, v, past)
    # Explicit boolean mask (B, 1, l, S), built per block of query rows to bound its size.
    step = max(1, _MAX_MASK_ELEMENTS // max(s, 1))
    outs = []
    for i in range(0, length, step):
        qi = q[:, :, i:i + step]
        rows = past + i + torch.arange(qi.shape[2], device=q.device)  # absolute query positions
        mask = torch.arange(s, device=q.device)[None, :] <= rows[:, None]  # (l, S) causal
        mask = mask[None, None]
        if key_mask is not None:
            mask = mask & key_mask[:, None, None, :s]
            # A padding query may see no valid key; let it see itself so softmax stays finite.
            mask = mask | (torch.arange(s, device=q.device)[None, :] == rows[:, None])[None, None]
        outs.append(F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, enable_gqa=True))
    return torch.cat(outs, dim=2)


# torch's CPU flash-attention kernel, which also returns the log-sum-exp of each query row; a
# private aten op, so its absence (another torch) falls back to the masked path.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _split_attention_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    # Inference only: the op's backward ignores the gradient reaching its log-sum-exp output,
    # which the merge below needs.
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return _FLASH_CPU is not None and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) \
        and not needs_grad


def _attend_one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Decode: one query per head (B, H, 1, hd) over all S keys, every one visible.

    fp32: ops.decode_attention (csrc/attention.cpp reads each cached K/V row once, the keys split
    over the threads; its twin, and the path under autograd, is SDPA with enable_gqa). bf16 on the
    CPU: one flash call with the GQA group folded into the query axis, (B, H_kv, H/H_kv, hd).
    At 64K-256K cached tokens both beat SDPA with enable_gqa (docs/inference.md)."""
    bsz, heads, _, hd = q.shape
    if q.dtype == torch.float32:
        return ops.decode_attention(q[:, :, 0], k, v)[:, :, None]
    if _split_attention_ok(q, k, v):
        h_kv = k.shape[1]
        out, _ = _FLASH_CPU(q.reshape(bsz, h_kv, heads // h_kv, hd), k, v)  # (B, H_kv, group, hd)
        return out.reshape(bsz, heads, 1, hd)
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def _attend_past_and_new(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
    """A chunk of L queries after `past` cached tokens, without a (L, S) mask.

    The keys split in two: the cached ones [0, past), which every query sees (no mask, so the
    GQA group folds into the query axis and K/V are never repeated), and the chunk's own
    [past, S), a square causal block. Each half runs in the flash kernel; the halves merge by their
    log-sum-exps. The masked path costs ~1.7x more at 32K-128K cached tokens (one (L, S) score
    block per head) and its mask alone would be L*S bytes."""
    bsz, heads, length, hd = q.shape
    h_kv = k.shape[1]
    group = heads // h_kv
    o_new, lse_new = _FLASH_CPU(q, k[:, :, past:].repeat_interleave(group, 1),
                                v[:, :, past:].repeat_interleave(group, 1), is_causal=True)  # (B, H, L, hd), (B, H, L)
    if past == 0:
        return o_new
    o_old, lse_old = _FLASH_CPU(q.reshape(bsz, h_kv, group * length, hd), k[:, :, :past], v[:, :, :past])
    o_old, lse_old = o_old.reshape(bsz, heads, length, hd), lse_old.reshape(bsz, heads, length)
    top = torch.maximum(lse_old, lse_new)
    w_old, w_new = (lse_old - top).exp(), (lse_new - top).exp()  # fp32 (B, H, L)
    out = (o_old.float() * w_old[..., None] + o_new.float() * w_new[..., None]) / (w_old + w_new)[..., None]
    return out.to(q.dtype)


# ---------------------------------------------------------------------------------------
# Mamba mixer
# ---------------------------------------------------------------------------------------
class MambaMixer(nn.Module):
    """Mamba-1 selective SSM mixer (HF op order, REFERENCE.md "Forward computation")."""

    def __init__(self, cfg: JambaConfig):
        super().__init__()
        d, D, N, R = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.d_inner, self.d_state, self.dt_rank = D, N, R
        self.in_proj = Linear(d, 2 * D, bias=cfg.mamba_proj_bias)
        self.conv1d = nn.Conv1d(D, D, cfg.d_conv, groups=D, padding=cfg.d_conv - 1, bias=cfg.mamba_conv_bias)
        self.x_proj = Linear(D, R + 2 * N, bias=False)
        self.dt_proj = Linear(R, D, bias=True)
        self.A_log = nn.Parameter(torch.empty(D, N))
        self.D = nn.Parameter(torch.empty(D))
        self.out_proj = Linear(D, d, bias=cfg.mamba_proj_bias)
        if cfg.mamba_inner_norm == "none":
            self.dt_norm = self.b_norm = self.c_norm = None
        else:
            learn = cfg.mamba_inner_norm == "learnable"
            eps = cfg.mamba_inner_norm_eps
            self.dt_norm, self.b_norm, self.c_norm = RMSNorm(R, eps, learn), RMSNorm(N, eps, learn), RMSNorm(N, eps, learn)

    def forward(self, x: torch.Tensor, state: MambaState | None, mask: torch.Tensor | None) -> torch.Tensor:
        if state is not None and x.shape[1] == 1 and mask is None:
            args, norms = self._decode_args(x[:, 0], state), self._inner_norm_weights()
            if ops.decode_fusable(*args, *(norms or ())):  # the whole mixer for one token in one kernel call
                return ops.mamba_decode(*args[:7], norms, self._norm_eps(), *args[7:])[:, None]
        dtype = x.dtype
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, L, D) each
        if mask is not None:
            # Padding must not reach the conv or SSM state; masked after in_proj so its bias cannot leak either.
            xs = xs * mask[..., None].to(dtype)
        conv_w = self.conv1d.weight.squeeze(1)  # (D, K)
        if state is not None and x.shape[1] == 1:
            return self._step(xs[:, 0], z[:, 0], state, conv_w, None if mask is None else mask[:, 0])[:, None]
        xc = ops.causal_conv1d(xs, conv_w, self.conv1d.bias, None if state is None else state.conv)  # (B, L, D)
        if state is not None:
            ops.conv_state_update(state.conv, xs)
        if mask is not None:
            xc = xc * mask[..., None].to(dtype)
        dt, B, C = self._dt_b_c(xc)
        y, h = ops.selective_scan(xc, dt, self.A(), B, C, self.D, z, None if state is None else state.ssm)
        if state is not None:
            state.ssm.copy_(h)
        return self.out_proj(y.to(dtype))

    def A(self) -> torch.Tensor:
        """-exp(A_log) in fp32, (D, N). Without autograd it is kept until A_log changes (its version
        counter, storage or dtype): a decode step would otherwise recompute it in every Mamba layer."""
        a_log = self.A_log
        if torch.is_grad_enabled():
            return -torch.exp(a_log.float())
        key = (a_log._version, a_log.data_ptr(), a_log.dtype, a_log.device)
        cached = self.__dict__.get("_A_cached")
        if cached is None or cached[0] != key:
            cached = (key, -torch.exp(a_log.detach().float()))
            self.__dict__["_A_cached"] = cached
        return cached[1]

    def _dt_b_c(self, xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dt, B, C = torch.split(self.x_proj(xc), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.dt_norm is not None:
            dt, B, C = self.dt_norm(dt), self.b_norm(B), self.c_norm(C)
        dt = ops.linear(dt, self.dt_proj.weight)  # bias added after, in dt's dtype, as HF
        dt = ops.dt_softplus(dt, self.dt_proj.bias)  # softplus(dt + bias): (B, L, D)
        return dt, B, C

    def _decode_args(self, x: torch.Tensor, state: MambaState) -> tuple[torch.Tensor | None, ...]:
        """ops.mamba_decode's tensors, less the inner norms (x (B, d) first, as decode_fusable wants)."""
        return (x, self.in_proj.weight, self.in_proj.bias, state.conv, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                self.x_proj.weight, self.dt_proj.weight, self.dt_proj.bias, self.A(), self.D, state.ssm,
                self.out_proj.weight, self.out_proj.bias)

    def _inner_norm_weights(self) -> tuple[torch.Tensor | None, ...] | None:
        if self.dt_norm is None:
            return None
        return self.dt_norm.weight, self.b_norm.weight, self.c_norm.weight

    def _norm_eps(self) -> float:
        return self.dt_norm.eps if self.dt_norm is not None else 0.0

    def _step(self, xs: torch.Tensor, z: torch.Tensor, state: MambaState, conv_w: torch.Tensor,
              mask: torch.Tensor | None) -> torch.Tensor:
        """One decode token: xs, z (B, D) -> (B, d)."""
        xc = ops.causal_conv1d_update(xs, state.conv, conv_w, self.conv1d.bias)  # (B, D)
        if mask is not None:
            xc = xc * mask[:, None].to(xc.dtype)
        dt, B, C = self._dt_b_c(xc)
        y = ops.selective_state_update(state.ssm, xc, dt, self.A(), B, C, self.D, z)  # (B, D)
        return self.out_proj(y)


# ---------------------------------------------------------------------------------------
# Blocks and the stack
# ---------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm layer: h += mixer(norm1(h)); h += ffn(norm2(h)) (no FFN in Mamba-style blocks)."""

    def __init__(self, cfg: JambaConfig, i: int):
        super().__init__()
        self.is_attention = cfg.is_attention(i)
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = Attention(cfg) if self.is_attention else MambaMixer(cfg)
        if cfg.d_ff == 0:
            self.norm2 = self.ffn = None
        else:
            self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.ffn = MoE(cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.top_k) if cfg.is_moe(i) else MLP(cfg.d_model, cfg.d_ff)

    def forward(self, h: torch.Tensor, state, past: int | torch.Tensor, key_mask: torch.Tensor | None,
                mask: torch.Tensor | None, pos: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        residual = h.float() if self.residual_in_fp32 else h
        x = self.norm1(h.to(self.norm1.weight.dtype))
        x = self.mixer(x, state, past, key_mask, pos) if self.is_attention else self.mixer(x, state, mask)
        h = residual + x
        if self.ffn is None:
            return h, None
        y, router_logits = self.ffn(self.norm2(h))
        return h + y, router_logits


class JambaLM(nn.Module):
    """The causal LM. forward(input_ids, labels=None, cache=None, attention_mask=None, logits_to_keep=0,
    return_logits=True)."""

    def __init__(self, config: JambaConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: JambaConfig, seed: int | None = None, dtype: torch.dtype = torch.float32) -> JambaLM:
        """A randomly initialised model."""
        if seed is not None:
            torch.manual_seed(seed)
        model = cls(config)
        model.init_weights()
        return model.to(dtype)

    @classmethod
    def on_meta(cls, config: JambaConfig) -> JambaLM:
        """Shapes only, no memory: for counting parameters of full-size models."""
        with torch.device("meta"):
            return cls(config)

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, MoE):
                for w in (m.w_gate, m.w_up, m.w_down):
                    nn.init.normal_(w, std=std)
            elif isinstance(m, RMSNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
        for m in self.modules():
            if isinstance(m, MambaMixer):
                _init_mamba(m)

    # ---- forward -------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, cache: HybridCache | None = None,
                attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0,
                return_logits: bool = True) -> ModelOutput:
        """input_ids (B, L). attention_mask (B, L) marks real tokens (False/0 = padding) of THIS call;
        with a cache, earlier calls' masks are remembered. logits_to_keep > 0 computes only the last
        that many positions' logits (prefill needs one). return_logits=False with labels (training)
        returns the loss only: the lm_head and the loss run in row chunks (ops.linear_cross_entropy)
        and the (B, L, V) logits and their gradient are never held. A cache whose `length` is a (B,)
        tensor is a ragged batch (jambalab.serve.slots.SlotBatch): each row continues at its own length."""
        self._check_inputs(input_ids, cache, attention_mask)
        if cache is not None and labels is None and attention_mask is None:
            logits = decode_step(self, input_ids, cache)  # one token per row: every layer in one kernel call
            if logits is not None:
                return ModelOutput(logits=logits)
        past = 0 if cache is None else cache.length
        mask = None if attention_mask is None else attention_mask.bool()
        key_mask = cache.extend_mask(mask, input_ids.shape[1]) if cache is not None else mask
        pos = self._positions(input_ids, past, key_mask) if self.config.rope else None

        h = self.embed(input_ids)  # (B, L, d)
        router_logits = []
        for i, block in enumerate(self.layers):
            h, rl = block(h, None if cache is None else cache.layers[i], past, key_mask, mask, pos)
            if rl is not None:
                router_logits.append(rl)
        if cache is not None:
            cache.length += input_ids.shape[1]
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        h = self.norm_f(h).to(self.embed.weight.dtype)  # (B, L, d), the model's float dtype (the head may be int8)
        if labels is not None and not return_logits and type(self.lm_head) is Linear:
            return self._with_loss(None, h, labels, router_logits, mask)
        logits = self.lm_head(h).float()  # (B, L, V)
        return self._with_loss(logits, h, labels, router_logits, mask)

    def _with_loss(self, logits, h, labels, router_logits, mask) -> ModelOutput:
        """The loss from the logits (B, L, V), or, with logits None, from the final hidden states h
        (B, L, d) through the lm_head and the loss in chunks."""
        if labels is None:
            # No loss asked for: skip the aux loss too (a softmax, top-k and scatter per MoE layer,
            # a fifth of a decode step's ops in bench-hybrid).
            return ModelOutput(logits=logits)
        aux = router_aux_loss(router_logits, self.config.top_k, mask) if router_logits else None
        if labels.shape != h.shape[:2]:
            raise InputError(f"labels shape {tuple(labels.shape)} does not match the logits' {tuple(h.shape[:2])}")
        # Shift the labels, not the logits (as HF): slicing the logits makes autograd zero-fill and copy
        # a full (B, L, V) gradient (128 MiB each at 1 x 512 x 65536 fp32).
        shifted = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)  # (B*L,): position t predicts token t+1
        if logits is None:
            ce = ops.linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.lm_head.weight, shifted, ignore_index=-100)
        else:
            ce = ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted, ignore_index=-100)
        loss = ce if aux is None else ce + self.config.router_aux_loss_coef * aux
        return ModelOutput(logits=logits, loss=loss, ce_loss=ce, aux_loss=aux)

    @staticmethod
    def _positions(input_ids: torch.Tensor, past: int | torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        bsz, length = input_ids.shape
        if key_mask is None:  # past: an int, or per-row lengths (B,) of a ragged batch
            start = torch.as_tensor(past, device=input_ids.device).reshape(-1, 1)  # (1 or B, 1)
            return (start + torch.arange(length, device=input_ids.device)).expand(bsz, length)
        # Left padding: a row's positions count only its real tokens.
        return (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + length]

    def _check_inputs(self, input_ids, cache, attention_mask) -> None:
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise InputError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.numel() == 0:
            raise InputError(f"input_ids is empty (shape {tuple(input_ids.shape)})")
        lo, hi = (int(v) for v in torch.aminmax(input_ids))
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if cache is not None:
            if cache.fingerprint != cache_fingerprint(self.config):
                raise InputError(f"cache was built for another model ({cache.fingerprint}), "
                                 f"this model is {cache_fingerprint(self.config)}")
            if cache.batch_size != input_ids.shape[0]:
                raise InputError(f"cache batch size {cache.batch_size} != input batch size {input_ids.shape[0]}")

    # ---- inference helpers -------------------------------------------------------------
    def allocate_cache(self, batch_size: int, max_length: int = 0, dtype: torch.dtype | None = None) -> HybridCache:
        """An empty cache for batch_size sequences; KV grows past max_length as needed."""
        p = next(self.parameters())
        return HybridCache.allocate(self.config, batch_size, dtype or _compute_dtype(self), p.device, max_length)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Prompt + new tokens, like transformers; arguments as jambalab.generate.generate."""
        from jambalab.generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    # ---- counting ----------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are yielded once

    def num_active_parameters(self) -> int:
        """Parameters touched per token: all but the (E - K) unrouted experts of each MoE layer."""
        n = self.num_parameters()
        for m in self.modules():
            if isinstance(m, MoE):
                per_expert = (m.w_gate.numel() + m.w_up.numel() + m.w_down.numel()) // m.n_experts
                n -= (m.n_experts - m.top_k) * per_expert
        return n

    # ---- persistence (HF format) ---------------------------------------------------------
    def save_pretrained(self, path) -> None:
        from jambalab.hf import save_pretrained

        save_pretrained(self, path)


def _compute_dtype(model: nn.Module) -> torch.dtype:
    return model.embed.weight.dtype if isinstance(model, JambaLM) else next(model.parameters()).dtype


@torch.no_grad()
def _init_mamba(m: MambaMixer, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
    """Mamba's S4D-real init: A = -(1..N), D = 1, dt log-uniform in [dt_min, dt_max] via the bias."""
    n = m.A_log.shape[1]
    m.A_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand_as(m.A_log))
    m.D.fill_(1.0)
    nn.init.uniform_(m.dt_proj.weight, -m.dt_rank ** -0.5, m.dt_rank ** -0.5)
    dt = torch.exp(torch.rand(m.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
    m.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
    nn.init.kaiming_uniform_(m.conv1d.weight, a=math.sqrt(5))
    if m.conv1d.bias is not None:
        m.conv1d.bias.uniform_(-0.5, 0.5)
