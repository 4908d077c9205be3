"""Data parallelism applied from outside the model (torchtitan style): torchrun + torch.distributed.

    dist = init_distributed()                     # env from torchrun, or a single process
    model = parallelize(model, dist, "fsdp")      # DDP or FSDP2 fully_shard; identity for one process

One code path for CPU (gloo) and GPU (NCCL). The model code stays single-device; the only thing
parallelism needs from it is `model.layers` (one FSDP2 unit per block, torchtitan's choice).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
import torch.nn as nn

from jambalab.errors import ConfigError, JambalabError
from jambalab.model import JambaLM, MoE

MODES = ("auto", "ddp", "fsdp")


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK), if any.

    The device is CUDA (one GPU per local rank, NCCL) when available and not overridden, else CPU (gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: this torch build or machine has no CUDA device")
    dev = torch.device(kind, local) if kind == "cuda" else torch.device(kind)
    if kind == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not torch_dist.is_initialized():
        backend = "nccl" if kind == "cuda" else "gloo"
        # A long timeout: rank 0 may spend minutes tokenizing the corpus while the others wait.
        torch_dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60),
                                      device_id=dev if kind == "cuda" else None)
    return Dist(rank, world, local, dev)


def shutdown(dist: Dist | None = None) -> None:
    """Leave the process group: a barrier first (when `dist` is given), so that no rank tears down
    while another still has a collective or its last writes in flight."""
    if torch_dist.is_initialized():
        if dist is not None and dist.distributed:
            torch_dist.barrier()
        torch_dist.destroy_process_group()


def parallelize(model: JambaLM, dist: Dist, mode: str = "auto") -> nn.Module:
    """Wrap for data parallelism: 'ddp', or 'fsdp' (FSDP2: each block, then the root, sharded over all
    ranks). 'auto' is DDP. One process: the model itself."""
    if mode not in MODES:
        raise ConfigError(f"parallel mode {mode!r} must be one of {MODES}")
    model = model.to(dist.device)
    if not dist.distributed:
        return model
    _touch_all_experts(model)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(dist.device.type, (dist.world_size,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)


def _touch_all_experts(model: JambaLM) -> None:
    """Give every expert a gradient on every rank, even one that routed no token to it.

    MoE skips experts with no tokens, so their weights would get no gradient on that rank; DDP
    then waits forever for them and FSDP2 reduce-scatters mismatched buffers. Adding 0 * sum(w)
    to the MoE output changes no value and no gradient, but puts every expert in the graph."""

    def hook(module: MoE, _inputs, output):
        out, router_logits = output
        zero = sum(w.sum() for w in (module.w_gate, module.w_up, module.w_down)) * 0.0
        return out + zero.to(out.dtype), router_logits

    for m in model.modules():
        if isinstance(m, MoE):
            m.register_forward_hook(hook)


def reshard(model: nn.Module) -> None:
    """FSDP2 leaves the root's parameters gathered after a forward without backward (validation);
    shard them again so that model.parameters() are the optimizer's (sharded) tensors."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def unwrap(model: nn.Module) -> JambaLM:
    """The JambaLM inside a DDP wrapper (FSDP2 keeps the module itself)."""
    return model.module if hasattr(model, "module") else model


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-steps; sync on the last one."""
    if enabled or not torch_dist.is_initialized():
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def all_mean(values: list[float], dist: Dist) -> list[float]:
    """Mean over ranks of a few scalars (one collective)."""
    if not dist.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=dist.device)
    torch_dist.all_reduce(t)
    return (t / dist.world_size).tolist()


def gather_objects(obj, dist: Dist) -> list:
    """Every rank's obj, in rank order (on every rank)."""
    if not dist.distributed:
        return [obj]
    out = [None] * dist.world_size
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, dist: Dist):
    """Rank 0's obj on every rank."""
    if not dist.distributed:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], object], dist: Dist) -> None:
    """Run fn on rank 0 while the others wait; if it raises a JambalabError, every rank raises it
    (the others would otherwise wait at the next collective until the timeout)."""
    error = None
    if dist.is_main:
        try:
            fn()
        except JambalabError as e:
            error = e
    error = broadcast_object(error, dist)
    if error is not None:
        raise error


def barrier(dist: Dist) -> None:
    if dist.distributed:
        torch_dist.barrier()
