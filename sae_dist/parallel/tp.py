"""Latent-sharded (tensor-parallel) TopK SAE with exact global TopK, over a dp x tp mesh.

Design (docs/parallel.md; Gao et al. 2024 for the recipe): tp rank r holds latents
[r n/tp, (r+1) n/tp): W_enc[:, shard] [d_in, n/tp], b_enc[shard], W_dec[shard] [n/tp, d_in]; b_dec
(= b_pre) [d_in] is replicated. Every tp rank of a dp group sees the same batch rows; dp rank q holds
rows [q B/dp, (q+1) B/dp) of the global batch of B tokens.

One training step (all collectives synchronous; tp collectives over the tp group, dp over the dp group):
1. Local fused encoder + TopK on the shard (`sae_dist.kernels.encoder_topk`): the local top-k
   (ReLU'd values, latent ids) and, against the local part of the dead mask, the local AuxK candidates.
   b_pre enters through `copy_to_tp` so its encoder gradient is summed over the shards.
2. Exact global TopK: the tp * k candidate values of each token are brought together (token-sharded:
   an all_to_all sends each token block to one rank, which selects and returns keep masks with a
   second all_to_all; `_global_keep`), torch.topk over them; each rank keeps the selected entries
   that are its own (the global top-k of the union of per-shard top-k sets equals the top-k over all
   n latents). Values of entries not kept are multiplied by 0, so no gradient reaches them, and
   they are left out of the decode (`_decode_kept`: kept entries moved to the front, width cut to
   the largest per-row count, the rest padding). Multi-TopK (section 5.3) selects the top 4k the same
   way, and the top k among them.
3. Each rank decodes its kept entries (sparse decode of its W_dec rows); `reduce_from_tp` sums the
   partial reconstructions [B/dp, d] over tp (identity backward), then + b_pre.
4. AuxK (section 2.4.1): the same gather/select over the dead latents' candidates (top min(k_aux,
   global dead count)), partial decodes summed over tp.
5. Losses use global-batch statistics: the normalised-MSE denominators sum_b ||x_b - mean(x)||^2 (and
   of the AuxK residual) are all-reduced over dp, so the per-rank loss is that rank's share of the
   global loss and the dp SUM of the gradients (`sync_grads_`) is the single-process gradient.
Dead-latent counters are kept per shard and OR-reduced over dp by the trainer
(`reduce_fired_over_dp`).

Source of the sharding scheme: Megatron-LM's column/row parallel split (Shoeybi et al. 2019), with
the exact top-k selection across shards that Gao et al. 2024 approximate in their released code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sae_dist.kernels.auxk import _safe_ratio as safe_ratio
from sae_dist.parallel.comm import all_gather_cat, all_reduce_, copy_to_tp, reduce_from_tp
from sae_dist.parallel.mesh import ParallelContext, shard_range
from sae_dist.sae.base import torch_dtype
from sae_dist.sae.config import SAEConfig
from sae_dist.sae.topk import TopKSAE, TrainOutput, encoder_operands

__all__ = ["ShardedTopKSAE", "init_rows", "tied_init_rows_", "INIT_BLOCK_ROWS", "reduce_fired_over_dp",
           "GATHER_CHUNK_BYTES", "gather_chunk_rows"]

#: Rows of W_dec drawn per generator in the mesh-independent tied init (`init_rows`).
INIT_BLOCK_ROWS = 4096

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


def _allgather_keep(v: torch.Tensor, ms: tuple[int, ...], group, tp: int, rank: int) -> list[torch.Tensor]:
    """The all-gather fallback of `ShardedTopKSAE._global_keep`, chunked over tokens.

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
        keeps = ShardedTopKSAE._keep_from_topk(all_gather_cat(v[s:s + rows], group), ms, rank * w, w)
        for o, keep in zip(out, keeps, strict=True):
            o[s:s + rows] = keep
        del keeps  # free this chunk's [R, tp * w] buffers before the next gather
    return out


@torch.no_grad()
def init_rows(start: int, end: int, d_in: int, seed: int) -> torch.Tensor:
    """Rows [start, end) of the tied-init decoder (Gao et al. 2024, section 2.4.1): i.i.d. uniformly
    random unit vectors, float32 [end - start, d_in] on CPU.

    Mesh independent: rows come in blocks of INIT_BLOCK_ROWS, block b drawn from a CPU generator
    seeded with (seed, b), so any shard of latents gets the same rows as the unsharded model and no
    rank ever draws more than its own rows plus one block.
    """
    if not 0 <= start <= end:
        raise ValueError(f"init_rows: bad latent range [{start}, {end})")
    out = torch.empty(end - start, d_in, dtype=torch.float32)
    b0, b1 = start // INIT_BLOCK_ROWS, (end + INIT_BLOCK_ROWS - 1) // INIT_BLOCK_ROWS
    for b in range(b0, b1):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + b)
        block = torch.randn(INIT_BLOCK_ROWS, d_in, generator=g, dtype=torch.float32)
        lo, hi = max(start, b * INIT_BLOCK_ROWS), min(end, (b + 1) * INIT_BLOCK_ROWS)
        out[lo - start: hi - start] = block[lo - b * INIT_BLOCK_ROWS: hi - b * INIT_BLOCK_ROWS]
    return out / out.norm(dim=-1, keepdim=True)


@torch.no_grad()
def tied_init_rows_(sae, seed: int, latent_start: int = 0) -> None:
    """Mesh-independent tied init (Gao et al. 2024, section 2.4.1) of `sae` holding latents
    [latent_start, latent_start + W_dec.shape[0]): W_dec = `init_rows`, W_enc = enc_init_scale *
    W_dec^T, b_enc = 0; b_dec untouched. The whole SAE (latent_start 0) and every shard get the same
    global weights."""
    n_rows, d = sae.W_dec.shape
    w = init_rows(latent_start, latent_start + n_rows, d, seed)
    sae.W_dec.copy_(w.to(sae.W_dec.device, sae.W_dec.dtype))
    sae.W_enc.copy_((sae.cfg.enc_init_scale * w.T).to(sae.W_enc.device, sae.W_enc.dtype))
    sae.b_enc.zero_()


@torch.no_grad()
def reduce_fired_over_dp(fired: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """bool [n_local] 'fired on this rank's rows' -> 'fired anywhere in the global batch' (max over dp)."""
    if ctx.dp_group is None:
        return fired
    f = fired.to(torch.uint8)
    all_reduce_(f, ctx.dp_group, op=torch.distributed.ReduceOp.MAX)
    return f.bool()


class ShardedTopKSAE(TopKSAE):
    """The shard of a TopK SAE held by one tp rank (module docstring: the algorithm).

    Args:
      cfg: SAEConfig of the WHOLE SAE (n_latents is the global width; must be divisible by tp).
      ctx: ParallelContext (its tp, tp_rank and groups). For building on the meta device without a
        process group (planning, shape checks) pass `tp` and `tp_rank` instead of ctx.
      device: parameter device (default ctx.device; "meta" allocates nothing).
    Parameters (local shard): W_enc [d_in, n/tp], b_enc [n/tp], W_dec [n/tp, d_in], b_dec [d_in].
    Attributes latent_start / latent_end: this shard's global latent range.
    Weights are uninitialised until `init_weights_(seed)` (or a checkpoint load).
    Inference methods (encode, decode, forward, ...) raise: export the SAE and use `load_sae`.
    """

    def __init__(self, cfg: SAEConfig, ctx: ParallelContext | None = None, *, tp: int | None = None,
                 tp_rank: int | None = None, device: torch.device | str | None = None):
        nn.Module.__init__(self)
        if ctx is None:
            if tp is None or tp_rank is None:
                raise ValueError("ShardedTopKSAE needs a ParallelContext, or tp and tp_rank (meta builds)")
            ctx = ParallelContext(tp=tp, tp_rank=tp_rank, world_size=tp, rank=tp_rank)
        self.cfg = cfg
        self.ctx = ctx
        self.latent_start, self.latent_end = shard_range(cfg.n_latents, ctx.tp, ctx.tp_rank)
        n_local = self.latent_end - self.latent_start
        dtype = torch_dtype(cfg.dtype)
        dev = ctx.device if device is None else device
        d = cfg.d_in
        self.W_enc = nn.Parameter(torch.empty(d, n_local, dtype=dtype, device=dev))
        self.b_enc = nn.Parameter(torch.zeros(n_local, dtype=dtype, device=dev))
        self.W_dec = nn.Parameter(torch.empty(n_local, d, dtype=dtype, device=dev))
        self.b_dec = nn.Parameter(torch.zeros(d, dtype=dtype, device=dev))

    @property
    def n_local(self) -> int:
        return self.latent_end - self.latent_start

    @torch.no_grad()
    def init_weights_(self, seed: int) -> None:
        """Tied init of this shard's rows (`tied_init_rows_`: identical to the unsharded model's)."""
        tied_init_rows_(self, seed, self.latent_start)

    # ------------------------------------------------------------------ inference: not on shards
    def _shard_only(self, *_a, **_k):
        raise NotImplementedError(
            "a ShardedTopKSAE holds one latent shard: export the trained SAE (sae/ in the run dir) and "
            "use sae_dist.load_sae for inference"
        )

    pre_acts = encode_sparse = encode = decode = decode_sparse = forward = _shard_only

    # ------------------------------------------------------------------ global selection
    def _global_keep(self, vals: torch.Tensor, kk: int, firsts: tuple[int, ...] = ()) -> list[torch.Tensor]:
        """Which of this rank's candidates are among the global top-kk of their token.

        vals [B, w]: this rank's candidate values (w equal on every tp rank; pads are -inf).
        Returns [keep_kk] + [keep_m for m in firsts]: bool [B, w] masks of this rank's entries in the
        global top-kk, and in the global top-m (m <= kk, the m largest of the top-kk).

        Token-sharded exchange (exact, less traffic than an all-gather): when B is divisible by tp,
        one all_to_all sends rows [j B/tp, (j+1) B/tp) of every rank's candidates to rank j, which
        selects for those tokens among all tp * w candidates and sends the keep masks back with a
        second all_to_all. Per rank that moves B w values and B w mask bytes, against the (tp - 1) B w
        values an all-gather would bring in, and holds [B/tp, tp w] instead of [B, tp w]. Otherwise
        an all-gather of the values and a local selection, chunked over tokens so that at most
        GATHER_CHUNK_BYTES of gathered values exist at a time (`_allgather_keep`).
        """
        group = self.ctx.tp_group
        B, w = vals.shape
        ms = (kk, *firsts)
        v = vals.detach().float()
        if group is None:
            return self._keep_from_topk(v, ms, 0, w)
        tp, r = self.ctx.tp, self.ctx.tp_rank
        if B % tp:
            return _allgather_keep(v, ms, group, tp, r)
        import torch.distributed as dist

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

    @staticmethod
    def _keep_from_topk(all_v: torch.Tensor, ms, offset: int, w: int) -> list[torch.Tensor]:
        out = []
        for m in ms:
            sel = all_v.topk(m, dim=1, sorted=False).indices
            keep = torch.zeros(all_v.shape, dtype=torch.bool, device=all_v.device)
            keep.scatter_(1, sel, True)
            out.append(keep[:, offset: offset + w])
        return out

    def _decode_kept(self, k_sparse_decode, values: torch.Tensor, idx: torch.Tensor,
                     keep: torch.Tensor) -> torch.Tensor:
        """Partial decode [B, d_in] of this rank's kept entries only.

        values / idx / keep [B, w]: the kept entries of each row are moved to the front (a stable sort
        of the keep mask, a differentiable gather of the values) and the width cut to the largest
        per-row kept count m; the rest of the first m slots become padding (index -1). The decode
        kernels then scan m slots per token instead of w (at tp = 64 and k_aux = 2048 a rank keeps
        about 32 AuxK entries per token on average)."""
        w = keep.shape[1]
        # at least one slot: the decodes take no zero-width input (a row of padding decodes to 0)
        m = min(w, max(1, int(keep.sum(dim=1).max()))) if keep.numel() else w
        if m < w:
            order = torch.sort(keep.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :m]
            keep = keep.gather(1, order)
            values = values.gather(1, order)
            idx = idx.gather(1, order)
        return k_sparse_decode(values, torch.where(keep, idx, -1), self.W_dec, None,
                               backend=self.cfg.kernel_backend)

    def _dp_den(self, t: torch.Tensor, n_global: int) -> torch.Tensor:
        """sum_b ||t_b - mean_global(t)||^2 over the GLOBAL batch (all-reduced over dp), float32."""
        g = self.ctx.dp_group
        s = all_reduce_(t.sum(0), g)
        mean = s / n_global
        return all_reduce_((t - mean).pow(2).sum(), g)

    # ------------------------------------------------------------------ training
    def training_step_losses(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> TrainOutput:
        """This rank's share of the losses of one global batch (module docstring: algorithm).

        x [B/dp, d_in]: this dp rank's rows (normalised activations, identical on the tp ranks of a dp
        group). dead_mask: bool [n/tp] (this shard's dead latents, identical over dp) or None.
        Returns a TrainOutput whose loss terms summed over dp equal the single-process losses of the
        global batch (`x_hat` is the full reconstruction of the local rows; values / indices [B/dp, k]
        hold this shard's kept TopK entries: values 0 where another shard won, indices local ids).
        """
        from sae_dist.sae.topk import kernel_ops

        cfg, ctx = self.cfg, self.ctx
        self._check_x(x)
        ops = kernel_ops()
        if ops is None:
            raise RuntimeError("the sharded SAE needs sae_dist.kernels (fused encoder + TopK); see the "
                               "warning above for the import error")
        encode_topk, k_sparse_decode, _ = ops
        tp_group = ctx.tp_group
        backend = cfg.kernel_backend
        B = x.shape[0]
        n_global_tokens = B * ctx.dp
        n_loc = self.n_local
        k = cfg.k
        kk = cfg.multi_topk_factor * k if cfg.multi_topk else k
        if kk > cfg.n_latents:
            raise ValueError(f"k={kk} exceeds n_latents={cfg.n_latents}")
        k_loc = min(kk, n_loc)

        # AuxK widths: k_aux_eff = min(k_aux, global dead count) as in the single-process model
        k_aux_eff = k_aux_loc = 0
        if dead_mask is not None and cfg.auxk_coef > 0:
            if dead_mask.dtype != torch.bool or dead_mask.shape != (n_loc,):
                raise ValueError(f"dead_mask must be bool [{n_loc}] (this shard), got {dead_mask.dtype} "
                                 f"{tuple(dead_mask.shape)}")
            n_dead_loc = dead_mask.sum()
            n_dead = int(all_reduce_(n_dead_loc.clone(), tp_group))
            k_aux_eff = min(cfg.k_aux, n_dead)
            k_aux_loc = min(k_aux_eff, int(n_dead_loc))

        xw, W, be, bp = encoder_operands(x, self.W_enc, self.b_enc, copy_to_tp(self.b_dec, tp_group))
        vals, idx, av, ai = encode_topk(
            xw, W, be, bp, k_loc,
            dead_mask=dead_mask if k_aux_loc > 0 else None, k_aux=k_aux_loc, backend=backend,
        )
        if cfg.multi_topk:
            keep_kk, keep_k = self._global_keep(vals, kk, (k,))
        else:
            (keep_k,) = self._global_keep(vals, k)
        v_k = vals * keep_k
        # entries another shard won are decoded as padding (-1): no W_dec row is read for them
        x_hat = reduce_from_tp(
            self._decode_kept(k_sparse_decode, v_k, idx, keep_k), tp_group)
        x_hat = x_hat + self.b_dec
        xf = x.float()
        den = self._dp_den(xf, n_global_tokens)
        nmse = (xf - x_hat.float()).pow(2).sum() / den
        loss = nmse
        mt = None
        if cfg.multi_topk:
            part = self._decode_kept(k_sparse_decode, vals * keep_kk, idx, keep_kk)
            x_hat_mt = reduce_from_tp(part, tp_group) + self.b_dec
            mt = (xf - x_hat_mt.float()).pow(2).sum() / den
            loss = loss + cfg.multi_topk_weight * mt
        if k_aux_eff > 0:
            aux = self._auxk(xf, x_hat, av, ai, k_aux_eff, k_aux_loc, n_global_tokens, k_sparse_decode)
        else:
            aux = x_hat.new_zeros((), dtype=torch.float32)
        loss = loss + cfg.auxk_coef * aux
        return TrainOutput(loss, nmse.detach(), aux.detach(), None if mt is None else mt.detach(),
                           x_hat.detach(), v_k.detach(), idx)

    def _auxk(self, xf, x_hat, av, ai, k_aux_eff, k_aux_loc, n_global_tokens, k_sparse_decode):
        """This rank's share of the AuxK loss (section 2.4.1) with the global top-k_aux_eff dead
        candidates across shards and a dp-global residual variance."""
        ctx = self.ctx
        tp_group = ctx.tp_group
        B = xf.shape[0]
        pad = k_aux_eff - k_aux_loc
        if k_aux_loc > 0:
            cand_v = av.detach().float()
        else:
            cand_v = xf.new_empty(B, 0)
        if pad:  # widths must match across ranks for the all-gather; -inf pads are never selected
            cand_v = F.pad(cand_v, (0, pad), value=float("-inf"))
        keep = self._global_keep(cand_v, k_aux_eff)[0][:, :k_aux_loc]
        e = (xf - x_hat.detach().float())
        if k_aux_loc > 0:
            part = self._decode_kept(k_sparse_decode, av * keep, ai, keep).float()
        else:
            part = torch.zeros_like(e)
        e_hat = reduce_from_tp(part, tp_group)
        num = (e - e_hat).pow(2).sum()
        return safe_ratio(num, self._dp_den(e, n_global_tokens))  # NaN/Inf -> 0, as unsharded

    # ------------------------------------------------------------------ dp / clipping
    @torch.no_grad()
    def sync_grads_(self) -> None:
        """Sum every gradient over dp (the per-rank losses are shares of the global loss)."""
        g = self.ctx.dp_group
        if g is None:
            return
        for p in self.parameters():
            if p.grad is not None:
                all_reduce_(p.grad, g)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip to a global L2 norm over the whole (unsharded) SAE: shard norms summed over tp,
        the replicated b_dec counted once. Returns the total norm before clipping (0-d float32)."""
        sharded = [p.grad for p in (self.W_enc, self.b_enc, self.W_dec) if p.grad is not None]
        sq = sum((g.float().pow(2).sum() for g in sharded), torch.zeros((), device=self.W_dec.device))
        sq = all_reduce_(sq, self.ctx.tp_group)
        if self.b_dec.grad is not None:
            sq = sq + self.b_dec.grad.float().pow(2).sum()
        total = sq.sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
        return total
