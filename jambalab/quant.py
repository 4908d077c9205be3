"""Weight-only quantization (int8, 4-bit) as a module swap (gpt-fast style), no calibration, weight-only
bf16, and the saved-quantized checkpoint format.

Legend: O output features, I input features, E experts, F d_ff, d d_model, V vocab, G group size.

Formats (jambalab/ops/quant_ref.py): symmetric round-to-nearest per group of G input features,
fp16 scales. "int8": q in [-127, 127], per output channel by default (G = I); "int4": two weights a
byte, groups of 32 by default (llama.cpp's Q4_0 arithmetic). The matmuls read these directly
(jambalab/ops/lowp.py): decode GEMVs read them in place, prefill dequantizes a tile of rows at a
time into the GEMM dtype.

Activations: by default every product with a quantized weight first rounds x to int8 in blocks of
32 (llama.cpp's Q8_0 activations), so that decode multiplies integers (vpdpbusd); prefill rounds x
the same way, so both compute the same function. set_activations("float") keeps x as it is: the
exact product with the dequantized weight (and a slower decode). CLI: --activations int8|float.

What is quantized: every nn.Linear in attention (q/k/v/o), the dense MLPs, the Mamba in_proj and
out_proj, the stacked MoE experts (per expert; Jamba-1.5's ExpertsInt8), and the lm_head when it
is not tied to the embedding (Falcon Mamba's and Jamba's are not: 65K x 4096, a quarter of the
bytes a decode step of a few-layer model reads; llama.cpp's Q8_0 / Q4_0 quantize it too).

Weight-only bf16 ("bf16"): the same matrices stored in bf16 and nothing else changed: the modules stay
Linear / MoE, the float part and the activations stay float32. This is llama.cpp's BF16 layout (a bf16
*model* instead keeps bf16 activations and states, as HF's): half of fp32's bytes per decode token;
each product rounds its input to bf16 and sums the exact products in fp32, as llama.cpp's BF16 matmul
(jambalab/ops/lowp.py); the whole decode token in one call (csrc/step.cpp), and prefill on the bf16
GEMM where the CPU has one.

Mamba's selection path (x_proj -> dt_proj) is never quantized to int8 / 4-bit: dt, B and C set the
state's decay exp(dt * A) and input, and errors there compound over the sequence. int8 and 4-bit
store it in bf16 instead (weight-only bf16, as above) when it is float32 (a bf16 or fp16 one stays as
it is); weight-only bf16 stores it in bf16 with its other matrices. A released checkpoint is bf16, so
that loses nothing of its weights, only x is rounded to bf16 on the way in. It is ~4% of a mixer's
weights, but kept in fp32 beside 4-bit matrices it was ~24% of the bytes a Falcon-Mamba-7B-shaped
decode step reads per layer (llama.cpp's Q4_0 / Q8_0 quantize it).

What stays in the model's float dtype, and why:
- Mamba's A_log, D and conv1d (small; conv1d as llama.cpp keeps it).
- norms, the embedding (a decode step reads one row of it), the MoE router (a flipped top-K choice
  is a large error).
- a lm_head tied to the embedding (Mamba): quantizing it would add a second copy, not save memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from jambalab import ops
from jambalab.config import JambaConfig
from jambalab.errors import CheckpointError, InputError
from jambalab.model import JambaLM, MambaMixer, MoE
from jambalab.ops.quant_ref import SCHEMES, QuantWeight, activations, check_group_size, quantize_weight, set_activations

_SELECTION = ("x_proj", "dt_proj")  # Mamba's selection path: out of int8 / 4-bit, stored in bf16
SELECTION_DTYPE = torch.bfloat16
DEFAULT_GROUP = {"int8": None, "int4": 32}  # None: per output channel
WEIGHT_DTYPES = {"bf16": torch.bfloat16}  # weight-only float schemes: the matrices stored in this dtype
_STACKS = ("w_gate", "w_up", "w_down")  # an MoE's stacked expert matrices
FORMAT = "jambalab-weight-only"
FORMAT_VERSION = 2  # 2: the selection path in bf16; 1 (still read): in the float dtype
READ_VERSIONS = (1, FORMAT_VERSION)


class QuantLinear(nn.Module):
    """A Linear with an int8 / 4-bit weight: buffers `weight` (O, I) int8 or (O, I/2) uint8 and
    `scales` (O, I/G) fp16; the bias stays in high precision."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: nn.Parameter | None,
                 device: torch.device | str = "cpu"):
        """Empty quantized storage (filled by from_linear or a checkpoint)."""
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        packed = in_features // 2 if bits == 4 else in_features
        dtype = torch.uint8 if bits == 4 else torch.int8
        self.register_buffer("weight", torch.empty(out_features, packed, dtype=dtype, device=device))
        self.register_buffer("scales", torch.empty(out_features, in_features // group_size, dtype=torch.float16,
                                                   device=device))
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None, name: str) -> QuantLinear:
        qw = quantize_weight(linear.weight.detach(), bits, group_size, name)
        q = cls(linear.in_features, linear.out_features, bits, qw.group_size, linear.bias)
        q.weight, q.scales = qw.data, qw.scales
        return q

    @property
    def qweight(self) -> QuantWeight:
        return QuantWeight(self.weight, self.scales, self.bits, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.qweight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, group={self.group_size}"


class QuantMoE(MoE):
    """The MoE with quantized stacked experts: buffers w_gate / w_up (E, F, d), w_down (E, d, F) in the
    packed format, each with `<name>_scales` (E, rows, in / G). Routing is the parent's (the router
    stays float)."""

    _STACKS = _STACKS

    def __init__(self, moe: MoE, bits: int, group_size: int | None):
        """Empty quantized storage shaped for moe's experts (filled by from_moe or a checkpoint)."""
        nn.Module.__init__(self)  # skip MoE.__init__: it would allocate float experts
        self.top_k, self.router, self.bits = moe.top_k, moe.router, bits
        dtype = torch.uint8 if bits == 4 else torch.int8
        for w in self._STACKS:
            E, O, I = getattr(moe, w).shape
            G = I if group_size is None else group_size
            device = getattr(moe, w).device
            self.register_buffer(w, torch.empty(E, O, I // 2 if bits == 4 else I, dtype=dtype, device=device))
            self.register_buffer(f"{w}_scales", torch.empty(E, O, I // G, dtype=torch.float16, device=device))
            setattr(self, f"{w}_group", G)

    @classmethod
    def from_moe(cls, moe: MoE, bits: int, group_size: int | None, name: str) -> QuantMoE:
        q = cls(moe, bits, group_size)
        for w in cls._STACKS:
            qw = quantize_weight(getattr(moe, w).detach(), bits, group_size, f"{name}.{w}")
            setattr(q, w, qw.data)
            setattr(q, f"{w}_scales", qw.scales)
        return q

    @property
    def n_experts(self) -> int:
        return self.w_gate.shape[0]

    def expert_weights(self) -> list[tuple[QuantWeight, QuantWeight, QuantWeight]]:
        """Per-expert views, made once and kept while the buffers stay the same (a decode step would
        otherwise make 3 x E x 2 views per MoE layer)."""
        key = tuple(getattr(self, n).data_ptr() for w in self._STACKS for n in (w, f"{w}_scales"))
        cached = self.__dict__.get("_experts_cached")
        if cached is None or cached[0] != key:
            stacks = [QuantWeight(getattr(self, w), getattr(self, f"{w}_scales"), self.bits, getattr(self, f"{w}_group"))
                      for w in self._STACKS]
            cached = (key, list(zip(*(s.unbind() for s in stacks))))
            self.__dict__["_experts_cached"] = cached
        return cached[1]


# ---------------------------------------------------------------------------------------
# The swap
# ---------------------------------------------------------------------------------------
def parse_scheme(scheme: str, group_size: int | None = None) -> int:
    """'int8' -> 8, 'int4' -> 4, 'bf16' -> 16; anything else, or a group size with 'bf16' (which has
    none), is an InputError."""
    bits = {**SCHEMES, **{k: 16 for k in WEIGHT_DTYPES}}
    if scheme not in bits:
        raise InputError(f"quantize must be one of {sorted(bits)} (or None), got {scheme!r}")
    if scheme in WEIGHT_DTYPES and group_size is not None:
        raise InputError(f"quantize={scheme!r} takes no group size (got {group_size}): it only stores the "
                         "matrices in bf16")
    return bits[scheme]


def scheme_info(scheme: str, group_size: int | None) -> dict:
    """What a quantized model records as `model.quantization` (and a saved one in its config)."""
    return {"scheme": scheme, "bits": parse_scheme(scheme, group_size), "group_size": group_size}


@torch.no_grad()
def quantize_model(model: JambaLM, scheme: str, group_size: int | None = None) -> JambaLM:
    """Swap the quantizable modules for `scheme` ('int8' or 'int4') ones, in place, one module at a
    time (the float weight of each is dropped as its quantized twin replaces it). group_size None
    takes the scheme's default (int8: per output channel, int4: 32). Every group size is checked
    against every matrix before anything is swapped, so a bad one leaves the model untouched.
    'bf16' (weight-only bf16) casts the same matrices to bf16 in place instead, with no group size."""
    bits = parse_scheme(scheme, group_size)
    done = getattr(model, "quantization", None)
    if done is not None:
        raise InputError(f"quantize: the model is already quantized ({done.get('scheme')}); load the float "
                         "checkpoint again to quantize it another way")
    if scheme in WEIGHT_DTYPES:
        cast_weights(model, WEIGHT_DTYPES[scheme])
        model.quantization = scheme_info(scheme, None)
        return model
    group = DEFAULT_GROUP[scheme] if group_size is None else group_size
    targets = list(_targets(model))
    if not targets:
        raise InputError("quantize: the model has no float matrices left to quantize (already quantized?)")
    for name, _, _, child in targets:
        for width in _in_features(child):
            check_group_size(bits, width if group is None else group, width, name)
    for name, parent, attr, child in targets:
        if isinstance(child, MoE):
            setattr(parent, attr, QuantMoE.from_moe(child, bits, group, name))
        else:
            setattr(parent, attr, QuantLinear.from_linear(child, bits, group, name))
    cast_selection(model)
    model.quantization = scheme_info(scheme, group)
    return model


def cast_weights(model: JambaLM, dtype: torch.dtype, selection: bool = True) -> JambaLM:
    """Store the matrices quantize_model would quantize, and (selection) Mamba's selection path, in
    `dtype` (weight-only bf16), in place, one at a time; works on the meta device (a saved checkpoint's
    skeleton)."""
    for _, module, attr in _weight_only_matrices(model, selection):
        if getattr(module, attr).dtype != dtype:
            _cast(module, attr, dtype)
    return model


def cast_selection(model: JambaLM) -> JambaLM:
    """Mamba's selection path (x_proj, dt_proj) from float32 to bf16, in place (int8 / 4-bit models);
    a bf16 or fp16 one stays as it is."""
    for _, module, attr in _selection_matrices(model):
        if getattr(module, attr).dtype == torch.float32:
            _cast(module, attr, SELECTION_DTYPE)
    return model


def _cast(module: nn.Module, attr: str, dtype: torch.dtype) -> None:
    """module.attr replaced by a frozen copy in dtype (the float one is dropped)."""
    setattr(module, attr, nn.Parameter(getattr(module, attr).detach().to(dtype), requires_grad=False))


def weight_dtype_names(model: JambaLM) -> list[str]:
    """The parameter names cast_weights casts (the loader reads those straight into the weight dtype)."""
    return [name for name, _, _ in _weight_only_matrices(model, selection=True)]


def _weight_only_matrices(model: JambaLM, selection: bool):
    """(parameter name, module, attribute) of the quantize targets' matrices, then of the selection path."""
    for name, _, _, child in list(_targets(model)):
        for n in _matrix_attrs(child):
            yield f"{name}.{n}", child, n
    if selection:
        yield from _selection_matrices(model)


def _selection_matrices(model: JambaLM):
    """(parameter name, Linear, "weight") of every Mamba mixer's x_proj and dt_proj."""
    for name, module in list(model.named_modules()):
        if isinstance(module, MambaMixer):
            for attr in _SELECTION:
                yield f"{name}.{attr}.weight", getattr(module, attr), "weight"


def _matrix_attrs(module: nn.Module) -> tuple[str, ...]:
    """The attributes holding a quantize target's matrices: an MoE's stacks, a Linear's weight."""
    return _STACKS if isinstance(module, MoE) else ("weight",)


def _targets(model: JambaLM):
    """(qualified name, parent, attribute, module) of every module quantize_model swaps."""
    for parent_name, parent in list(model.named_modules()):
        for attr, child in list(parent.named_children()):
            name = f"{parent_name}.{attr}" if parent_name else attr
            if isinstance(child, MoE) and not isinstance(child, QuantMoE):
                yield name, parent, attr, child
            elif _should_quantize(model, parent, attr, child):
                yield name, parent, attr, child


def _in_features(module: nn.Module) -> list[int]:
    if isinstance(module, MoE):
        return [module.w_gate.shape[-1], module.w_down.shape[-1]]
    return [module.in_features]


def _should_quantize(model: JambaLM, parent: nn.Module, name: str, child: nn.Module) -> bool:
    if not isinstance(child, nn.Linear):  # jambalab.model.Linear included; QuantLinear is not one
        return False
    if parent is model and name == "lm_head":
        return child.weight is not model.embed.weight  # a tied head stays float (one copy, shared)
    if isinstance(parent, MoE) and name == "router":
        return False
    return not (isinstance(parent, MambaMixer) and name in _SELECTION)


# ---------------------------------------------------------------------------------------
# Saved-quantized checkpoints
# ---------------------------------------------------------------------------------------
def save_quantized(model: JambaLM, path: str | Path) -> None:
    """Write a quantized model as config.json (the HF config plus a `quantization_config`) and
    model.safetensors holding jambalab's own state-dict keys (packed weights, fp16 scales, the float
    rest). from_pretrained / load_quantized read it back without re-quantizing. Written to a
    temporary folder first and renamed, so a failure leaves nothing half-written."""
    from safetensors.torch import save_file

    from jambalab.hf import to_hf_config

    info = getattr(model, "quantization", None)
    if info is None:
        raise InputError("save_quantized: the model is not quantized (call quantize_model first)")
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    float_dtype = model.embed.weight.dtype
    try:  # the HF config where one exists, so that tools can read the architecture; ours is the one loaded
        cfg = to_hf_config(model.config, float_dtype)
    except CheckpointError:
        cfg = {}
    cfg["quantization_config"] = {"quant_method": FORMAT, "format_version": FORMAT_VERSION, **info,
                                  "float_dtype": str(float_dtype).removeprefix("torch."),
                                  "jambalab_config": model.config.to_dict()}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as embed.weight
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "jambalab": FORMAT})
    path.mkdir(parents=True, exist_ok=True)
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):  # the config last: never beside old weights
        f.replace(path / f.name)
    tmp.rmdir()


def quantization_config(path: str | Path) -> dict | None:
    """The `quantization_config` of a checkpoint folder's config.json, or None."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # not ours to judge: the float loader names what is wrong with it
    return cfg.get("quantization_config") if isinstance(cfg, dict) else None


@torch.no_grad()
def load_quantized(path: str | Path, scheme: str | None = None, group_size: int | None = None,
                   dtype: torch.dtype | str | None = None) -> JambaLM:
    """Load a checkpoint written by save_quantized: memory-mapped, never re-quantized. scheme /
    group_size / dtype (of the float tensors), if given, must match what was saved."""
    from safetensors import safe_open

    path = Path(path)
    qc = quantization_config(path)
    if not qc or qc.get("quant_method") != FORMAT:
        raise InputError(f"{path / 'config.json'}: not a jambalab quantized checkpoint "
                         f"(quantization_config.quant_method must be {FORMAT!r}, got {(qc or {}).get('quant_method')!r})")
    if qc.get("format_version") not in READ_VERSIONS:
        raise InputError(f"{path / 'config.json'}: quantized format version {qc.get('format_version')!r}, "
                         f"this jambalab reads {' and '.join(map(str, READ_VERSIONS))}")
    for key, want in (("scheme", scheme), ("group_size", group_size)):
        if want is not None and qc.get(key) != want:
            raise InputError(f"{path}: saved with {key}={qc.get(key)!r}, asked for {want!r}")
    float_dtype = _float_dtype(qc, path)
    if dtype is not None and (dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype), None)) != float_dtype:
        raise InputError(f"{path}: saved quantized with {float_dtype} float tensors, asked for dtype {dtype}")
    cfg = JambaConfig.from_dict(qc.get("jambalab_config") or {}, source=f"{path / 'config.json'} jambalab_config")
    file = path / "model.safetensors"
    if not file.is_file():
        raise InputError(f"{path}: no model.safetensors")
    with safe_open(str(file), framework="pt") as f:
        model = _quantized_skeleton(cfg, qc, float_dtype)
        expected = model.state_dict()
        keys = set(f.keys())
        want_keys = set(expected) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
        if keys != want_keys:
            missing, extra = sorted(want_keys - keys), sorted(keys - want_keys)
            raise InputError(f"{file}: quantized tensors do not match the config "
                             f"(missing {missing[:5]}, unexpected {extra[:5]})")
        tensors = {}
        for k in sorted(keys):
            t = f.get_tensor(k)
            if t.shape != expected[k].shape or t.dtype != expected[k].dtype:
                raise InputError(f"{file}: tensor {k} is {tuple(t.shape)} {t.dtype}, the config expects "
                                 f"{tuple(expected[k].shape)} {expected[k].dtype} (another format or group size?)")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise InputError(f"{file}: tensor {k} holds NaN or Inf")
            tensors[k] = t
    model.load_state_dict(tensors, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise InputError(f"{file}: no tensor for {left[:5]}")
    model.quantization = {k: qc[k] for k in ("scheme", "bits", "group_size")}
    return model.eval()


def _float_dtype(qc: dict, path: Path) -> torch.dtype:
    """The dtype of the tensors that stayed float (quantization_config.float_dtype)."""
    name = qc.get("float_dtype")
    if name not in ("float32", "bfloat16", "float16"):
        raise InputError(f"{path / 'config.json'}: quantization_config.float_dtype must be float32, bfloat16 or "
                         f"float16, got {name!r}")
    return getattr(torch, name)


def _quantized_skeleton(cfg, qc: dict, dtype: torch.dtype) -> JambaLM:
    """A model of cfg on the meta device in dtype, its modules swapped as quantize_model would (shapes only;
    a format version 1 checkpoint kept the selection path in the float dtype)."""
    with torch.device("meta"):
        model = JambaLM(cfg).to(dtype)
    bits = parse_scheme(qc["scheme"])
    selection = qc["format_version"] >= 2
    if qc["scheme"] in WEIGHT_DTYPES:
        return cast_weights(model, WEIGHT_DTYPES[qc["scheme"]], selection)
    if selection:
        cast_selection(model)
    group = qc["group_size"]
    for name, parent, attr, child in list(_targets(model)):
        if isinstance(child, MoE):
            setattr(parent, attr, QuantMoE(child, bits, group))
        else:
            width = child.in_features
            setattr(parent, attr, QuantLinear(width, child.out_features, bits, width if group is None else group,
                                              child.bias, device="meta"))
    return model


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
