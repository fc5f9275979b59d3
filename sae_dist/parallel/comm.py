"""Autograd-aware collectives for the latent-sharded SAE (the two conjugate operators of Megatron-LM
tensor parallelism, Shoeybi et al. 2019, section 3: f = identity forward / all-reduce backward, and
g = all-reduce forward / identity backward), plus no-grad helpers. Every collective is synchronous
(waited on before returning), and each is a no-op when its group is None (dim of size 1 or a
single-process run).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["copy_to_tp", "reduce_from_tp", "all_reduce_", "all_gather_cat", "broadcast_from", "broadcast_status",
           "group_size"]


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_reduce_(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of t over `group` (waited); returns t. No-op when group is None."""
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return all_reduce_(g.contiguous().clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce_(x.contiguous().clone(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """f: identity forward, all-reduce (sum) of the gradient backward.

    For a replicated tensor (e.g. b_dec) feeding each tp rank's local shard: every rank's backward
    holds only its shard's contribution, the sum over tp is the full gradient.
    """
    return x if group is None else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """g: all-reduce (sum) forward, identity backward.

    For partial results (e.g. each shard's partial reconstruction [B, d]): the sum is replicated on
    every tp rank, the loss computed from it is identical on every rank, so each rank's gradient of
    its partial is the gradient of the sum.
    """
    return x if group is None else _ReduceFromTP.apply(x, group)


@torch.no_grad()
def all_gather_cat(t: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Concatenate `t` (same shape on every rank) from all ranks of `group` along `dim`, in rank
    order (no gradient). Returns t itself when group is None."""
    if group is None:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def broadcast_status(failed: bool, device, group, src: int, what: str) -> None:
    """Collective over `group`: global rank `src` tells the others whether `what` failed there.

    failed: `src`'s outcome (ignored on the other ranks). The other ranks raise RuntimeError naming `src`
    and `what` when it failed, so they do not wait in a later collective until the process group's
    timeout; `src` returns (and raises its own error after), having waited for the status to leave when it
    failed (NCCL only queues a broadcast, and the process may exit next).
    """
    status = torch.full((1,), int(failed), dtype=torch.int32, device=device)  # torch.tensor(...) would sync on CUDA
    dist.broadcast(status, src=src, group=group)
    if dist.get_rank() == src:
        if failed:
            status.cpu()
        return
    if int(status.item()):
        raise RuntimeError(f"{what} failed on global rank {src}, which produces it for this rank's group "
                           "(share_group): see that rank's error")


@torch.no_grad()
def broadcast_from(produce, shape: tuple[int, ...], dtype: torch.dtype, device, group, src: int,
                   what: str) -> torch.Tensor:
    """A tensor computed on global rank `src` and received by the other ranks of `group` (e.g. the
    batch a tensor-parallel group shares, read or computed once).

    produce: on `src`, a callable returning the tensor ([*shape], `dtype`, on `device`); None on the
    other ranks, which receive into a new tensor of that shape. group: a process group (not None).
    Collective over `group`: first `broadcast_status`, so that an error raised by produce on `src`
    (re-raised there) makes every other rank raise RuntimeError naming `src` and `what`; then the
    tensor itself.
    """
    x = None
    try:
        if produce is not None:
            x = produce().contiguous()
    except BaseException:
        broadcast_status(True, device, group, src, what)
        raise
    broadcast_status(False, device, group, src, what)
    if x is None:
        x = torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(x, src=src, group=group)
    return x
