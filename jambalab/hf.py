"""HuggingFace checkpoints in and out: config.json + safetensors (single file or sharded).

Families: model_type "jamba" (JambaForCausalLM), "mamba" (MambaForCausalLM) and
"falcon_mamba" (FalconMambaForCausalLM). The model is built on the meta device and
its tensors are assigned one at a time:

  - a tensor already in the wanted dtype is memory-mapped, not copied: it is a view of
    the file through its own mapping, so its pages are read on first use and unmapped
    when the tensor is freed (quantizing a model frees its float weights module by module);
  - a tensor in another dtype is converted on its own and its file pages released, so
    loading never holds more than the model plus one tensor (never the model in fp32 and
    the file at once).

Every tensor is checked for NaN and Inf as it is read. The key map is explicit (litgpt
style): every tensor we expect is named, anything missing, extra or mis-shaped is an error.
A directory may be a model directory or anything that holds one (a training checkpoint
step-N/, a training run), see resolve_model_dir.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from jambalab.config import JambaConfig
from jambalab.errors import CheckpointError, ConfigError, InputError
from jambalab.model import JambaLM, MoE

FAMILIES = ("jamba", "mamba", "falcon_mamba")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
# Expert tensors on disk, per expert, in HF's Jamba layout (transformers 5.x packs them only in memory).
_EXPERT_PARAMS = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}


# =======================================================================================
# Config
# =======================================================================================
def resolve_model_dir(path: str | Path) -> Path:
    """The model directory inside what the user pointed at (first match wins): a model directory
    (config.json or jambalab_config.json), <dir>/model (a training checkpoint step-N/), or the latest
    <run>/checkpoints/step-N/model of a `jambalab train` or `jambalab ablate` run (or of a
    checkpoints directory itself)."""
    from jambalab.train.checkpoint import MODEL_DIR, NATIVE_CONFIG, latest_checkpoint

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    if (p / "config.json").is_file() or (p / NATIVE_CONFIG).is_file():
        return p
    if (p / MODEL_DIR).is_dir():
        return p / MODEL_DIR
    for root in (p / "checkpoints", p):
        ckpt = latest_checkpoint(root)
        if ckpt is not None:
            return ckpt / MODEL_DIR
    raise CheckpointError(f"{p} is not a model directory, a training run or an ablation run (no config.json, "
                          f"model/ or checkpoints/step-*/ inside)")


def load_config(path: str | Path) -> JambaConfig:
    """Read a checkpoint directory's config.json into a JambaConfig (path as resolve_model_dir takes it)."""
    given = Path(path)
    if not given.is_dir():
        raise CheckpointError(f"checkpoint directory {given} does not exist")
    path = resolve_model_dir(given)
    native = _native_config(path)
    if native is not None:
        return native
    cfg_file = path / "config.json"
    try:
        hf = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(f"{cfg_file}: model_type {model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
    try:
        cfg = _jamba_from_hf(hf) if model_type == "jamba" else _mamba_from_hf(hf, model_type)
    except ConfigError as e:
        raise ConfigError(f"{cfg_file}: {e}") from None
    except KeyError as e:
        raise CheckpointError(f"{cfg_file}: required key {e} is missing") from None
    cfg.name = given.name
    return cfg


def _native_config(path: Path) -> JambaConfig | None:
    """The config of a model saved in jambalab's own layout (jambalab.train.checkpoint), else None."""
    from jambalab.train.checkpoint import NATIVE_CONFIG

    file = path / NATIVE_CONFIG
    if not file.is_file():
        return None
    try:
        return JambaConfig.from_dict(json.loads(file.read_text()), source=str(file))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None


def _first(v):
    return v[0] if isinstance(v, list) and v else v


def _dt_rank(v, hidden: int) -> int:
    return math.ceil(hidden / 16) if v in (None, "auto") else int(v)


def _jamba_from_hf(hf: dict[str, Any]) -> JambaConfig:
    _require_silu(hf)
    hidden = hf["hidden_size"]
    n_layers = hf["num_hidden_layers"]
    n_experts = hf.get("num_experts", hf.get("num_local_experts", 16))
    attn_period, attn_offset = hf.get("attn_layer_period", 8), hf.get("attn_layer_offset", 4)
    exp_period, exp_offset = hf.get("expert_layer_period", 2), hf.get("expert_layer_offset", 1)
    # Older configs may spell the layout out as lists; reduce them to period/offset.
    if "layers_block_type" in hf:
        attn_period, attn_offset = _periodic([t == "attention" for t in hf["layers_block_type"]], "layers_block_type")
    if "layers_num_experts" in hf:
        exp_period, exp_offset = _periodic([n > 1 for n in hf["layers_num_experts"]], "layers_num_experts")
        n_experts = max(hf["layers_num_experts"])
    expand = hf.get("mamba_expand", 2)
    eps = hf.get("rms_norm_eps", 1e-6)
    return JambaConfig(
        vocab_size=hf["vocab_size"], d_model=hidden, n_layers=n_layers,
        attn_layer_period=attn_period, attn_layer_offset=attn_offset,
        expert_layer_period=exp_period, expert_layer_offset=exp_offset,
        n_experts=n_experts, top_k=min(hf.get("num_experts_per_tok", 2), n_experts),
        n_heads=hf.get("num_attention_heads", 32),
        n_kv_heads=hf.get("num_key_value_heads") or hf.get("num_attention_heads", 32),
        d_ff=hf["intermediate_size"], d_state=hf.get("mamba_d_state", 16), d_conv=hf.get("mamba_d_conv", 4),
        expand=expand, d_inner=expand * hidden, dt_rank=_dt_rank(hf.get("mamba_dt_rank", "auto"), hidden),
        mamba_inner_norm="learnable", mamba_inner_norm_eps=eps, norm_eps=eps,
        mamba_conv_bias=hf.get("mamba_conv_bias", True), mamba_proj_bias=hf.get("mamba_proj_bias", False),
        residual_in_fp32=False, tie_embeddings=hf.get("tie_word_embeddings", False),
        router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001), init_std=hf.get("initializer_range", 0.02),
        pad_token_id=hf.get("pad_token_id", 0), bos_token_id=_first(hf.get("bos_token_id", 1)),
        eos_token_id=_first(hf.get("eos_token_id", 2)),
    )


def _mamba_from_hf(hf: dict[str, Any], model_type: str) -> JambaConfig:
    _require_silu(hf)
    hidden = hf["hidden_size"]
    expand = hf.get("expand", 2)
    # Falcon Mamba 7B says expand 16 next to intermediate_size 8192: the explicit size wins.
    d_inner = hf.get("intermediate_size") or expand * hidden
    return JambaConfig(
        vocab_size=hf["vocab_size"], d_model=hidden, n_layers=hf["num_hidden_layers"],
        attn_layer_period=0, attn_layer_offset=0, expert_layer_period=0, expert_layer_offset=0,
        n_experts=1, top_k=1, d_ff=0, d_state=hf.get("state_size", 16), d_conv=hf.get("conv_kernel", 4),
        expand=expand, d_inner=d_inner, dt_rank=_dt_rank(hf.get("time_step_rank", "auto"), hidden),
        mamba_inner_norm="weightless" if model_type == "falcon_mamba" else "none",
        mamba_inner_norm_eps=hf.get("mixer_rms_eps", 1e-6), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mamba_conv_bias=hf.get("use_conv_bias", True), mamba_proj_bias=hf.get("use_bias", False),
        residual_in_fp32=hf.get("residual_in_fp32", True), tie_embeddings=hf.get("tie_word_embeddings", True),
        init_std=hf.get("initializer_range", 0.1), pad_token_id=hf.get("pad_token_id", 0),
        bos_token_id=_first(hf.get("bos_token_id", 0)), eos_token_id=_first(hf.get("eos_token_id", 0)),
    )


def _require_silu(hf: dict[str, Any]) -> None:
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"hidden_act {act!r} is not supported (only silu)")


def _periodic(flags: list[bool], key: str) -> tuple[int, int]:
    """Smallest (period, offset) reproducing a per-layer flag list; (0, 0) if never set."""
    hits = [i for i, f in enumerate(flags) if f]
    if not hits:
        return 0, 0
    for period in range(1, len(flags) + 1):
        offset = hits[0] % period
        if all(f == (i % period == offset) for i, f in enumerate(flags)):
            return period, offset
    raise ConfigError(f"{key} is not a periodic layer pattern")


def to_hf_config(cfg: JambaConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The config.json transformers needs to load this model and compute the same logits."""
    _check_exportable(cfg)
    common = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
              "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings, "pad_token_id": cfg.pad_token_id,
              "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "initializer_range": cfg.init_std,
              "dtype": str(dtype).removeprefix("torch.")}
    if cfg.family == "jamba":
        never = (cfg.n_layers + 1, cfg.n_layers)  # a period/offset pair that matches no layer
        attn = (cfg.attn_layer_period, cfg.attn_layer_offset) if cfg.attn_layer_period else never
        moe = (cfg.expert_layer_period, cfg.expert_layer_offset) if cfg.n_moe_layers else never
        return {**common, "architectures": ["JambaForCausalLM"], "model_type": "jamba",
                "intermediate_size": cfg.d_ff, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
                "attn_layer_period": attn[0], "attn_layer_offset": attn[1],
                "expert_layer_period": moe[0], "expert_layer_offset": moe[1],
                "num_experts": cfg.n_experts if cfg.n_moe_layers else 1,
                "num_experts_per_tok": cfg.top_k if cfg.n_moe_layers else 1,
                "mamba_d_state": cfg.d_state, "mamba_d_conv": cfg.d_conv, "mamba_expand": cfg.d_inner // cfg.d_model,
                "mamba_dt_rank": cfg.dt_rank, "mamba_conv_bias": cfg.mamba_conv_bias,
                "mamba_proj_bias": cfg.mamba_proj_bias, "rms_norm_eps": cfg.norm_eps,
                "router_aux_loss_coef": cfg.router_aux_loss_coef, "output_router_logits": False,
                "max_position_embeddings": 262144, "attention_dropout": 0.0}
    arch = "FalconMambaForCausalLM" if cfg.family == "falcon_mamba" else "MambaForCausalLM"
    out = {**common, "architectures": [arch], "model_type": cfg.family, "state_size": cfg.d_state,
           "conv_kernel": cfg.d_conv, "expand": cfg.d_inner // cfg.d_model, "intermediate_size": cfg.d_inner,
           "time_step_rank": cfg.dt_rank, "layer_norm_epsilon": cfg.norm_eps, "use_bias": cfg.mamba_proj_bias,
           "use_conv_bias": cfg.mamba_conv_bias, "residual_in_fp32": cfg.residual_in_fp32}
    if cfg.family == "falcon_mamba":
        out["mixer_rms_eps"] = cfg.mamba_inner_norm_eps
    return out


def _check_exportable(cfg: JambaConfig) -> None:
    """Refuse configs that transformers would load but compute differently."""
    problems = []
    if cfg.rope:
        problems.append("rope=True (HF Jamba/Mamba have no positional encoding)")
    if cfg.d_inner % cfg.d_model:
        problems.append(f"d_inner={cfg.d_inner} is not a multiple of d_model={cfg.d_model} (HF derives it from expand)")
    if cfg.family == "jamba":
        if cfg.residual_in_fp32:
            problems.append("residual_in_fp32=True (HF Jamba keeps the residual in the model dtype)")
        if cfg.n_mamba_layers and cfg.mamba_inner_norm != "learnable":
            problems.append(f"mamba_inner_norm={cfg.mamba_inner_norm!r} (HF Jamba has learnable dt/B/C norms)")
        if cfg.n_mamba_layers and cfg.mamba_inner_norm_eps != cfg.norm_eps:
            problems.append("mamba_inner_norm_eps != norm_eps (HF Jamba uses one rms_norm_eps)")
    if problems:
        raise CheckpointError("this config cannot be saved in HF format without changing its numerics: " + "; ".join(problems))


# =======================================================================================
# Tensor names
# =======================================================================================
def hf_key_map(cfg: JambaConfig, our_keys: list[str]) -> dict[str, str | list[str]]:
    """Our state-dict name -> HF name (or the per-expert HF names stacked into one tensor)."""
    out: dict[str, str | list[str]] = {}
    for key in our_keys:
        if cfg.tie_embeddings and key == "lm_head.weight":
            continue
        out[key] = _hf_name(cfg, key)
    return out


def _hf_name(cfg: JambaConfig, key: str) -> str | list[str]:
    jamba = cfg.family == "jamba"
    root = "model" if jamba else "backbone"
    fixed = {"embed.weight": f"{root}.embed_tokens.weight" if jamba else f"{root}.embeddings.weight",
             "norm_f.weight": f"{root}.final_layernorm.weight" if jamba else f"{root}.norm_f.weight",
             "lm_head.weight": "lm_head.weight"}
    if key in fixed:
        return fixed[key]
    _, i, part, rest = key.split(".", 3)  # layers.{i}.{part}.{rest}
    prefix = f"{root}.layers.{i}"
    if part == "norm1":
        return f"{prefix}.input_layernorm.{rest}" if jamba else f"{prefix}.norm.{rest}"
    if part == "norm2":
        return f"{prefix}.pre_ff_layernorm.{rest}"
    if part == "mixer":
        if cfg.is_attention(int(i)):
            return f"{prefix}.self_attn.{rest}"
        rest = rest.replace("dt_norm.", "dt_layernorm.").replace("b_norm.", "b_layernorm.").replace("c_norm.", "c_layernorm.")
        return f"{prefix}.{'mamba' if jamba else 'mixer'}.{rest}"
    if part == "ffn":
        if rest in _EXPERT_PARAMS:
            return [f"{prefix}.feed_forward.experts.{e}.{_EXPERT_PARAMS[rest]}.weight" for e in range(cfg.n_experts)]
        return f"{prefix}.feed_forward.{rest}"
    raise CheckpointError(f"no HF name for parameter {key}")  # a bug, not user input


# =======================================================================================
# Loading
# =======================================================================================
class _TensorSource:
    """All tensors of a checkpoint directory: names from the headers, tensors read one at a time."""

    def __init__(self, path: Path):
        self.path = path
        index, single = path / "model.safetensors.index.json", path / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
            self.file_of = {k: path / f for k, f in weight_map.items()}
        elif single.is_file():
            self.file_of = {k: single for k in self._keys_of(single)}
        else:
            raise CheckpointError(f"{path} holds no weights (no model.safetensors or model.safetensors.index.json)")

    @staticmethod
    def _keys_of(file: Path) -> list[str]:
        from safetensors import safe_open

        try:
            with safe_open(str(file), "pt") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises SafetensorError / OSError on bad headers
            raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from None

    def get(self, key: str) -> torch.Tensor:
        """The tensor as stored: a view of the file through a mapping of its own (safetensors maps
        the file when it is opened), which is unmapped when the last view of it is freed. So a
        tensor kept as is costs only its own pages, and a converted one's pages go with it."""
        from safetensors import safe_open

        file = self.file_of[key]
        if not file.is_file():
            raise CheckpointError(f"{file} (listed in the index for {key}) does not exist")
        try:
            with safe_open(str(file), "pt") as f:
                return f.get_tensor(key)
        except Exception as e:  # truncated data, bad offsets, a key the index lists but the shard lacks
            raise CheckpointError(f"{file}: cannot read tensor {key} (truncated or corrupt file?): {e}") from None


def from_pretrained(path: str | Path, dtype: torch.dtype | str | None = None, quantize: str | None = None,
                    group_size: int | None = None) -> JambaLM:
    """Load a HF checkpoint directory (or a directory holding one, see resolve_model_dir).

    dtype None keeps the checkpoint's dtype (config.json 'dtype'); a tensor already in `dtype` is
    memory-mapped, not copied. quantize ("int8" or "int4"; see jambalab.quant.quantize_model)
    quantizes the loaded model module by module, with `group_size` (None: the scheme's default);
    "bf16" is weight-only bf16: those matrices are read straight into bf16 (a bf16 checkpoint's are
    memory-mapped), the rest into float32 (llama.cpp's BF16 layout). With a quantize scheme the
    float parts (embedding, norms, convolutions, the Mamba x/dt projections, routers) and activations
    are float32 unless `dtype` says otherwise, as llama.cpp keeps them: the one-call decode step
    (csrc/step.cpp) runs only on float32 activations, and the prefill GEMM over the quantized weights
    is bf16 either way where the CPU has one (ops.lowp.quant_gemm_dtype). A checkpoint written by
    jambalab.quant.save_quantized loads as stored (quantize / group_size, if given, must match it;
    dtype must be its float dtype).
    """
    if group_size is not None and quantize is None:
        raise InputError(f"group_size={group_size} needs quantize= (a group size of what?)")
    path = resolve_model_dir(path)
    from jambalab import quant

    if quant.quantization_config(path) is not None:  # saved quantized: loaded as stored, never re-quantized
        return quant.load_quantized(path, scheme=quantize, group_size=group_size, dtype=dtype)
    if quantize is not None:
        quant.parse_scheme(quantize, group_size)
        if dtype is None:
            dtype = torch.float32
    weight_dtype = quant.WEIGHT_DTYPES.get(quantize)
    if _native_config(path) is not None:
        model = _load_native(path, dtype)
    elif weight_dtype is not None:  # the matrices straight into their dtype: nothing read twice
        model = _load_hf(path, dtype, matrices=weight_dtype)
        model.quantization = quant.scheme_info(quantize, None)
        return model
    else:
        model = _load_hf(path, dtype)
    return _quantize(model, quantize, group_size) if quantize is not None else model


def _load_hf(path: Path, dtype: torch.dtype | str | None, matrices: torch.dtype | None = None) -> JambaLM:
    """The checkpoint in `dtype`; with `matrices`, the matrices weight-only bf16 stores (quant.weight_dtype_names)
    in that dtype instead."""
    from jambalab.quant import weight_dtype_names

    cfg = load_config(path)
    target = _resolve_dtype(dtype, path)
    source = _TensorSource(path)
    model = JambaLM.on_meta(cfg)
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    key_map = hf_key_map(cfg, names)
    _check_key_sets(path, cfg, key_map, source)
    own = set(weight_dtype_names(model)) if matrices is not None else set()
    with torch.no_grad():
        for ours, theirs in key_map.items():
            want = matrices if ours in own else target
            _assign(model, ours, _read(source, ours, theirs, model.get_parameter(ours).shape, want))
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.eval()


def _load_native(path: Path, dtype: torch.dtype | str | None) -> JambaLM:
    """A model that `jambalab train` saved in jambalab's own layout (configs transformers cannot run)."""
    from jambalab.train.checkpoint import load_model

    model = load_model(path).eval()
    return model if dtype is None else model.to(_resolve_dtype(dtype, path))


def _quantize(model: JambaLM, how: str, group_size: int | None) -> JambaLM:
    from jambalab.quant import quantize_model

    return quantize_model(model, how, group_size=group_size)


def _resolve_dtype(dtype, path: Path) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        hf = json.loads((path / "config.json").read_text())
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported (use one of {sorted(set(_DTYPES))})")
    return _DTYPES[dtype]


def _check_key_sets(path: Path, cfg: JambaConfig, key_map: dict, source: _TensorSource) -> None:
    expected = {k for v in key_map.values() for k in ([v] if isinstance(v, str) else v)}
    present = set(source.file_of)
    if cfg.tie_embeddings and "lm_head.weight" in present:
        expected.add("lm_head.weight")  # some tied checkpoints store the head too; it is checked equal below
        _check_tied_head(source, key_map)
    missing, extra = sorted(expected - present), sorted(present - expected)
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                              f"({len(missing)} in all) for a {cfg.family} model with this config.json")
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor(s) {extra[:5]}{' ...' if len(extra) > 5 else ''} "
                              f"({len(extra)} in all) that this config.json does not account for")


def _check_tied_head(source: _TensorSource, key_map: dict) -> None:
    emb = source.get(key_map["embed.weight"])
    if not torch.equal(source.get("lm_head.weight"), emb):
        raise CheckpointError(f"{source.path}: config ties embeddings but lm_head.weight differs from the embedding")


def _read(source: _TensorSource, ours: str, theirs: str | list[str], shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(theirs, str):
        return _converted(source, theirs, tuple(shape), dtype)
    out = torch.empty(shape, dtype=dtype)  # stack experts slice by slice: no second full copy
    for e, name in enumerate(theirs):
        out[e].copy_(_converted(source, name, tuple(shape[1:]), dtype))
    return out


def _converted(source: _TensorSource, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """One tensor, checked (shape, finite) and in `dtype`: the file's own view when it already is."""
    t = source.get(name)
    _check_shape(source, name, tuple(t.shape), shape)
    _check_finite(t, name, source.file_of[name])
    if t.dtype == dtype:
        return t
    out = t.to(dtype)
    if dtype == torch.float16 and t.dtype != torch.float16:  # float16's range is far narrower than bf16/fp32's
        _check_finite(out, name, source.file_of[name], cast_to=dtype)
    return out


def _check_finite(t: torch.Tensor, name: str, file: Path, cast_to: torch.dtype | None = None) -> None:
    """Raise naming the tensor and file if t has a NaN or an Inf (cast_to: t was just cast to that
    dtype, so an Inf means overflow). NaN and Inf survive a sum, so one sum (no temporaries: an
    elementwise check would leave tensor-sized blocks in the allocator's heap) clears almost every
    tensor; only a sum that is not finite is looked at value by value."""
    if not t.is_floating_point() or torch.isfinite(t.sum()):
        return
    n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    if n_nan + n_inf == 0:
        return  # the sum itself overflowed
    if cast_to is not None:
        raise CheckpointError(f"{file}: tensor {name} overflows {str(cast_to).removeprefix('torch.')}; "
                              "load it in bfloat16 or float32")
    raise CheckpointError(f"{file}: tensor {name} holds {n_nan} NaN and {n_inf} Inf values (of {t.numel()}); "
                          "the checkpoint is corrupt or was saved from a diverged run")


def _check_shape(source: _TensorSource, name: str, got: tuple, want: tuple) -> None:
    if got != want:
        raise CheckpointError(f"{source.file_of[name]}: tensor {name} has shape {list(got)}, "
                              f"the config needs {list(want)}")


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    mod._parameters[attr] = nn.Parameter(value, requires_grad=value.is_floating_point())


# =======================================================================================
# Saving
# =======================================================================================
def save_pretrained(model: JambaLM, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json and safetensors (sharded with an index past max_shard_bytes) that transformers loads."""
    from safetensors.torch import save_file

    cfg = model.config
    dtype = model.embed.weight.dtype
    hf_cfg = to_hf_config(cfg, dtype)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    key_map = hf_key_map(cfg, [n for n, _ in model.named_parameters()])
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for ours, theirs in key_map.items():
        t = model.get_parameter(ours).detach()
        pieces = [(theirs, t)] if isinstance(theirs, str) else list(zip(theirs, t.unbind(0)))
        for name, piece in pieces:
            nbytes = piece.numel() * piece.element_size()
            if size and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = piece.contiguous().cpu()
            size += nbytes
    _write_shards(path, shards, save_file)
    tmp = path / "config.json.tmp"
    tmp.write_text(json.dumps(hf_cfg, indent=2))
    os.replace(tmp, path / "config.json")


def _write_shards(path: Path, shards: list[dict[str, torch.Tensor]], save_file) -> None:
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata=meta)
        (path / "model.safetensors.index.json").unlink(missing_ok=True)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata=meta)
        for k, t in shard.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "model.safetensors").unlink(missing_ok=True)
