"""A whole decode token in one kernel call: the arguments of ops.decode_step (csrc/step.cpp).

Legend: R rows (1-16), L layers, V vocab.

JambaLM.forward takes this path for one new token per row of a float32 or bf16 CPU model without RoPE,
on a cache already holding a prefix, without padding: a plain cache (every row at the same
position) or the serving engine's ragged SlotBatch (each row at its own length, its own K/V
tensors), outside autograd. The model's matrices may be bf16 (weight-only bf16,
`quantize="bf16"`: x rounded to bf16 once per matrix input, exact products summed in fp32, as the
layer path's gemv op), or int8 /
4-bit (quant.QuantLinear, quant.QuantMoE; `from_pretrained(..., quantize="int8" | "int4")`) in the
int8-activation mode, where they multiply as the layer path's wgemv_a8 does. A bf16 model (bf16
activations, conv states and K/V caches) runs csrc/step_bf16.cpp instead (any CPU),
for 1-16 rows, MoE top-k <= 2, and a float32 residual only without FFN layers. Anything else (the float
activation mode over quantized weights, swapped modules, a padded prompt, grad mode, more rows)
returns None here and the model decodes layer by layer, which is the twin: the logits of both paths
are bitwise equal (tests/test_decode_step.py).

The tensors are gathered once per model into a DecodePlan, kept until a module or parameter is
registered anywhere (a global nn.Module hook counts those: quantize_model's module swaps, a
replaced weight), the model's dtype or device changes, or the activation mode does; a step then
only adds the cache's
states and each Mamba layer's A = -exp(A_log) (kept by the mixer until A_log changes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from jambalab import ops
from jambalab.ops.lowp import GEMV_ROWS_BF16
from jambalab.ops.quant_ref import activations

_SLOTS_MIXER = 14  # csrc/step.cpp: per layer norm1, norm2, 14 mixer slots, 4 FFN slots
_SLOTS_FFN = 4
_EMPTY = torch.empty(0)  # an absent weight or bias
_MAX_ROWS = 16  # kMaxRows in csrc/step.cpp
_MAX_ROWS_BF16 = GEMV_ROWS_BF16  # kMaxRows in csrc/step_bf16.cpp: the rows of one wgemv call
_MAX_GROUP = 64  # query heads per KV head (kMaxGroup in csrc/attention.cpp)

_registrations = [0]  # bumped by the hooks below: any module or parameter registered, in any model


def _bump(*_) -> None:
    _registrations[0] += 1


nn.modules.module.register_module_module_registration_hook(_bump)
nn.modules.module.register_module_parameter_registration_hook(_bump)


@dataclass
class DecodePlan:
    weights: list[torch.Tensor]  # csrc/step.cpp's layout; the A slots are refilled every step
    scales: list[torch.Tensor]  # beside each quantized weight its fp16 scales; empty for a float one
    meta: list[int]  # n_heads, n_kv_heads, head_dim, then 4 ints per layer
    eps: list[float]  # the model's norm eps, the Mamba inner norms' eps
    attention: list[bool]  # per layer
    a_slots: list[tuple[int, nn.Module]]  # (index in weights, MambaMixer) of every A
    key: tuple
    max_rows: int = _MAX_ROWS  # a bf16 model: _MAX_ROWS_BF16


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
    if plan is None or bsz > plan.max_rows:
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
        logits = ops.decode_step(input_ids[:, 0].long().contiguous(), weights, plan.scales, states, plan.meta, past,
                                 plan.eps)
    except RuntimeError:  # a tensor changed under the plan (e.g. one layer cast to bf16): layer by layer
        model.__dict__.pop("_decode_plan", None)
        return None
    cache.length += 1
    return logits[:, None]  # (B, 1, V)


def _plan(model) -> DecodePlan | None:
    key = (_registrations[0], model.embed.weight.dtype, model.embed.weight.device, activations())
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
    from jambalab.quant import QuantLinear, QuantMoE

    cfg = model.config
    bf16 = model.embed.weight.dtype == torch.bfloat16  # a bf16 model: csrc/step_bf16.cpp
    linears = (Linear,) if bf16 else (Linear, QuantLinear)
    ok = ops.decode_step is not None and not cfg.rope and type(model.lm_head) in linears
    ok = ok and cfg.n_heads // max(cfg.n_kv_heads, 1) <= _MAX_GROUP
    if bf16:  # top-2 sums, and a float32 residual only without FFNs
        ok = ok and (cfg.top_k <= 2 or cfg.n_experts <= 1)
        ok = ok and not (cfg.residual_in_fp32 and cfg.d_ff > 0)
    weights = [model.embed.weight, model.norm_f.weight, _matrix(model.lm_head)]
    meta = [cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, int(cfg.residual_in_fp32)]
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
            ok = ok and all(type(p) in linears and p.bias is None for p in projs)
            slots += [_matrix(p) for p in projs] + [None] * (_SLOTS_MIXER - 4)
        elif type(mixer) is MambaMixer:
            projs = (mixer.in_proj, mixer.x_proj, mixer.dt_proj, mixer.out_proj)
            ok = ok and all(type(p) in linears for p in projs) and mixer.x_proj.bias is None
            inner = mixer._inner_norm_weights() or (None, None, None)
            if mixer.dt_norm is not None:
                inner_eps = mixer.dt_norm.eps
            a_slots.append((len(weights) + len(slots) + 10, mixer))
            slots += [_matrix(mixer.in_proj), mixer.in_proj.bias, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias,
                      _matrix(mixer.x_proj), *inner, _matrix(mixer.dt_proj), mixer.dt_proj.bias, None, mixer.D,
                      _matrix(mixer.out_proj), mixer.out_proj.bias]
        else:
            ok = False
        if ffn is None:
            slots += [None] * _SLOTS_FFN
            kind, top_k = 0, 0
        elif type(ffn) is MLP and all(type(p) in linears for p in (ffn.gate_proj, ffn.up_proj, ffn.down_proj)):
            slots += [_matrix(ffn.gate_proj), _matrix(ffn.up_proj), _matrix(ffn.down_proj), None]
            kind, top_k = 1, 0
        elif type(ffn) in (MoE, QuantMoE) and type(ffn.router) is Linear:
            stacks = [_dense(ffn.w_gate), _dense(ffn.w_up), _dense(ffn.w_down)]
            if type(ffn) is QuantMoE:
                stacks = [(getattr(ffn, w), getattr(ffn, f"{w}_scales"), getattr(ffn, f"{w}_group"))
                          for w in ffn._STACKS]
            slots += [ffn.router.weight, *stacks]
            kind, top_k = 2, ffn.top_k
        else:
            ok, kind, top_k = False, 0, 0
        weights += slots
        attention.append(type(mixer) is Attention)
        meta += [int(type(mixer) is Attention), kind, top_k, int(getattr(mixer, "dt_norm", None) is not None)]
    if bf16:
        a_indices = {i for i, _ in a_slots}
        ok = ok and len(eps) == 1 and all(_fits_bf16(w, i in a_indices) for i, w in enumerate(weights))
    else:
        ok = ok and len(eps) == 1 and all(_fits(w) for w in weights)
    if not ok:
        return _NoPlan(key)
    scales = [w[1] if isinstance(w, tuple) and w[1] is not None else _EMPTY for w in weights]
    weights = [_EMPTY if w is None else w[0] if isinstance(w, tuple) else w for w in weights]
    return DecodePlan(weights, scales, meta, [eps.pop(), inner_eps], attention, a_slots, key,
                      _MAX_ROWS_BF16 if bf16 else _MAX_ROWS)


def _matrix(linear) -> torch.Tensor | tuple:
    """A Linear's weight (a bf16 one as (weight, None, None)), or a QuantLinear's (weight, scales, group size)."""
    from jambalab.quant import QuantLinear

    return (linear.weight, linear.scales, linear.group_size) if isinstance(linear, QuantLinear) else _dense(linear.weight)


def _dense(w: torch.Tensor) -> torch.Tensor | tuple:
    """A float matrix (or stack of experts' matrices) for a matrix slot: bf16 ones are marked (w, None, None),
    the only slots where the step takes bf16."""
    return (w, None, None) if w.dtype == torch.bfloat16 else w


def _fits(t: torch.Tensor | tuple | None) -> bool:
    """A float32 tensor; a bf16 matrix (w, None, None); or a quantized (weight, scales, group size) whose
    products round x to int8 (the activation mode is "int8"; in_features and the group size are
    multiples of 32)."""
    if isinstance(t, tuple):
        w, scales, group = t
        if scales is None:
            return w.dtype == torch.bfloat16 and w.dim() >= 2 and w.is_cpu and w.is_contiguous()
        k = w.shape[-1] * (2 if w.dtype == torch.uint8 else 1)
        return (activations() == "int8" and k % 32 == 0 and group % 32 == 0 and w.dtype in (torch.int8, torch.uint8)
                and scales.dtype == torch.float16 and w.is_cpu and w.is_contiguous() and scales.is_contiguous())
    return t is None or (t.dtype == torch.float32 and t.is_cpu and t.is_contiguous())


def _fits_bf16(t: torch.Tensor | tuple | None, is_a: bool) -> bool:
    """A bf16 model's slot: a contiguous CPU bf16 tensor (a matrix marked (w, None, None)), or absent; an
    A slot is empty in the plan (each step fills it with the mixer's float32 A)."""
    if isinstance(t, tuple):
        t = t[0] if t[1] is None else None
        if t is None:
            return False
    if t is None or is_a:
        return True
    return t.dtype == torch.bfloat16 and t.is_cpu and t.is_contiguous()
