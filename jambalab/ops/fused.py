"""Fused CPU selective scan, decode steps and training loss: input checks, autograd, fallbacks.

Legend: B batch, L length, D d_inner (channels), N d_state, K d_conv.

Same signatures and results as the references in scan_ref.py / conv_ref.py / loss_ref.py /
attention_ref.py.
Every call checks its inputs (a bad dtype or shape raises InputError naming the
argument and both shapes), then runs the C++ kernels (jambalab/ops/cpu.py)
when all tensors are on the CPU and the kernels built; otherwise the reference.

- selective_scan: differentiable in every input, including through h_last
  (a reverse-time pass over checkpoints saved every `chunk_size` steps; no
  double backward). Activations may be float32, bfloat16 or float16 (float16
  and mixed dtypes are computed in float32); the state is always float32.
- causal_conv1d: silu(depthwise causal conv) over (B, L, D), differentiable
  in x, weight and bias (a conv_state that requires grad runs the reference).
- linear: F.linear, with a multithreaded GEMV kernel for decode-sized inputs and oneDNN's fp32 GEMM
  for larger ones (ops/gemm.py).
- selective_state_update / causal_conv1d_update: inference only; under grad
  mode with an input that requires grad they run the reference instead.
- cross_entropy: the training loss over (T, V) logits, forward and backward.
- linear_cross_entropy: the lm_head and that loss in row chunks, never holding
  the (T, V) logits (twin: loss_ref.linear_cross_entropy_ref).
- decode_attention: one query per head over a whole KV cache, split over the keys
  (twin: attention_ref.decode_attention_ref).
- decode_step: a whole decode token, all layers, in one call (csrc/step.cpp; its twin is the
  model's layer-by-layer decode; jambalab/decode_step.py builds its arguments).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from jambalab.errors import InputError
from jambalab.ops import cpu, gemm, lowp
from jambalab.ops.conv_ref import causal_conv1d_ref, causal_conv1d_update_ref
from jambalab.ops.attention_ref import decode_attention_ref
from jambalab.ops.loss_ref import linear_cross_entropy_ref
from jambalab.ops.quant_ref import QuantWeight
from jambalab.ops.scan_ref import dt_softplus_ref, rms_norm_ref, selective_scan_ref, selective_state_update_ref

Tensor = torch.Tensor
Opt = Tensor | None

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # what the C++ instantiates
_MAX_D_STATE = 64  # kMaxN in the C++ (state kept on the stack); larger runs the reference


# ---------------------------------------------------------------- checks


def _check_floats(op: str, required: dict[str, Tensor], optional: dict[str, Tensor | None]) -> None:
    for name, t in (*required.items(), *optional.items()):
        if t is None:
            if name in required:
                raise InputError(f"{op}: {name} is required, got None")
            continue
        if not isinstance(t, Tensor):
            raise InputError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise InputError(f"{op}: {name} has dtype {t.dtype}; expected float32, bfloat16 or float16")


def _check_dim(op: str, name: str, t: Tensor, layout: str) -> None:
    if t.dim() != layout.count(",") + 1:
        raise InputError(f"{op}: {name} must be ({layout}), got shape {tuple(t.shape)}")


def _check_shape(op: str, name: str, t: Tensor | None, expected: tuple[int, ...], basis: Callable[[], str]) -> None:
    # torch.Size compares equal to a tuple; the message (basis says where `expected`
    # comes from) is only formatted on failure: decode steps call this a lot.
    if t is not None and t.shape != expected:
        raise InputError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(expected)} ({basis()})")


def _check_scan(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Opt, z: Opt, h0: Opt, chunk_size: int
) -> None:
    op = "selective_scan"
    _check_floats(op, dict(x=x, dt=dt, A=A, B=B, C=C), dict(D=D, z=z, h0=h0))
    _check_dim(op, "x", x, "batch, length, d_inner")
    _check_dim(op, "A", A, "d_inner, d_state")
    bsz, length, d_inner = x.shape
    d_state = A.shape[1]

    def basis() -> str:
        return f"from x {tuple(x.shape)} and A {tuple(A.shape)}"

    _check_shape(op, "A", A, (d_inner, d_state), lambda: f"d_inner from x {tuple(x.shape)}")
    for name, t in (("dt", dt), ("z", z)):
        _check_shape(op, name, t, x.shape, lambda: f"same as x {tuple(x.shape)}")
    for name, t in (("B", B), ("C", C)):
        _check_shape(op, name, t, (bsz, length, d_state), basis)
    _check_shape(op, "D", D, (d_inner,), basis)
    _check_shape(op, "h0", h0, (bsz, d_inner, d_state), basis)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")


def _check_state_update(h: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Opt, z: Opt) -> None:
    op = "selective_state_update"
    _check_floats(op, dict(h=h, x=x, dt=dt, A=A, B=B, C=C), dict(D=D, z=z))
    _check_dim(op, "h", h, "batch, d_inner, d_state")
    if h.dtype != torch.float32:
        raise InputError(f"{op}: h (the SSM state) must be float32, got {h.dtype}")
    bsz, d_inner, d_state = h.shape

    def basis() -> str:
        return f"from h {tuple(h.shape)}"

    for name, t in (("x", x), ("dt", dt), ("z", z)):
        _check_shape(op, name, t, (bsz, d_inner), basis)
    _check_shape(op, "A", A, (d_inner, d_state), basis)
    for name, t in (("B", B), ("C", C)):
        _check_shape(op, name, t, (bsz, d_state), basis)
    _check_shape(op, "D", D, (d_inner,), basis)


def _check_conv(x: Tensor, weight: Tensor, bias: Opt, conv_state: Opt) -> None:
    op = "causal_conv1d"
    _check_floats(op, dict(x=x, weight=weight), dict(bias=bias, conv_state=conv_state))
    _check_dim(op, "x", x, "batch, length, d_inner")
    _check_dim(op, "weight", weight, "d_inner, d_conv")
    bsz, _, d_inner = x.shape
    d_conv = weight.shape[1]

    def basis() -> str:
        return f"from x {tuple(x.shape)} and weight {tuple(weight.shape)}"

    _check_shape(op, "weight", weight, (d_inner, d_conv), lambda: f"d_inner from x {tuple(x.shape)}")
    _check_shape(op, "bias", bias, (d_inner,), basis)
    _check_shape(op, "conv_state", conv_state, (bsz, d_inner, d_conv), basis)


def _check_conv_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Opt) -> None:
    op = "causal_conv1d_update"
    _check_floats(op, dict(x=x, conv_state=conv_state, weight=weight), dict(bias=bias))
    _check_dim(op, "conv_state", conv_state, "batch, d_inner, d_conv")
    bsz, d_inner, d_conv = conv_state.shape

    def basis() -> str:
        return f"from conv_state {tuple(conv_state.shape)}"

    _check_shape(op, "x", x, (bsz, d_inner), basis)
    _check_shape(op, "weight", weight, (d_inner, d_conv), basis)
    _check_shape(op, "bias", bias, (d_inner,), basis)


# ---------------------------------------------------------------- dispatch helpers


def _present(*ts: Tensor | None) -> list[Tensor]:
    return [t for t in ts if t is not None]


def _kernels_for(*ts: Tensor | None):
    """The compiled ops if every tensor is on the CPU and they built, else None."""
    if not all(t.is_cpu for t in ts if t is not None):
        return None
    return cpu.kernels()


def _needs_grad(*ts: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts if t is not None)


def _compute_dtype(*ts: Tensor | None) -> torch.dtype:
    """One activation dtype for the kernel: the common one if it has a kernel, else float32."""
    dtypes = {t.dtype for t in _present(*ts)}
    if len(dtypes) == 1 and (only := dtypes.pop()) in _KERNEL_DTYPES:
        return only
    return torch.float32


# The converters return their argument untouched when it already fits: each
# .to()/.contiguous() is a dispatcher call (~1 us), and a decode step makes dozens.


def _rows(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    # The kernels take strided rows but need a contiguous last dim: the x and z
    # halves of in_proj's output pass without a copy.
    if t is None or (t.dtype == dtype and t.stride(-1) == 1):
        return t
    t = t.to(dtype)
    return t if t.stride(-1) == 1 else t.contiguous()


def _dense(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if t is None or (t.dtype == dtype and t.is_contiguous()):
        return t
    return t.to(dtype).contiguous()


def _f32(t: Tensor | None) -> Tensor | None:
    return _dense(t, torch.float32)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


# ---------------------------------------------------------------- selective scan


class _SelectiveScanFn(torch.autograd.Function):
    """Kernel-level scan on prepared inputs (same dtype rows, fp32 A/D/h0)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, h0, chunk_size):
        y, h_last, ckpt = cpu.kernels().scan_fwd(x, dt, A, B, C, D, z, h0, chunk_size, True)
        ctx.save_for_backward(x, dt, A, B, C, D, z, ckpt)
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)  # an unused y or h_last gives None: skip its work
        return y, h_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dh_last):
        x, dt, A, B, C, D, z, ckpt = ctx.saved_tensors
        dy = _rows(dy, x.dtype)
        dh_last = _f32(dh_last)
        dx, ddt, dA, dB, dC, dD, dz, dh0 = cpu.kernels().scan_bwd(
            x, dt, A, B, C, D, z, ckpt, dy, dh_last, ctx.chunk_size
        )
        need = ctx.needs_input_grad
        return (
            dx if need[0] else None,
            ddt if need[1] else None,
            dA if need[2] else None,
            dB.to(B.dtype) if need[3] else None,
            dC.to(C.dtype) if need[4] else None,
            dD if need[5] else None,
            dz if need[6] else None,
            dh0 if need[7] else None,
            None,
        )


def selective_scan(
    x: Tensor,  # (B, L, D)
    dt: Tensor,  # (B, L, D), already softplus'd
    A: Tensor,  # (D, N), negative
    B: Tensor,  # (B, L, N)
    C: Tensor,  # (B, L, N)
    D: Tensor | None = None,  # (D,)
    z: Tensor | None = None,  # (B, L, D)
    h0: Tensor | None = None,  # (B, D, N)
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Returns (y (B, L, D) in x.dtype, h_last (B, D, N) fp32); chunk_size is the backward's checkpoint interval."""
    _check_scan(x, dt, A, B, C, D, z, h0, chunk_size)
    ops = _kernels_for(x, dt, A, B, C, D, z, h0)
    if ops is None or A.shape[1] > _MAX_D_STATE:
        return selective_scan_ref(x, dt, A, B, C, D, z, h0, chunk_size)
    act = _compute_dtype(x, dt, B, C, z)
    args = (_rows(x, act), _rows(dt, act), _f32(A), _rows(B, act), _rows(C, act), _f32(D), _rows(z, act), _f32(h0))
    if _needs_grad(x, dt, A, B, C, D, z, h0):
        y, h_last = _SelectiveScanFn.apply(*args, chunk_size)
    else:
        y, h_last, _ = ops.scan_fwd(*args, chunk_size, False)
    return _as(y, x.dtype), h_last


# ---------------------------------------------------------------- causal conv1d (+ silu)

_MAX_D_CONV = 16  # kMaxTaps in causal_conv1d.cpp


class _CausalConv1dFn(torch.autograd.Function):
    """Kernel-level conv on prepared inputs (x rows in a kernel dtype, fp32 weight and bias)."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv_state):
        ctx.save_for_backward(x, weight, bias, conv_state)
        return cpu.kernels().conv_fwd(x, weight, bias, conv_state)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, weight, bias, conv_state = ctx.saved_tensors
        dx, dw, db = cpu.kernels().conv_bwd(x, weight, bias, conv_state, _dense(dout, x.dtype))
        need = ctx.needs_input_grad
        return dx if need[0] else None, dw if need[1] else None, db if need[2] else None, None


def causal_conv1d(
    x: Tensor,  # (B, L, D)
    weight: Tensor,  # (D, K)
    bias: Tensor | None,  # (D,)
    conv_state: Tensor | None = None,  # (B, D, K): the last K inputs before x (None = zeros)
) -> Tensor:
    """silu(depthwise causal conv(x)), continuing from conv_state (not modified). (B, L, D) in x.dtype."""
    _check_conv(x, weight, bias, conv_state)
    ops = _kernels_for(x, weight, bias, conv_state)
    if ops is None or weight.shape[1] > _MAX_D_CONV or (conv_state is not None and _needs_grad(conv_state)):
        return causal_conv1d_ref(x, weight, bias, conv_state)
    act = x.dtype if x.dtype in _KERNEL_DTYPES else torch.float32
    xr = _rows(x, act)
    if xr.shape[0] > 1 and xr.stride(0) != xr.shape[1] * xr.stride(1):
        xr = xr.contiguous()  # rows must be evenly strided across the batch
    args = (xr, _f32(weight), _f32(bias), _dense(conv_state, act))
    if _needs_grad(x, weight, bias):
        out = _CausalConv1dFn.apply(*args)  # grads reach a non-fp32 weight/bias through the casts above
    else:
        out = ops.conv_fwd(*args)
    return _as(out, x.dtype)


# ---------------------------------------------------------------- softplus(dt + bias)


class _DtSoftplusFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dt, bias):
        ctx.save_for_backward(dt, bias)
        return cpu.kernels().dt_softplus_fwd(dt, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        dt, bias = ctx.saved_tensors
        grad = cpu.kernels().dt_softplus_bwd(dt, bias, _f32(dout))
        need = ctx.needs_input_grad
        return grad if need[0] else None, grad.reshape(-1, bias.shape[0]).sum(0) if need[1] else None


def dt_softplus(dt: Tensor, bias: Tensor) -> Tensor:
    """softplus(dt + bias) over the last dim (..., D). float32 runs the fused kernel, other dtypes the
    reference (which rounds dt + bias to the dtype before the softplus, as HF)."""
    if not isinstance(dt, Tensor) or not isinstance(bias, Tensor) or bias.dim() != 1 or dt.dim() < 1 \
            or dt.shape[-1] != bias.shape[0]:
        raise InputError(f"dt_softplus: bias must be (D,) with D = dt's last dim; got dt "
                         f"{tuple(getattr(dt, 'shape', ()))}, bias {tuple(getattr(bias, 'shape', ()))}")
    ops = _kernels_for(dt, bias)
    if ops is None or dt.dtype != torch.float32 or bias.dtype != torch.float32:
        return dt_softplus_ref(dt, bias)
    if _needs_grad(dt, bias):
        return _DtSoftplusFn.apply(_f32(dt), _f32(bias))
    return ops.dt_softplus_fwd(_f32(dt), _f32(bias))


# ---------------------------------------------------------------- linear (GEMV for decoding)

# kMaxRows in gemv.cpp. A batched decode step of the serving engine has up to max_batch rows:
# torch's mm ran 5-16-row products of bench-hybrid's weights ~2.6x slower than the GEMV on 4 rows
# (aten::mm was 77% of a 5-row step). The GEMV reads each weight row once for all R rows, and each
# row's sum is computed the same way whatever else is in the batch.
_GEMV_MAX_ROWS = 16


def linear(x: Tensor, weight: Tensor | QuantWeight, bias: Tensor | None = None) -> Tensor:
    """F.linear; for decode-sized inputs (<= 16 rows; float32, CPU, no autograd) the
    multithreaded GEMV kernel of gemv.cpp, which reads the weight at the memory bandwidth of all cores,
    for larger ones gemm.linear (oneDNN's fp32 GEMM where torch has it). A bf16 or
    fp16 weight goes to lowp.dense_linear (its own GEMV, and fp32 tiles where the CPU has no bf16 GEMM),
    an int8 / 4-bit QuantWeight to lowp.qlinear."""
    if isinstance(weight, QuantWeight):
        return lowp.qlinear(x, weight, bias)
    if weight.dtype in (torch.bfloat16, torch.float16) and weight.dim() == 2:
        return lowp.dense_linear(x, weight, bias)
    if (x.dtype == torch.float32 and weight.dtype == torch.float32 and x.dim() >= 1 and weight.dim() == 2
            and x.shape[-1] == weight.shape[1] > 0 and 0 < x.numel() <= _GEMV_MAX_ROWS * x.shape[-1]
            and x.is_cpu and weight.is_cpu and weight.is_contiguous()
            and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))
            and not _needs_grad(x, weight, bias)):
        ops = cpu.kernels()
        if ops is not None:
            y = ops.gemv(_f32(x.reshape(-1, x.shape[-1])), weight, bias)  # (R, N)
            return y.view(*x.shape[:-1], weight.shape[0])
    return gemm.linear(x, weight, bias)  # F.linear, or oneDNN's fp32 GEMM for a prefill-sized one


# ---------------------------------------------------------------- RMSNorm


_NORM_DTYPES = (torch.float32, torch.bfloat16)


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """RMSNorm over the last dim. float32 or bf16 x and weight on CPU without autograd: one kernel call
    (gemv.cpp; 16-bit in the reference's op order: normalised in fp32, cast back, then scaled); else
    F.rms_norm in fp32 (equal to HF's op order there) or the reference (16-bit: HF casts before scaling)."""
    if (x.dtype in _NORM_DTYPES and (weight is None or weight.dtype in _NORM_DTYPES) and x.is_cpu and x.dim() >= 1
            and x.shape[-1] > 0 and not _needs_grad(x, weight)
            and (weight is None or (weight.is_cpu and weight.is_contiguous() and weight.shape == x.shape[-1:]))):
        ops = cpu.kernels()
        if ops is not None:
            return ops.rms_norm(x.contiguous(), weight, eps)
    if x.dtype == torch.float32 and (weight is None or weight.dtype == torch.float32):
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)
    return rms_norm_ref(x, weight, eps)


# ---------------------------------------------------------------- decode steps


def selective_state_update(
    h: Tensor,  # (B, D, N) fp32, updated in place
    x: Tensor,  # (B, D)
    dt: Tensor,  # (B, D), already softplus'd
    A: Tensor,  # (D, N)
    B: Tensor,  # (B, N)
    C: Tensor,  # (B, N)
    D: Tensor | None = None,  # (D,)
    z: Tensor | None = None,  # (B, D)
) -> Tensor:
    """One decode step of the scan; mutates h, returns y (B, D) in x.dtype."""
    _check_state_update(h, x, dt, A, B, C, D, z)
    ops = _kernels_for(h, x, dt, A, B, C, D, z)
    if ops is None or _needs_grad(h, x, dt, A, B, C, D, z):
        return selective_state_update_ref(h, x, dt, A, B, C, D, z)
    act = _compute_dtype(x, dt, B, C, z)
    state = h if h.is_contiguous() else h.contiguous()
    y = ops.state_update(
        state, _dense(x, act), _dense(dt, act), _f32(A), _dense(B, act), _dense(C, act), _f32(D), _dense(z, act)
    )
    if state is not h:
        h.copy_(state)
    return _as(y, x.dtype)


def causal_conv1d_update(
    x: Tensor,  # (B, D): one new token
    conv_state: Tensor,  # (B, D, K), updated in place
    weight: Tensor,  # (D, K)
    bias: Tensor | None,  # (D,)
) -> Tensor:
    """One decode step of the conv: shift x into the state and return silu(conv) (B, D)."""
    _check_conv_update(x, conv_state, weight, bias)
    ops = _kernels_for(x, conv_state, weight, bias)
    if ops is None or conv_state.dtype not in _KERNEL_DTYPES or _needs_grad(x, conv_state, weight, bias):
        return causal_conv1d_update_ref(x, conv_state, weight, bias)
    act = x.dtype if x.dtype in _KERNEL_DTYPES else torch.float32
    state = conv_state if conv_state.is_contiguous() else conv_state.contiguous()
    y = ops.conv_update(_dense(x, act), state, _f32(weight), _f32(bias))
    if state is not conv_state:
        conv_state.copy_(state)
    return _as(y, x.dtype)


# ---------------------------------------------------------------- whole-layer decode steps
# csrc/decode.cpp: a Mamba mixer, SwiGLU MLP or MoE layer for 1 to 16 rows (decode tokens) in one
# call, running the same kernels in the same order as the layer-by-layer path of jambalab/model.py,
# which is their twin (tests/test_ops_kernels.py checks they agree). The model asks
# decode_fusable() first and takes its own path otherwise; these functions do not fall back.


def decode_fusable(x: Tensor, *tensors: Tensor | None) -> bool:
    """Whether the whole-layer decode ops take these inputs: x (R, d) with 1 <= R <= 16, every
    tensor float32, contiguous and on the CPU, nothing needing a gradient, and the kernels built."""
    if x.dim() != 2 or not 1 <= x.shape[0] <= _GEMV_MAX_ROWS:
        return False
    for t in (x, *tensors):
        if t is not None and (t.dtype != torch.float32 or not t.is_cpu or not t.is_contiguous()):
            return False
    return not _needs_grad(x, *tensors) and cpu.kernels() is not None


def mamba_decode(x: Tensor, in_w: Tensor, in_b: Opt, conv_state: Tensor, conv_w: Tensor, conv_b: Opt,
                 x_proj_w: Tensor, inner_norms: tuple[Opt, Opt, Opt] | None, norm_eps: float, dt_proj_w: Tensor,
                 dt_proj_b: Tensor, A: Tensor, D: Tensor, ssm_state: Tensor, out_w: Tensor, out_b: Opt) -> Tensor:
    """One token through a Mamba mixer, x (R, d) -> (R, d); conv_state (R, D, K) and ssm_state
    (R, D, N) are updated in place. inner_norms: the dt, B and C RMSNorm weights (None entries for
    weightless norms), or None for no inner norms."""
    norms = inner_norms or (None, None, None)
    return cpu.kernels().mamba_decode(x, in_w, in_b, conv_state, conv_w, conv_b, x_proj_w, inner_norms is not None,
                                      *norms, norm_eps, dt_proj_w, dt_proj_b, A, D, ssm_state, out_w, out_b)


def mlp_decode(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """down(silu(gate(x)) * up(x)) for x (R, d)."""
    return cpu.kernels().mlp_decode(x, w_gate, w_up, w_down)


def moe_decode(x: Tensor, router_w: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor,
               top_k: int) -> tuple[Tensor, Tensor]:
    """The MoE layer for x (R, d): (y (R, d), router_logits (R, E))."""
    return cpu.kernels().moe_decode(x, router_w, w_gate, w_up, w_down, top_k)


def decode_step(ids: Tensor, weights: list[Tensor], scales: list[Tensor], states: list[Tensor], meta: list[int],
                past: list[int], eps: list[float]) -> Tensor:
    """One token per row, ids (R,) -> logits (R, V), through every layer in one kernel call; the
    states (conv/ssm or K/V per layer) are updated in place. The argument layout is csrc/step.cpp's
    (built by jambalab.decode_step.DecodePlan, which checks the tensors fit once): weights float32, or
    int8 / 4-bit with their fp16 scales at the same index of scales (an empty tensor for a float
    weight); past (R,) the tokens each row already holds (its new K/V go there)."""
    return cpu.kernels().decode_step(ids, weights, scales, states, meta, past, eps)


# ---------------------------------------------------------------- cross-entropy (training loss)


class _CrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
        total, lse, count = cpu.kernels().ce_fwd(logits, target, ignore_index)
        ctx.save_for_backward(logits, target, lse)
        ctx.ignore_index, ctx.count = ignore_index, int(count)
        return (total / count).float()

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, target, lse = ctx.saved_tensors
        scale = float(grad) / ctx.count if ctx.count else float("nan")
        return cpu.kernels().ce_bwd(logits, target, lse, ctx.ignore_index, scale), None, None


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = -100) -> Tensor:
    """F.cross_entropy(logits (T, V), target (T,), ignore_index=ignore_index), the mean over the
    rows whose target is not ignore_index. float32 on CPU runs csrc/cross_entropy.cpp (forward
    and backward, ~10x torch's on a 65536-class vocabulary); anything else F.cross_entropy."""
    if (not isinstance(logits, Tensor) or not isinstance(target, Tensor) or logits.dtype != torch.float32
            or logits.dim() != 2 or target.dtype != torch.long or target.shape != logits.shape[:1]):
        return torch.nn.functional.cross_entropy(logits, target, ignore_index=ignore_index)
    ops = _kernels_for(logits, target)
    if ops is None:
        return torch.nn.functional.cross_entropy(logits, target, ignore_index=ignore_index)
    logits, target = logits.contiguous(), target.contiguous()
    if _needs_grad(logits):
        return _CrossEntropyFn.apply(logits, target, ignore_index)
    total, _, count = ops.ce_fwd(logits, target, ignore_index)
    return (total / count).float()


# ---------------------------------------------------------------- lm_head + cross-entropy (training)


def _loss_chunk_rows(vocab: int) -> int:
    """Rows per chunk: a (rows, V) fp32 buffer of ~32 MiB, at least 16 rows."""
    return max(16, (32 << 20) // (4 * max(1, vocab)))


class _LinearCrossEntropyFn(torch.autograd.Function):
    """Forward computes the loss and, when asked, both gradients, chunk by chunk through one reused
    (rows, V) buffer: logits = h_c @ W^T, the loss terms, then the buffer is overwritten with
    d loss / d logits and multiplied back into d h_c and d W. Backward only scales them."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, target: Tensor, ignore_index: int, rows: int) -> Tensor:
        ops = cpu.kernels()
        T, V = h.shape[0], weight.shape[0]
        count = int((target != ignore_index).sum())
        scale = 1.0 / count if count else float("nan")  # all rows ignored: loss NaN, gradients 0 (as torch)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None  # (T, d)
        grad_w = torch.zeros_like(weight) if want_w else None  # (V, d)
        buf = h.new_empty(min(rows, T), V)  # (rows, V)
        total = torch.zeros((), dtype=torch.float64)
        for lo in range(0, T, rows):
            hi = min(lo + rows, T)
            hc, tc, logits = h[lo:hi], target[lo:hi], buf[:hi - lo]
            torch.mm(hc, weight.t(), out=logits)
            part, lse, _ = ops.ce_fwd(logits, tc, ignore_index)
            total += part
            if want_h or want_w:
                g = ops.ce_bwd_(logits, tc, lse, ignore_index, scale)  # (r, V), in place
                if want_h:
                    torch.mm(g, weight, out=grad_h[lo:hi])
                if want_w:
                    grad_w.addmm_(g.t(), hc)
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        return (total / count).float() if count else torch.tensor(float("nan"))

    @staticmethod
    def backward(ctx, grad: Tensor):
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0) * grad if ctx.needs_input_grad[0] else None
        grad_w = saved.pop(0) * grad if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, target: Tensor, ignore_index: int = -100,
                         chunk_rows: int | None = None) -> Tensor:
    """cross_entropy(h (T, d) @ weight (V, d)^T, target (T,), ignore_index): the lm_head and the mean
    loss without ever holding the (T, V) logits or their gradient, only one (chunk_rows, V) buffer
    (~32 MiB by default). float32 CPU tensors outside autocast run the chunked path over
    csrc/cross_entropy.cpp; anything else is linear_cross_entropy_ref (the twin)."""
    if (not isinstance(h, Tensor) or not isinstance(weight, Tensor) or not isinstance(target, Tensor)
            or h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1] or h.shape[0] == 0
            or target.shape != h.shape[:1] or target.dtype != torch.long
            or h.dtype != torch.float32 or weight.dtype != torch.float32 or torch.is_autocast_enabled("cpu")):
        return linear_cross_entropy_ref(h, weight, target, ignore_index)
    ops = _kernels_for(h, weight, target)
    if ops is None:
        return linear_cross_entropy_ref(h, weight, target, ignore_index)
    rows = chunk_rows if chunk_rows is not None else _loss_chunk_rows(weight.shape[0])
    if rows < 1:
        raise InputError(f"linear_cross_entropy: chunk_rows must be >= 1, got {rows}")
    bad = (target != ignore_index) & ((target < 0) | (target >= weight.shape[0]))  # checked here: rows are global
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        raise InputError(f"linear_cross_entropy: target {int(target[r])} at row {r} is out of range for "
                         f"{weight.shape[0]} classes")
    return _LinearCrossEntropyFn.apply(h.contiguous(), weight.contiguous(), target.contiguous(), ignore_index, rows)


# ---------------------------------------------------------------- decode attention

_DECODE_ATTENTION_MAX_GROUP = 64  # query heads per kv head the kernel takes (kMaxGroup in csrc/attention.cpp)

def decode_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """One query per head, q (B, H, hd), over every key of k, v (B, Hk, S, hd) (views of a KV cache
    are fine), all visible; (B, H, hd). float32 CPU tensors without autograd run csrc/attention.cpp
    (each K/V row read once, the keys split over the threads); anything else decode_attention_ref."""
    shapes_ok = (q.dim() == 3 and k.dim() == 4 and v.shape == k.shape and k.shape[0] == q.shape[0]
                 and k.shape[3] == q.shape[2] and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0 and k.shape[2] > 0)
    if not shapes_ok:
        raise InputError(f"decode_attention: q {tuple(q.shape)} must be (B, H, hd) and k, v (B, Hk, S, hd) with H a "
                         f"multiple of Hk, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    rows_ok = all(t.stride(3) == 1 and t.stride(2) == t.shape[3] for t in (k, v))
    if (q.dtype != torch.float32 or k.dtype != torch.float32 or v.dtype != torch.float32 or not rows_ok
            or _needs_grad(q, k, v) or q.shape[1] // k.shape[1] > _DECODE_ATTENTION_MAX_GROUP):
        return decode_attention_ref(q, k, v)
    ops = _kernels_for(q, k, v)
    if ops is None:
        return decode_attention_ref(q, k, v)
    return ops.decode_attention(q.contiguous(), k, v)
