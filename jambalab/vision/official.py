"""Official hustvl/Vim checkpoints in: an explicit key map, shape checks, position-embedding resizing.

The release format (vim/main.py) is a torch.save'd dict whose "model" entry is the state dict; it is
read with torch.load(weights_only=True), never unrestricted pickle. A safetensors file of the same
state dict is read as well. Keys and shapes: shared/VIM.md.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from jambalab.errors import CheckpointError
from jambalab.vision.config import VimConfig
from jambalab.vision.model import VisionMamba

# Per layer: official name under layers.{i}. -> ours. The backward branch's tensors carry a _b.
_BRANCH = {"conv1d.weight": "conv1d.weight", "conv1d.bias": "conv1d.bias", "x_proj.weight": "x_proj.weight",
           "dt_proj.weight": "dt_proj.weight", "dt_proj.bias": "dt_proj.bias", "A_log": "A_log", "D": "D"}
_BRANCH_B = {"conv1d_b.weight": "conv1d.weight", "conv1d_b.bias": "conv1d.bias", "x_proj_b.weight": "x_proj.weight",
             "dt_proj_b.weight": "dt_proj.weight", "dt_proj_b.bias": "dt_proj.bias", "A_b_log": "A_log", "D_b": "D"}


def official_key_map(config: VimConfig) -> dict[str, str]:
    """Every official state-dict key of a model of this config -> the jambalab parameter it fills."""
    keys = {"patch_embed.proj.weight": "patch_embed.weight", "patch_embed.proj.bias": "patch_embed.bias",
            "cls_token": "cls_token", "norm_f.weight": "norm_f.weight", "head.weight": "head.weight",
            "head.bias": "head.bias"}
    if config.if_abs_pos_embed:
        keys["pos_embed"] = "pos_embed"
    for i in range(config.depth):
        o = f"layers.{i}."
        keys[o + "norm.weight"] = o + "norm.weight"
        keys[o + "mixer.in_proj.weight"] = o + "mixer.in_proj.weight"
        keys[o + "mixer.out_proj.weight"] = o + "mixer.out_proj.weight"
        keys.update({o + "mixer." + k: o + "mixer.fwd." + v for k, v in _BRANCH.items()})
        keys.update({o + "mixer." + k: o + "mixer.bwd." + v for k, v in _BRANCH_B.items()})
    return keys


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an official .pth ({"model": state_dict}, or a bare state dict) or a .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path))
        else:
            sd = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # torch / safetensors raise many types for a file that is not theirs
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0][:200]})") from None
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{path}: expected a state dict (or {{'model': state_dict}}) of tensors")
    return sd


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g*g, d) -> (1, 1 + grid*grid, d) as the official fine-tuning code (vim/main.py): the
    first row is kept and the other rows, read as a g x g grid, are resized bicubically
    (align_corners=False). That code comes from DeiT, whose class token is row 0; with Vim's middle
    class token, row 0 is patch 0's embedding and the class token's row lies inside the resized grid.
    We reproduce it as is, so an official model fine-tuned at another size loads as its authors ran it."""
    n, d = pos_embed.shape[1] - 1, pos_embed.shape[2]
    g = math.isqrt(n)
    if g * g != n:
        raise CheckpointError(f"pos_embed has {n} patch rows, not a square grid: cannot resize it")
    extra, patches = pos_embed[:, :1], pos_embed[:, 1:].float()
    patches = patches.reshape(1, g, g, d).permute(0, 3, 1, 2)  # (1, d, g, g)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)  # (1, grid*grid, d)
    return torch.cat([extra, patches], dim=1)


def load_official(path: str | Path, config: VimConfig) -> VisionMamba:
    """A VisionMamba of `config` holding the official checkpoint's weights (fp32), in eval mode."""
    sd = read_state_dict(path)
    where = f"{path} (preset {config.name!r})"
    if "layers.0.mixer.in_proj.weight" not in sd:
        raise CheckpointError(f"{where}: not a Vision Mamba checkpoint (no layers.0.mixer.in_proj.weight; "
                              f"it has e.g. {', '.join(sorted(sd)[:3])})")
    depth = len([k for k in sd if re.fullmatch(r"layers\.\d+\.norm\.weight", k)])
    if depth != config.depth:
        raise CheckpointError(f"{where}: the checkpoint has {depth} layers, the preset {config.depth}")
    key_map = official_key_map(config)
    missing = [k for k in key_map if k not in sd]
    if missing:
        raise CheckpointError(f"{where}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    extra = sorted(set(sd) - set(key_map))
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor {extra[0]} ({len(extra)} unexpected in all): "
                              f"the checkpoint has another depth or architecture")
    model = VisionMamba.on_meta(config).to_empty(device="cpu")
    ours = model.state_dict()
    tensors = {}
    for k, name in key_map.items():
        t = sd[k]
        if k == "pos_embed" and t.dim() == 3 and t.shape[1] != ours[name].shape[1] and t.shape[2] == ours[name].shape[2]:
            t = interpolate_pos_embed(t, config.grid_size)
        if t.shape != ours[name].shape:
            raise CheckpointError(f"{where}: tensor {k} has shape {list(t.shape)}, expected {list(ours[name].shape)}")
        tensors[name] = t.float()
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()
