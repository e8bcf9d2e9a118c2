"""Data parallelism for the training loop under torchrun: one process per GPU, each on its
own shard of every epoch, gradients averaged by DDP, or reduce-scattered by FSDP when the
model is sharded (tasks/distributed/sharding.py, train.strategy); either way once per
optimizer step (no_sync on the micro-steps before). With WORLD_SIZE unset (one process) every
function here is a no-op, so the loop reads the same either way. sharding.py builds on this
module, never the other way round."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: torch.device) -> torch.device:
    """Start the process group (NCCL on CUDA, gloo on CPU); this rank's device."""
    rank, size = world()
    if size == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def shard(items: list) -> list:
    """This rank's share, the same length on every rank (so no rank waits on another)."""
    rank, size = world()
    return items if size == 1 else items[rank::size][: len(items) // size]


def wrap(model, device: torch.device):
    """What the loop calls forward on under strategy ddp: the model (one process) or DDP around
    it (sharding.wrap picks between this and FSDP)."""
    if world()[1] == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(model, skip: bool):
    """Inside, DDP's backward leaves gradients in .grad without all-reducing them: the
    micro-steps before the last of an optimizer step (the last one all-reduces the sum).
    FSDP2 the same: unsharded gradients add up until the last micro-step reduce-scatters them."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if skip and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    if skip and isinstance(model, FSDPModule):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def sum_over_ranks(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """x summed over all ranks, one all-reduce (x itself, wherever it is, on one process).
    Asynchronous on the GPU: nothing here waits for the result."""
    if world()[1] == 1:
        return x
    if device.type == "cuda" and x.device.type == "cpu":
        x = x.pin_memory().to(device, non_blocking=True)
    x = x.to(device)
    dist.all_reduce(x)
    return x


def per_rank(values: list[float], device: torch.device) -> list[list[float]]:
    """Each rank's values, in rank order, on every rank (one all-reduce of a world x n table)."""
    rank, size = world()
    table = torch.zeros(size, len(values), dtype=torch.float64)
    table[rank] = torch.tensor(values, dtype=torch.float64)
    return sum_over_ranks(table, device).cpu().tolist()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_main() -> bool:
    return world()[0] == 0


def broadcast_object(obj):
    """Rank 0's obj on every rank (picklable; the others pass anything)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
