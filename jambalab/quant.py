"""Int8 weight-only quantization as a module swap (gpt-fast style), no calibration.

Legend: O output features, I input features, E experts, F d_ff, d d_model, V vocab.

Per-output-channel symmetric int8: w[o, :] ~= q[o, :] * scale[o], q in [-127, 127],
scale = max|w[o, :]| / 127. The matmul dequantizes on the fly:
y = (x @ q.T) * scale. Jamba-1.5's ExpertsInt8 does the same to the MoE/MLP weights and
needs no calibration either.

What is quantized: every nn.Linear in attention (q/k/v/o), the dense MLPs, the Mamba
in_proj and out_proj, and the stacked MoE experts (per expert, per output channel). These
are >95% of a Jamba's weights.

What stays in high precision, and why:
- Mamba's A_log, D, conv1d, and the selection path x_proj -> dt_proj: dt, B and C set the
  state's decay exp(dt * A) and input; errors there compound over the sequence, and they are
  a few percent of a mixer's weights.
- norms, the embedding, the MoE router (a flipped top-K choice is a large error).
- lm_head: its error lands directly on the logits (greedy argmax), it is tied to the
  embedding in Mamba models (quantizing would add a second copy, not save memory), and it
  is ~0.5% of Jamba-v0.1's weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from jambalab.model import JambaLM, MambaMixer, MoE

_KEEP_IN_MAMBA = ("x_proj", "dt_proj")


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., O, I) -> (int8 q (..., O, I), scale (..., O) in w's dtype); symmetric, per output row."""
    amax = w.float().abs().amax(dim=-1)  # (..., O)
    scale = (amax / 127.0).clamp(min=1e-12)  # an all-zero row gets a tiny scale, q = 0
    q = torch.round(w.float() / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale.to(w.dtype)


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 (O, I) with one scale per output row."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = quantize_per_channel(linear.weight.detach())
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        self.bias = linear.bias  # biases stay in high precision
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8MoE(MoE):
    """The MoE with int8 stacked experts: w_* (E, F, d) / (E, d, F) int8 and scales (E, F) / (E, d).

    Routing is the parent's (router stays in high precision); only the expert matmuls change."""

    def __init__(self, moe: MoE):
        nn.Module.__init__(self)  # skip MoE.__init__: it would allocate float experts
        self.top_k, self.router = moe.top_k, moe.router
        for name in ("w_gate", "w_up", "w_down"):
            q, scale = quantize_per_channel(getattr(moe, name).detach())
            self.register_buffer(name, q)
            self.register_buffer(f"{name}_scale", scale)

    def dispatch(self, h: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        flat = experts.reshape(-1)  # (T*K,)
        order = torch.argsort(flat, stable=True)  # token-slots grouped by expert
        token = order // self.top_k  # (T*K,) source token of each sorted slot
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        outs = []
        for e, xs in enumerate(torch.split(h[token], counts)):
            if counts[e]:
                g, u = self._expert_linear(xs, "w_gate", e), self._expert_linear(xs, "w_up", e)
                outs.append(self._expert_linear(F.silu(g) * u, "w_down", e))
        y = torch.cat(outs) * weights.reshape(-1)[order, None]  # (T*K, d)
        return torch.zeros_like(h).index_add_(0, token, y.to(h.dtype))

    def _expert_linear(self, x: torch.Tensor, name: str, e: int) -> torch.Tensor:
        q, scale = getattr(self, name)[e], getattr(self, f"{name}_scale")[e]  # (O, I), (O,)
        return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)


# ---------------------------------------------------------------------------------------
# The swap
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def quantize_int8(model: JambaLM) -> JambaLM:
    """Swap the quantizable modules for int8 ones, in place, one module at a time (so the peak is
    the float model plus one int8 module). Returns the model."""
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if _should_quantize(parent, name, child):
                setattr(parent, name, Int8Linear(child))
            elif isinstance(child, MoE) and not isinstance(child, Int8MoE):
                setattr(parent, name, Int8MoE(child))
    return model


def _should_quantize(parent: nn.Module, name: str, child: nn.Module) -> bool:
    if not isinstance(child, nn.Linear):  # jambalab.model.Linear included; Int8Linear is not one
        return False
    if isinstance(parent, JambaLM) and name == "lm_head":
        return False
    if isinstance(parent, MoE) and name == "router":
        return False
    return not (isinstance(parent, MambaMixer) and name in _KEEP_IN_MAMBA)


def load_int8(path, dtype: torch.dtype | str | None = None) -> JambaLM:
    """Load a HF checkpoint and quantize it. The float weights are loaded first (peak memory = the
    model in `dtype`), then swapped module by module."""
    from jambalab.hf import from_pretrained

    return quantize_int8(from_pretrained(path, dtype=dtype))


# ---------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------
def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers (tied weights counted once); works on the meta device."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def logit_drift(reference: JambaLM, quantized: JambaLM, input_ids: torch.Tensor) -> dict[str, float]:
    """How far the quantized model's logits move from the reference's on input_ids (B, L).

    rel_l2: ||dlogits|| / ||logits|| per position, averaged; max_abs: largest logit change;
    kl: mean KL(reference || quantized) in nats; top1_agree: fraction of positions with the same argmax."""
    ref = reference(input_ids).logits.float()  # (B, L, V)
    got = quantized(input_ids).logits.float()
    rel = (got - ref).norm(dim=-1) / ref.norm(dim=-1).clamp(min=1e-12)  # (B, L)
    logp_ref, logp_got = F.log_softmax(ref, -1), F.log_softmax(got, -1)
    kl = (logp_ref.exp() * (logp_ref - logp_got)).sum(-1)  # (B, L)
    return {
        "rel_l2": rel.mean().item(),
        "max_abs": (got - ref).abs().max().item(),
        "kl": kl.mean().item(),
        "top1_agree": (ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
    }
