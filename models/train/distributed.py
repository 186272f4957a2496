"""Data-parallel training across processes: the process group, model wrapping (DDP or FSDP2) and metric averaging.

Under ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) every
process joins one group: NCCL when CUDA is available (process ``LOCAL_RANK`` on GPU ``LOCAL_RANK``), Gloo on CPUs.
Without those variables the run is a single process and every function here is the identity.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn


@dataclasses.dataclass(frozen=True)
class Context:
    """This process's place in the run: ``rank`` of ``world_size`` processes, on ``device``."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, writes pictures and checkpoints."""
        return self.rank == 0


def start(device: Optional[str] = None) -> Context:
    """Join the process group described by torchrun's environment (or run alone without it).

    ``device`` ("cpu", "cuda") overrides the default: CUDA when available, else the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"--device {kind!r} is not supported; expected 'cpu' or 'cuda'")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    place = torch.device("cuda", local_rank % torch.cuda.device_count()) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(place)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", rank=rank, world_size=world_size)
    return Context(rank, world_size, place)


def stop(context: Context) -> None:
    """Leave the process group."""
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, context: Context, fsdp: bool) -> nn.Module:
    """``module`` for training across the processes: ``DistributedDataParallel`` (gradients averaged over the
    processes in backward), or sharded in place with FSDP2's ``fully_shard`` when ``fsdp``. Alone, ``module``."""
    if not context.distributed:
        return module
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        return fully_shard(module)
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def average(values: dict[str, float], context: Context) -> dict[str, float]:
    """Each value averaged over the processes (one all-reduce)."""
    if not context.distributed or not values:
        return values
    names = sorted(values)
    stacked = torch.tensor([float(values[name]) for name in names], dtype=torch.float64, device=context.device)
    dist.all_reduce(stacked)
    return dict(zip(names, (stacked / context.world_size).tolist()))


def gather(value: Any, context: Context) -> list:
    """Every process's ``value`` (a picklable object), in rank order, on every process."""
    if not context.distributed:
        return [value]
    gathered: list = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def barrier(context: Context) -> None:
    """Wait for every process."""
    if context.distributed:
        dist.barrier()


def full_state_dict(module: nn.Module) -> dict:
    """``module``'s whole state dict on the CPU. Parameters sharded by FSDP2 (DTensors) are gathered whole, so
    under ``--fsdp`` every process must call this (each gets the whole)."""
    from torch.distributed.tensor import DTensor

    state = {}
    for key, value in module.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        state[key] = value.detach().cpu().clone()
    return state


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, context: Context) -> dict:
    """``optimizer``'s whole state (unsharded under FSDP2, where every process must call this)."""
    if context.distributed and _is_sharded(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(module, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                              context: Context) -> None:
    """Load what :func:`full_optimizer_state` returned."""
    if context.distributed and _is_sharded(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)


def _is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)
