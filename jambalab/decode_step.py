"""A whole decode token in one kernel call: the arguments of ops.decode_step (csrc/step.cpp).

Legend: R rows (1-16), L layers, V vocab.

JambaLM.forward takes this path for one new token per row of a float32 CPU model without RoPE,
on a cache already holding a prefix, without padding: a plain cache (every row at the same
position) or the serving engine's ragged SlotBatch (each row at its own length, its own K/V
tensors), outside autograd; anything else (bf16 / int8 / int4 weights, swapped modules, a padded
prompt, grad mode, more than 16 rows) returns None here and the model decodes layer by layer,
which is the twin: the logits of both paths are bitwise equal (tests/test_decode_step.py).

The tensors are gathered once per model into a DecodePlan, kept until a module or parameter is
registered anywhere (a global nn.Module hook counts those: quantize_model's module swaps, a
replaced weight) or the model's dtype or device changes; a step then only adds the cache's
states and each Mamba layer's A = -exp(A_log) (kept by the mixer until A_log changes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from jambalab import ops

_SLOTS_MIXER = 14  # csrc/step.cpp: per layer norm1, norm2, 14 mixer slots, 4 FFN slots
_SLOTS_FFN = 4
_EMPTY = torch.empty(0)  # an absent weight or bias
_MAX_ROWS = 16  # kMaxRows in csrc/step.cpp
_MAX_GROUP = 64  # query heads per KV head (kMaxGroup in csrc/attention.cpp)

_registrations = [0]  # bumped by the hooks below: any module or parameter registered, in any model


def _bump(*_) -> None:
    _registrations[0] += 1


nn.modules.module.register_module_module_registration_hook(_bump)
nn.modules.module.register_module_parameter_registration_hook(_bump)


@dataclass
class DecodePlan:
    weights: list[torch.Tensor]  # csrc/step.cpp's layout; the A slots are refilled every step
    meta: list[int]  # n_heads, n_kv_heads, head_dim, then 4 ints per layer
    eps: list[float]  # the model's norm eps, the Mamba inner norms' eps
    attention: list[bool]  # per layer
    a_slots: list[tuple[int, nn.Module]]  # (index in weights, MambaMixer) of every A
    key: tuple


def decode_step(model, input_ids: torch.Tensor, cache) -> torch.Tensor | None:
    """Logits (B, 1, V) of one new token per row, the cache advanced by one; None if this path
    does not take the inputs (the caller then runs the layers one by one)."""
    bsz, length = input_ids.shape
    if (length != 1 or not 1 <= bsz <= _MAX_ROWS or torch.is_grad_enabled()
            or getattr(cache, "key_mask", None) is not None or not input_ids.is_cpu):
        return None
    ragged = torch.is_tensor(cache.length)  # jambalab.serve.slots.SlotBatch: per-row lengths (B,)
    past = cache.length.tolist() if ragged else [cache.length] * bsz
    if min(past) == 0:
        return None
    plan = _plan(model)
    if plan is None:
        return None
    states = []
    for is_attention, st in zip(plan.attention, cache.layers):
        if is_attention and ragged:  # SlotRows: one batch-1 AttentionState per row
            states += [row.k for row in st.states] + [row.v for row in st.states]
        elif is_attention:
            st.reserve(past[0] + 1)
            states += [st.k[r:r + 1] for r in range(bsz)] + [st.v[r:r + 1] for r in range(bsz)]
        else:
            states += (st.conv, st.ssm)
    weights = list(plan.weights)
    for i, mixer in plan.a_slots:
        weights[i] = mixer.A()
    try:
        logits = ops.decode_step(input_ids[:, 0].long().contiguous(), weights, states, plan.meta, past, plan.eps)
    except RuntimeError:  # a tensor changed under the plan (e.g. one layer cast to bf16): layer by layer
        model.__dict__.pop("_decode_plan", None)
        return None
    cache.length += 1
    return logits[:, None]  # (B, 1, V)


def _plan(model) -> DecodePlan | None:
    key = (_registrations[0], model.embed.weight.dtype, model.embed.weight.device)
    cached = model.__dict__.get("_decode_plan")
    if cached is None or cached.key != key:
        cached = build_plan(model, key)
        model.__dict__["_decode_plan"] = cached
    return cached.plan if isinstance(cached, _NoPlan) else cached


@dataclass
class _NoPlan:
    key: tuple
    plan: None = None


def build_plan(model, key: tuple = ()) -> DecodePlan | _NoPlan:
    """The plan, or _NoPlan when some module or tensor is not what csrc/step.cpp takes."""
    from jambalab.model import MLP, Attention, Linear, MambaMixer, MoE, RMSNorm

    cfg = model.config
    ok = ops.decode_step is not None and not cfg.rope and type(model.lm_head) is Linear
    ok = ok and cfg.n_heads // max(cfg.n_kv_heads, 1) <= _MAX_GROUP
    weights = [model.embed.weight, model.norm_f.weight, model.lm_head.weight]
    meta = [cfg.n_heads, cfg.n_kv_heads, cfg.head_dim]
    eps = {model.norm_f.eps}
    inner_eps = 0.0
    attention, a_slots = [], []
    for block in model.layers:
        mixer, ffn = block.mixer, block.ffn
        norms = [n for n in (block.norm1, block.norm2) if n is not None]
        ok = ok and all(type(n) is RMSNorm and n.weight is not None for n in norms)
        eps |= {n.eps for n in norms}
        slots = [block.norm1.weight, block.norm2.weight if block.norm2 is not None else None]
        if type(mixer) is Attention:
            projs = (mixer.q_proj, mixer.k_proj, mixer.v_proj, mixer.o_proj)
            ok = ok and all(type(p) is Linear and p.bias is None for p in projs)
            slots += [p.weight for p in projs] + [None] * (_SLOTS_MIXER - 4)
        elif type(mixer) is MambaMixer:
            linears = (mixer.in_proj, mixer.x_proj, mixer.dt_proj, mixer.out_proj)
            ok = ok and all(type(p) is Linear for p in linears) and mixer.x_proj.bias is None
            inner = mixer._inner_norm_weights() or (None, None, None)
            if mixer.dt_norm is not None:
                inner_eps = mixer.dt_norm.eps
            a_slots.append((len(weights) + len(slots) + 10, mixer))
            slots += [mixer.in_proj.weight, mixer.in_proj.bias, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias,
                      mixer.x_proj.weight, *inner, mixer.dt_proj.weight, mixer.dt_proj.bias, None, mixer.D,
                      mixer.out_proj.weight, mixer.out_proj.bias]
        else:
            ok = False
        if ffn is None:
            slots += [None] * _SLOTS_FFN
            kind, top_k = 0, 0
        elif type(ffn) is MLP and all(type(p) is Linear for p in (ffn.gate_proj, ffn.up_proj, ffn.down_proj)):
            slots += [ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight, None]
            kind, top_k = 1, 0
        elif type(ffn) is MoE and type(ffn.router) is Linear:
            slots += [ffn.router.weight, ffn.w_gate, ffn.w_up, ffn.w_down]
            kind, top_k = 2, ffn.top_k
        else:
            ok, kind, top_k = False, 0, 0
        weights += slots
        attention.append(type(mixer) is Attention)
        meta += [int(type(mixer) is Attention), kind, top_k, int(getattr(mixer, "dt_norm", None) is not None)]
    ok = ok and len(eps) == 1 and all(_fits(w) for w in weights)
    if not ok:
        return _NoPlan(key)
    weights = [_EMPTY if w is None else w for w in weights]
    return DecodePlan(weights, meta, [eps.pop(), inner_eps], attention, a_slots, key)


def _fits(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype == torch.float32 and t.is_cpu and t.is_contiguous())
