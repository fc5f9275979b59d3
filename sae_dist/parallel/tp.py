"""Latent sharding (tensor parallelism) and data parallelism of an SAE over the dp x tp mesh.

`parallelize_sae(sae, ctx)` is the one entry point, in the manner of torchtitan's `parallelize_*`
functions: it cuts a model built on the meta device down to this rank's latent shard, materialises it,
and installs `MeshComm`, the collectives of `sae_dist.sae.base.LocalComm` over the mesh's groups. The
model's own training step (`TopKSAE.training_step_losses`) then runs unchanged; the torch engine sums
gradients over dp and clips them through the same `sae.comm` (`sae_dist.train.engine`, docs/parallel.md).

Layout: tp rank r holds latents [r n/tp, (r+1) n/tp): W_enc[:, shard] [d_in, n/tp], b_enc[shard],
W_dec[shard] [n/tp, d_in]; b_dec [d_in] is replicated. Every tp rank of a dp group sees the
same batch rows; dp rank q holds rows [q B/dp, (q+1) B/dp) of the global batch of B tokens.

The collectives of one TopK step (`MeshComm`; all synchronous):
1. b_dec enters the local fused encoder through `copy_to_tp`, so its encoder gradient is summed over
   the shards; the encoder yields this shard's top-k candidates (and AuxK candidates).
2. Exact global TopK (`select_topk` -> `global_keep`): the tp * k candidate values of each token are
   brought together token-sharded (an all_to_all sends each token block to one rank, which selects and
   returns keep masks with a second all_to_all), torch.topk over them; each rank keeps its own selected
   entries (the global top-k of the union of per-shard top-k sets is the top-k over all n latents).
   Entries not kept get value 0 and index -1, and are cut from the decode (`compact_kept`). Multi-TopK
   selects the top 4k and the top k in one exchange.
3. `reduce_from_tp` sums the shards' partial reconstructions [B/dp, d] (identity backward).
4. AuxK: the same selection over the dead latents' candidates (padded to a common width).
5. `batch_variance` all-reduces the normalised-MSE denominators over dp, so each rank's loss is its
   share of the global loss and the dp SUM of the gradients is the single-process gradient.

Source of the sharding scheme: Megatron-LM's column/row parallel split (Shoeybi et al. 2019), with
the exact top-k selection across shards that Gao et al. 2024 approximate in their released code.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sae_dist.parallel.comm import all_gather_cat, all_reduce_, copy_to_tp, reduce_from_tp
from sae_dist.parallel.mesh import ParallelContext, shard_range
from sae_dist.sae.base import SparseAutoencoder
from sae_dist.sae.config import SAEConfig
from sae_dist.sae.registry import build_sae

__all__ = ["parallelize_sae", "build_sharded_sae", "MeshComm", "global_keep", "compact_kept", "keep_from_topk",
           "allgather_keep", "GATHER_CHUNK_BYTES", "gather_chunk_rows"]

#: The all-gather fallback of the exact global TopK (B not divisible by tp) gathers the fp32
#: candidate values of at most this many bytes at a time ([rows, tp * w] per chunk of tokens, rows =
#: `gather_chunk_rows`), so its temporaries stay bounded whatever tp is (`sae_dist.plan` mirrors it).
GATHER_CHUNK_BYTES = 1 << 28  # 256 MiB


def gather_chunk_rows(tokens: int, tp: int, w: int, chunk_bytes: int = GATHER_CHUNK_BYTES) -> int:
    """Tokens per chunk of the all-gather fallback: the most rows whose gathered fp32 candidates
    [rows, tp * w] fit in `chunk_bytes`, at least 1 (one row alone may exceed it) and at most `tokens`.

    Raises ValueError when an argument is not a positive int.
    """
    for name, v in (("tokens", tokens), ("tp", tp), ("w", w), ("chunk_bytes", chunk_bytes)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"gather_chunk_rows: {name}={v!r} must be a positive int")
    return max(1, min(tokens, chunk_bytes // (tp * w * 4)))


def allgather_keep(v: torch.Tensor, ms: tuple[int, ...], group, tp: int, rank: int) -> list[torch.Tensor]:
    """The all-gather fallback of `global_keep`, chunked over tokens.

    v [B, w] fp32: this rank's candidate values (w and B equal on every tp rank). For each chunk of
    R = `gather_chunk_rows(B, tp, w)` tokens (read from GATHER_CHUNK_BYTES at call time) the ranks
    all-gather their values into [R, tp * w] fp32 (rank order), select the global top-m per token and
    keep this rank's slice of the masks. Returns one bool [B, w] mask per m in ms, equal to the masks
    of gathering all B tokens at once (the same torch.topk on the same rows; only an exact tie at a
    row's m-th value could resolve differently, where torch.topk picks its algorithm by shape, as
    CUDA's does for a few very long rows).

    Peak temporary memory, independent of tp and B, with C = R * tp * w * 4 bytes (<= GATHER_CHUNK_BYTES
    unless one row alone is larger): 2 C while gathering (the tp parts and their concatenation), then
    C + len(ms) * C / 4 (the bool masks) + R * max(ms) * 12 (torch.topk's outputs) while selecting;
    since max(ms) <= tp * w that is at most 4.5 C. The [B, w] outputs come on top (as on the
    all_to_all path). Raises ValueError for an empty v.
    """
    B, w = v.shape
    rows = gather_chunk_rows(B, tp, w, GATHER_CHUNK_BYTES)
    out = [torch.empty(B, w, dtype=torch.bool, device=v.device) for _ in ms]
    for s in range(0, B, rows):
        keeps = keep_from_topk(all_gather_cat(v[s:s + rows], group), ms, rank * w, w)
        for o, keep in zip(out, keeps, strict=True):
            o[s:s + rows] = keep
        del keeps  # free this chunk's [R, tp * w] buffers before the next gather
    return out


def keep_from_topk(all_v: torch.Tensor, ms, offset: int, w: int) -> list[torch.Tensor]:
    """Per m in ms: bool [B, w] mask of columns [offset, offset + w) of all_v [B, W] that are among the
    top-m of their row."""
    out = []
    for m in ms:
        sel = all_v.topk(m, dim=1, sorted=False).indices
        keep = torch.zeros(all_v.shape, dtype=torch.bool, device=all_v.device)
        keep.scatter_(1, sel, True)
        out.append(keep[:, offset: offset + w])
    return out


def global_keep(vals: torch.Tensor, ms: tuple[int, ...], group, tp: int, tp_rank: int) -> list[torch.Tensor]:
    """Which of this rank's candidates are among the global top-m of their token, for each m in ms.

    vals [B, w]: this rank's candidate values (w equal on every tp rank; pads are -inf); group: the tp
    process group (None: this rank holds every candidate). Returns one bool [B, w] mask per m.

    Token-sharded exchange (exact, less traffic than an all-gather): when B is divisible by tp, one
    all_to_all sends rows [j B/tp, (j+1) B/tp) of every rank's candidates to rank j, which selects for
    those tokens among all tp * w candidates and sends the keep masks back with a second all_to_all.
    Per rank that moves B w values and B w mask bytes per m, against the (tp - 1) B w values an
    all-gather would bring in, and holds [B/tp, tp w] instead of [B, tp w]. Otherwise the chunked
    all-gather of `allgather_keep`.
    """
    B, w = vals.shape
    v = vals.detach().float()
    if group is None:
        return keep_from_topk(v, ms, 0, w)
    if B % tp:
        return allgather_keep(v, ms, group, tp, tp_rank)
    bt = B // tp
    recv = torch.empty(tp, bt, w, dtype=v.dtype, device=v.device)  # [source rank, my tokens, w]
    dist.all_to_all_single(recv, v.view(tp, bt, w).contiguous(), group=group)
    cand = recv.permute(1, 0, 2).reshape(bt, tp * w)  # my tokens x all ranks' candidates
    out = []
    for m in ms:
        sel = cand.topk(m, dim=1, sorted=False).indices
        keep = torch.zeros(bt, tp * w, dtype=torch.uint8, device=v.device)
        keep.scatter_(1, sel, 1)
        back = torch.empty(tp, bt, w, dtype=torch.uint8, device=v.device)  # [token block, bt, w]
        dist.all_to_all_single(back, keep.view(bt, tp, w).permute(1, 0, 2).contiguous(), group=group)
        out.append(back.view(B, w).bool())
    return out


def compact_kept(values: torch.Tensor, indices: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept entries of values / indices [B, w] (keep: bool [B, w]) moved to the front of each row and
    the width cut to the largest per-row kept count m (at least 1: the decodes take no zero-width
    input); slots without a kept entry get value 0 (no gradient) and index -1 (padding). The decode
    kernels then scan m slots per token instead of w (at tp = 64 and k_aux = 2048 a rank keeps about 32
    AuxK entries per token). Returns (values [B, m], differentiable gather of `values`; indices [B, m])."""
    values = values * keep
    w = keep.shape[1]
    m = min(w, max(1, int(keep.sum(dim=1).max()))) if keep.numel() else w
    if m < w:
        order = torch.sort(keep.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :m]
        keep, values, indices = keep.gather(1, order), values.gather(1, order), indices.gather(1, order)
    return values, torch.where(keep, indices, -1)


class MeshComm:
    """The collectives of `sae_dist.sae.base.LocalComm` over the dp x tp mesh of `ctx` (module docstring).
    A dim of size 1 has no group and its collectives are identities."""

    def __init__(self, ctx: ParallelContext):
        self.ctx = ctx
        self.tp, self.dp, self.tp_rank = ctx.tp, ctx.dp, ctx.tp_rank
        self.tp_group, self.dp_group = ctx.tp_group, ctx.dp_group

    def copy_to_tp(self, t):
        return copy_to_tp(t, self.tp_group)

    def reduce_from_tp(self, t):
        return reduce_from_tp(t, self.tp_group)

    def sum_over_tp_(self, t):
        return all_reduce_(t, self.tp_group)

    def sum_over_dp_(self, t):
        return all_reduce_(t, self.dp_group)

    def max_over_dp_(self, t):
        return all_reduce_(t, self.dp_group, op=dist.ReduceOp.MAX)

    def gather_over_dp(self, t):
        return all_gather_cat(t.contiguous(), self.dp_group, dim=0)

    def batch_variance(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        mean = all_reduce_(xf.sum(0), self.dp_group) / (xf.shape[0] * self.dp)
        return all_reduce_((xf - mean).pow(2).sum(), self.dp_group)

    def select_topk(self, values, indices, ms, width=None):
        if self.tp_group is None:  # every candidate is here, sorted: the first m columns
            return [(values[:, :m], indices[:, :m]) for m in ms]
        pad = (width or 0) - values.shape[1]
        v = F.pad(values.detach().float(), (0, pad), value=float("-inf")) if pad > 0 else values
        keeps = global_keep(v, tuple(ms), self.tp_group, self.tp, self.tp_rank)
        w = values.shape[1]
        return [compact_kept(values, indices, keep[:, :w]) for keep in keeps]


def _shard_parameters_(sae: SparseAutoencoder, lo: int, hi: int, device) -> None:
    """Replace the latent-indexed parameters of `sae` (W_enc [d_in, n], b_enc [n], W_dec [n, d_in]) by
    uninitialised tensors of latents [lo, hi) on `device`; b_dec [d_in] likewise, whole."""
    for name, dim in (("W_enc", 1), ("b_enc", 0), ("W_dec", 0), ("b_dec", None)):
        p = getattr(sae, name)
        shape = list(p.shape)
        if dim is not None:
            shape[dim] = hi - lo
        setattr(sae, name, nn.Parameter(torch.empty(shape, dtype=p.dtype, device=device)))
    sae.latent_start, sae.latent_end = lo, hi


def parallelize_sae(sae: SparseAutoencoder, ctx: ParallelContext) -> SparseAutoencoder:
    """Apply the mesh of `ctx` to `sae` in place and return it.

    tp > 1: `sae` (built on the meta device, so the whole SAE is never allocated) is cut to this rank's
    latents `ctx.latent_range(n)` on ctx.device, uninitialised: initialise with
    `sae_dist.sae.init.tied_init_rows_(sae, seed, sae.latent_start)` or load a checkpoint. Under
    torch.distributed (any tp) `sae.comm` becomes a `MeshComm`. A single process is left as it is.
    Raises ValueError for tp > 1 on an architecture that does not shard (`sae.shardable`), naming it,
    and when tp does not divide the width.
    """
    if ctx.tp > 1:
        if not sae.shardable:
            raise ValueError(
                f"sae={sae.architecture} does not train latent-sharded (parallel.tp={ctx.tp}); only sae=topk "
                "shards over tp. Use parallel.tp=1 (data parallel over all ranks) or sae=topk")
        _shard_parameters_(sae, *ctx.latent_range(sae.cfg.d_sae), ctx.device)
    if ctx.distributed:
        sae.comm = MeshComm(ctx)
    return sae


def build_sharded_sae(cfg: SAEConfig, ctx: ParallelContext | None = None, *, tp: int | None = None,
                      tp_rank: int | None = None, device=None) -> SparseAutoencoder:
    """The latent shard of the SAE of `cfg` that one tp rank holds, parameters uninitialised:
    `parallelize_sae(build_sae(cfg, device="meta"), ctx)`. Without ctx (planning, shape checks, no
    process group) pass tp and tp_rank; device (default ctx.device) may be "meta" (nothing allocated).
    Raises ValueError as `parallelize_sae`, for an architecture that does not shard, and without ctx or
    tp / tp_rank."""
    if ctx is None:
        if tp is None or tp_rank is None:
            raise ValueError("build_sharded_sae needs a ParallelContext, or tp and tp_rank (meta builds)")
        ctx = ParallelContext(tp=tp, tp_rank=tp_rank, world_size=tp, rank=tp_rank)
    if device is not None:
        ctx = dataclasses.replace(ctx, device=torch.device(device))
    shard_range(cfg.d_sae, ctx.tp, ctx.tp_rank)  # the width check, before any allocation
    sae = build_sae(cfg, device="meta")
    if not sae.shardable:
        raise ValueError(f"sae={cfg.architecture} does not train latent-sharded; only sae=topk shards")
    if ctx.tp == 1:
        _shard_parameters_(sae, 0, cfg.d_sae, ctx.device)
    return parallelize_sae(sae, ctx)
