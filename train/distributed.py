"""Where a training process runs: the process group ``torchrun`` describes, or a single process.

``run_distributed`` is what every training script's ``main`` ends with: it joins the process group
(``init_distributed``), runs the script and leaves the group again. ``wrap_ddp`` wraps the trained
module in ``DistributedDataParallel`` when there is more than one process.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from recurzoo.devices import resolve_device

__all__ = ["DistributedContext", "init_distributed", "cleanup_distributed", "run_distributed", "wrap_ddp"]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process runs: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that logs, plots and writes checkpoints."""
        return self.rank == 0


def init_distributed(device: Optional[str] = None) -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment, or run alone.

    ``device`` (e.g. ``'cpu'``, ``'cuda'``), checked by :func:`~recurzoo.devices.resolve_device`
    (a :class:`~recurzoo.devices.DeviceError` names ``--device``), defaults to the accelerator when
    there is one; under ``torchrun`` each process takes GPU ``LOCAL_RANK``. The backend is NCCL on
    CUDA, Gloo otherwise.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = resolve_device(device)
    if target.type == "cuda":
        target = torch.device("cuda", local_rank if target.index is None else target.index)
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=target)


def cleanup_distributed() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def run_distributed(run: Callable[[argparse.Namespace, DistributedContext], Any], args: argparse.Namespace) -> Any:
    """``run(args, context)`` in the process group ``torchrun`` describes (on ``args.device``), left afterwards."""
    context = init_distributed(args.device)
    try:
        return run(args, context)
    finally:
        cleanup_distributed()


def wrap_ddp(module: nn.Module, context: DistributedContext, **kwargs: Any) -> nn.Module:
    """``module`` wrapped in ``DistributedDataParallel`` when running distributed, else unchanged."""
    if not context.distributed:
        return module
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, **kwargs)
