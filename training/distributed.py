"""Collectives the objective needs, usable with or without a process group.

Without an initialised ``torch.distributed`` process group every function behaves as the
single-process case (rank 0 of 1, gathers return their input), so one code path serves a laptop
and a cluster.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group is initialised (and so collectives must run)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the default group; 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def _all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [B, ...] from every rank along dim 0 -> [B * world, ...], rank order, no gradient.

    Collectives: one ``all_gather``. Every rank must pass the same shape.
    """
    if world_size() == 1:
        return x.detach()
    return _all_gather_cat(x.detach())


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward hands every rank the summed gradient of its own slice.

    forward: one ``all_gather`` of x [B, ...] -> [B * world, ...].
    backward: one ``all_reduce(SUM)`` of the gradient w.r.t. the gathered tensor (each rank's loss
    contributes to every slice), then this rank's slice ``[rank*B : (rank+1)*B]``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.batch = x.shape[0]
        return _all_gather_cat(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = rank() * ctx.batch
        return grad[start : start + ctx.batch]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [B, ...] from every rank along dim 0 -> [B * world, ...], keeping gradients.

    Collectives: one ``all_gather`` in forward, one ``all_reduce(SUM)`` of the gathered gradient in
    backward, after which each rank keeps its own slice. So a rank's ``x`` receives the gradient of
    the *sum* of every rank's loss; with DDP averaging parameter gradients over ranks, this gives the
    gradient of the mean loss over the global batch. Every rank must pass the same shape.
    """
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (a new tensor, no gradient). Collectives: one ``all_reduce(SUM)``."""
    x = x.detach().clone()
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= world_size()
    return x
