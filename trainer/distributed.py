"""Multi-process training helpers (``torchrun``): process group setup and a differentiable all-gather.

The MPN may see the whole global batch (``runtime.mpn_global_batch``): every rank gathers all
ranks' embeddings (with gradients), runs the MPN over the global batch and takes the loss on its
own rows. :func:`all_gather_with_grad` sends each rank the gradient of every rank's loss with
respect to its own embeddings (an all-reduce of the full gradient, then its own slice), which
works on gloo (CPU) and NCCL alike. With DDP averaging the parameter gradients this is exactly
the gradient of the mean loss over the global batch.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    gather_group: object = None  # separate group for the embedding all-gather

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); else a single-process DistInfo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(backend="gloo" if device_type != "cuda" else None)
    log.info("distributed: rank %d of %d (%s)", rank, world, dist.get_backend())
    return DistInfo(rank, world, int(os.environ.get("LOCAL_RANK", rank)), group)


class _AllGatherGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        ctx.rank = dist.get_rank(group)
        ctx.n = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's (n, ...) tensor in rank order; gradients flow back to each rank's part.

    All ranks must pass the same shape (the P×K sampler guarantees equal shares).
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return x
    return _AllGatherGrad.apply(x, group)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


__all__ = ["DistInfo", "init_distributed", "all_gather_with_grad", "barrier", "broadcast_object"]
