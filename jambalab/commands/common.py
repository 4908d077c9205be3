"""Helpers shared by CLI commands: choosing a model from --preset / --config / --model, torch threads."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from jambalab.config import JambaConfig
from jambalab.errors import ConfigError


def add_model_source(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--preset", help="a named preset (see `jambalab info --list`)")
    g.add_argument("--config", help="a jambalab config JSON file")
    g.add_argument("--model", help="a HF-format checkpoint directory")


def config_from_args(args: argparse.Namespace) -> JambaConfig:
    """The config named by --preset, --config or --model (reads only config.json for --model)."""
    if getattr(args, "preset", None):
        return JambaConfig.from_preset(args.preset)
    if getattr(args, "config", None):
        return JambaConfig.from_file(args.config)
    if getattr(args, "model", None):
        from jambalab.hf import load_config

        return load_config(args.model)
    raise ConfigError("give one of --preset, --config or --model")


def run_with_threads(threads: int | None, body: Callable[[], int]) -> int:
    """body() with torch using `threads` threads (None or 0: leave torch's setting), restored after, so
    that a caller in this process (a test, a notebook) keeps its own setting."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return body()
    finally:
        torch.set_num_threads(before)


def add_precision_args(p: argparse.ArgumentParser) -> None:
    """--dtype, --bf16-weights / --int8 / --int4 and --group-size: the precision a model is loaded and run in."""
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="float dtype of weights and activations (default: the checkpoint's; fp32 for presets)")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--bf16-weights", dest="quantize", action="store_const", const="bf16",
                   help="weight-only bf16: the large matrices in bf16, the rest and the activations float32 "
                        "(llama.cpp's BF16 layout; jambalab.quant)")
    q.add_argument("--int8", dest="quantize", action="store_const", const="int8",
                   help="int8 weight-only quantization, per output channel (jambalab.quant)")
    q.add_argument("--int4", dest="quantize", action="store_const", const="int4",
                   help="4-bit weight-only quantization, groups of 32 (jambalab.quant)")
    p.add_argument("--group-size", type=int, default=None,
                   help="quantization group size in input features (default: per channel for int8, 32 for int4)")
    p.add_argument("--activations", choices=["int8", "float"], default="int8",
                   help="with --int8 / --int4 (or a saved-quantized model): round activations to int8 in blocks of 32 "
                        "and multiply integers, as llama.cpp's Q8_0 / Q4_0 do (int8, default, fast), or keep them "
                        "float (the exact product with the dequantized weights)")


DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def torch_dtype(args: argparse.Namespace):
    """The torch dtype --dtype names, or None."""
    import torch

    return getattr(torch, DTYPES[args.dtype]) if getattr(args, "dtype", None) else None


def apply_precision(model, args: argparse.Namespace):
    """A float model (a preset, random weights) cast to --dtype and quantized per --int8 / --int4."""
    _precision_flags(args)
    if torch_dtype(args) is not None:
        model = model.to(torch_dtype(args))
    if getattr(args, "quantize", None):
        from jambalab.quant import quantize_model

        model = quantize_model(model, args.quantize, args.group_size)
    return model


def load_model(args: argparse.Namespace):
    """The model --model / --preset / --config name, in the precision --dtype / --int8 / --int4 ask for,
    in eval mode. --model DIR loads a checkpoint (a saved-quantized one as stored); --preset / --config
    give random weights (seed 0), for trying a command."""
    import jambalab

    if getattr(args, "model", None):
        _precision_flags(args)
        return jambalab.from_pretrained(args.model, dtype=torch_dtype(args), quantize=getattr(args, "quantize", None),
                                        group_size=getattr(args, "group_size", None)).eval()
    if getattr(args, "preset", None):
        model = jambalab.from_preset(args.preset, seed=0)
    else:
        model = jambalab.JambaLM.from_config(JambaConfig.from_file(args.config), seed=0)
    return apply_precision(model.eval(), args)


def _precision_flags(args: argparse.Namespace) -> None:
    """Check the precision flags, then set --activations for the process (a global mode of jambalab.quant)."""
    from jambalab.errors import InputError
    from jambalab.quant import set_activations

    if getattr(args, "group_size", None) is not None and not getattr(args, "quantize", None):
        raise InputError("--group-size goes with --int8 or --int4")
    set_activations(getattr(args, "activations", "int8"))
