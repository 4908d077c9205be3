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
