"""Mesh-independent checkpoint state: every tensor under its GLOBAL shape.

A single-process run saves plain full tensors. A dp x tp run wraps each rank's local tensors as
DTensors over the ("dp", "tp") mesh: Replicate over dp, and over tp Shard(1) for W_enc [d_in, n] or
Shard(0) for the latent-indexed tensors (b_enc, W_dec, the dead-latent counters, and the matching Adam
moments); b_dec and Adam's step counters are replicated. torch.distributed.checkpoint (DCP) stores the
global layout, so a checkpoint written at one mesh loads at any other (tp=2 x dp=2 -> tp=1, tp=4, or a
single process) by loading each rank's shard of the global tensors in place. The DTensors are views of
the live tensors (`DTensor.from_local` without copies), so `dcp.load` writes straight into the model,
optimizer and counters.

A tensor that dp ranks hold in disjoint pieces instead of replicated (the Adam moments of DeepSpeed's ZeRO,
each dp rank owning a contiguous range of every flattened parameter) enters as a `RankPart`: its range is
cut into the few row-major boxes it covers, and each box is saved and loaded under its global offsets
(torch's `LocalShardsWrapper` inside the DTensor), so no rank ever gathers the whole tensor and a
checkpoint of pieces loads at any mesh and engine, and vice versa.

Layout of the state dict (keys are the global names):
    model/{W_enc, b_enc, W_dec, b_dec}
    optim/{param}/{exp_avg, exp_avg_sq, step}
    ema/{...}   (when EMA is on)
    dead/{tokens_since_fired, ever_fired}
    buffers/{...} (the architecture's persistent buffers, e.g. BatchTopK's threshold; only when it has any)
    density/{fire_counts} (the feature-density window, latent-indexed; added by the trainer when
                trainer.feature_density_every_steps > 0: sae_dist.train.density)
Architecture extras (e.g. JumpReLU's log_threshold) are latent-indexed along dim 0 unless listed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sae_dist.parallel.mesh import ParallelContext

__all__ = ["LATENT_DIM", "RankPart", "global_view", "build_state"]


@dataclass(frozen=True)
class RankPart:
    """This rank's piece of a tensor of `shape` (its local tp shard, 1-D or 2-D) held in disjoint pieces
    over dp: elements [start, start + flat.numel()) of its row-major flattening, `flat` a live 1-D view
    (e.g. a ZeRO partition's slice of an Adam moment; numel 0 when the rank holds none of it)."""

    flat: torch.Tensor
    start: int
    shape: tuple[int, ...]


def row_major_boxes(start: int, numel: int, shape: tuple[int, ...]) -> list[tuple[tuple, tuple, int]]:
    """The boxes covering elements [start, start + numel) of a row-major tensor of `shape` (1-D or 2-D):
    (offset, size, position of the box's first element in the range), at most three for 2-D (a partial
    first row, whole rows, a partial last row), each contiguous in the flattening."""
    if len(shape) == 1:
        return [((start,), (numel,), 0)] if numel else []
    if len(shape) != 2:
        raise ValueError(f"row_major_boxes: shape {tuple(shape)} is not 1-D or 2-D")
    cols, out, s, end = shape[1], [], start, start + numel
    while s < end:
        r, c = divmod(s, cols)
        if c or end - s < cols:
            w = min(cols - c, end - s)
            out.append(((r, c), (1, w), s - start))
        else:
            w = (end - s) // cols * cols
            out.append(((r, 0), (w // cols, cols), s - start))
        s += w
    return out


def _part_view(part: RankPart, latent_dim: int | None, ctx: ParallelContext, placements, shape, stride):
    """The DTensor of global `shape` and `stride` whose local data are `part`'s boxes at their global offsets.
    Built directly (not `from_local`, which would view or move the wrapper and lose it)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    from sae_dist.parallel._boxes import Boxes

    shift = [0] * len(part.shape)
    if latent_dim is not None and ctx.tp > 1:
        shift[latent_dim] = ctx.tp_rank * part.shape[latent_dim]
    views, offsets = [], []
    for off, size, pos in row_major_boxes(part.start, part.flat.numel(), part.shape):
        views.append(part.flat[pos:pos + math.prod(size)].view(size))
        offsets.append(tuple(o + d for o, d in zip(off, shift, strict=True)))
    local = Boxes(views, offsets)  # none: this rank holds no element, so saves and loads none
    spec = DTensorSpec(ctx.mesh, tuple(placements), tensor_meta=TensorMeta(torch.Size(shape), stride, part.flat.dtype))
    return DTensor(local, spec, requires_grad=False)

#: dim of each tensor that indexes latents (sharded over tp); None: replicated.
LATENT_DIM = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "b_dec": None,
              "tokens_since_fired": 0, "ever_fired": 0}


def _latent_dim(name: str) -> int | None:
    # architectures other than TopK train unsharded (tp = 1), where every tensor is replicated
    return LATENT_DIM.get(name, 0)


def global_view(t: torch.Tensor | RankPart, latent_dim: int | None, ctx: ParallelContext):
    """t as a tensor of its global shape: itself single-process, else a DTensor view over ctx.mesh
    (Replicate over dp; Shard(latent_dim) over tp, or Replicate when latent_dim is None). A `RankPart`
    (distributed runs only; ValueError otherwise) becomes a DTensor holding its boxes."""
    if isinstance(t, RankPart) and not ctx.distributed:
        raise ValueError("a RankPart needs a distributed run: one process holds whole tensors")
    if not ctx.distributed:
        return t
    from torch.distributed.tensor import DTensor, Replicate, Shard

    shape = list(t.shape)
    if latent_dim is None or ctx.tp == 1:
        placements = [Replicate(), Replicate()]
    else:
        placements = [Replicate(), Shard(latent_dim)]
        shape[latent_dim] *= ctx.tp
    stride = torch.empty(shape, device="meta").stride()
    if isinstance(t, RankPart):
        return _part_view(t, latent_dim, ctx, placements, shape, stride)
    return DTensor.from_local(t, ctx.mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=stride)


def build_state(model: torch.nn.Module, optimizer_state: dict, ema: torch.nn.Module | None,
                dead_state: dict, ctx: ParallelContext) -> dict:
    """The DCP state dict of a run (module docstring: layout), viewing the live tensors.

    model / ema: modules with parameters W_enc, b_enc, W_dec, b_dec (local shards when sharded).
    optimizer_state: {param name: {"exp_avg", "exp_avg_sq", "step"}} as the engines return it.
    dead_state: DeadLatentTracker.state_dict() (local shard).
    """
    def params(mod):
        return {n: global_view(p.data, _latent_dim(n), ctx) for n, p in mod.named_parameters()}

    state = {
        "model": params(model),
        "optim": {n: {"exp_avg": global_view(st["exp_avg"], _latent_dim(n), ctx),
                      "exp_avg_sq": global_view(st["exp_avg_sq"], _latent_dim(n), ctx),
                      "step": st["step"]}
                  for n, st in optimizer_state.items()},
        "dead": {n: global_view(t, LATENT_DIM[n], ctx) for n, t in dead_state.items()},
    }
    if ema is not None:
        state["ema"] = params(ema)
    buffers = {n: b for n, b in model.named_buffers() if n not in model._non_persistent_buffers_set}
    if buffers:
        state["buffers"] = {n: global_view(b, None, ctx) for n, b in buffers.items()}
    return state
