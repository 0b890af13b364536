"""torchrun / DistributedDataParallel support: one process per device, rank 0 writes.

``train`` works unchanged under ``torchrun --nproc_per_node=N``: the environment
variables torchrun sets select the process group (gloo on CPU, nccl on CUDA),
each rank trains on its shard of every epoch (:func:`mmexport.torchside.train.epoch_indices`:
the epoch's order padded by wrapping to equal shards, so every rank takes the same
number of steps; a shard's last batch of one image joins the batch before it, see
:func:`mmexport.torchside.train.batches`), and only rank 0 touches the run directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistContext:
    """Join the process group torchrun describes; a plain single process gets a trivial context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def broadcast_object(ctx: DistContext, value):
    """Rank 0's ``value`` on every rank (used to share an error or a decision)."""
    if not ctx.enabled:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


@torch.no_grad()
def average_batchnorm_statistics(model: nn.Module, ctx: DistContext) -> None:
    """All-reduce-average BN running statistics so every rank evaluates the same network.

    DDP runs with ``broadcast_buffers=False``: broadcasting every buffer each step would
    also ship the frozen source copies of a merged model (two backbones per step).
    """
    if not ctx.enabled:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var):
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
                buffer.div_(ctx.world_size)


def wrap_ddp(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index if device.index is not None else ctx.local_rank] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def cleanup(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
