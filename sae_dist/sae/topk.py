"""TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

    z   = TopK(W_enc^T (x - b_dec) + b_enc), ReLU on the kept values        (section 2.3, eq. 3)
    x^  = W_dec^T z + b_dec                                                  (section 2.1, eq. 2)

Parameter names and layouts follow the export contract (SAELens): `W_enc` [d_in, d_sae],
`b_enc` [d_sae], `W_dec` [d_sae, d_in] (unit-norm rows), `b_dec` [d_in] (the paper's b_pre).
Inputs of this module are the NORMALISED activations the store yields; the exported/loaded
module (`sae_dist.sae.export.load_sae`) takes raw activations.

`TopKSAE.training_step_losses` is the one training path, on one process and latent-sharded alike: the
fused encoder + TopK of `sae_dist.kernels` (never the [B, d_sae] pre-activations), the exact global
TopK through `self.comm.select_topk`, sparse decodes, Multi-TopK and AuxK. `TopKSAE.reconstruct` is its
reconstruction without the losses (no gradient; the held-out evaluation of a latent-sharded run splices it into
the LM). `topk_losses_reference` is the same loss computed densely with plain torch: the test oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sae_dist.kernels.encoder_topk import encode_topk
from sae_dist.kernels.sparse_decode import decode_aux, safe_ratio, sparse_decode, sparse_decode_reference
from sae_dist.sae.base import SparseAutoencoder, TrainOutput, normalized_mse
from sae_dist.sae.config import SAEConfig

__all__ = ["TopKSAE", "TrainOutput", "encoder_compute_dtype", "topk_losses_reference"]


def encoder_compute_dtype(W_enc: torch.Tensor) -> torch.dtype | None:
    """The dtype the fused encoder computes in: the autocast dtype when autocast is on for W_enc's
    device and differs from W_enc's dtype (e.g. bf16 on CUDA with fp32 master weights), else None
    (W_enc's dtype).

    The fused encoder is a custom op that autocast does not see, so without this it would run its
    matmul in fp32 (tf32 at best) under bf16 autocast. It casts its operands itself
    (`encode_topk`'s compute_dtype): the fp32 parameters get fp32 gradients, and no bf16 copy of
    W_enc is held through the backward.
    """
    dev = W_enc.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        if dt != W_enc.dtype:
            return dt
    return None


def _sse(target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """sum of squared errors in float32 (F.mse_loss: one fused pass forward and backward)."""
    return F.mse_loss(recon.float(), target.float(), reduction="sum")


class TopKSAE(SparseAutoencoder):
    """TopK SAE with the paper's training recipe hooks (`sae=topk`; the base of the TopK family).

    Args:
      cfg: SAEConfig.
      device: where the parameters live.
      generator: optional torch.Generator for the tied initialisation (else the global RNG).
    Initialisation (section 2.4.1 "tied init"): W_dec rows are random unit vectors, W_enc =
    cfg.enc_init_scale * W_dec^T, b_enc = 0, b_dec = 0 until `sae_dist.sae.init.init_b_dec_`.
    """

    architecture = "topk"
    export_architecture = "topk"
    shardable = True
    uses_k = True

    def __init__(
        self,
        cfg: SAEConfig,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ):
        super().__init__(cfg, device=device, generator=generator)

    # ------------------------------------------------------------------ encoder
    def topk_from_pre(self, pre: torch.Tensor, k: int | None = None):
        """TopK then ReLU of pre-activations [B, d_sae] -> (values [B, k], indices [B, k] int64).

        Values are sorted descending; ReLU may zero some (fewer than k positive pre-activations).
        """
        k = self.cfg.k if k is None else k
        vals, idx = pre.topk(k, dim=-1, sorted=True)
        return F.relu(vals), idx

    def encode_sparse(self, x: torch.Tensor, k: int | None = None):
        """x [B, d_in] (normalised space) -> (values [B, k] float, indices [B, k] int64)."""
        return self.topk_from_pre(self.pre_acts(x), k)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """pre [B, d_sae] -> dense z [B, d_sae] with the k largest (ReLU'd) entries per row, rest 0."""
        vals, idx = self.topk_from_pre(pre)
        return torch.zeros_like(pre).scatter_(-1, idx, vals)

    # ------------------------------------------------------------------ decoder
    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sparse decode (values, indices) [B, k] -> sum_j v_j W_dec[i_j] + b_dec [B, d_in] (the whole SAE:
        NotImplementedError on a latent shard)."""
        self._check_whole()
        return sparse_decode_reference(values, indices, self.W_dec, self.b_dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, d_in] -> x_hat [B, d_in] (normalised space)."""
        vals, idx = self.encode_sparse(x)
        return self.decode_sparse(vals, idx)

    # ------------------------------------------------------------------ training
    def training_step_losses(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> TrainOutput:
        """This module's share of the losses of one training batch, never a dense [B, d_sae] tensor.

        x [B, d_in]: the batch rows of this process (normalised activations; under data parallelism
        this dp rank's rows, identical on the tp ranks of a latent-sharded SAE). dead_mask: bool
        [n_local] (latents dead for `cfg.dead_tokens` tokens, this module's shard) or None (no AuxK).
        Losses (Gao et al. 2024), each normalised by the global batch's variance (`comm.batch_variance`):
        - main: normalised MSE (section 2.2) of x^ = decode(TopK_k(x));
        - Multi-TopK (section 5.3, `cfg.multi_topk`): + multi_topk_weight * NMSE(decode(TopK_{f k}(x)));
        - AuxK (section 2.4.1): + auxk_coef * NMSE of the residual x - x^ by the top min(k_aux, dead)
          dead latents.
        TopK is exact over all d_sae latents: the fused encoder picks this shard's candidates and
        `comm.select_topk` keeps those among the global top-k of each token. The loss terms summed over
        dp ranks equal the single-process losses of the global batch. The returned values / indices
        [B, k'] (the kept entries of this shard; index -1 where none) stay attached to the graph, so a
        subclass can add loss terms on them (e.g. `sae_dist.sae.tree`).
        Raises ValueError for a wrong input width or dead_mask.
        """
        cfg, comm = self.cfg, self.comm
        self._check_x(x)
        k = cfg.k
        kk = cfg.multi_topk_factor * k if cfg.multi_topk else k
        if kk > cfg.d_sae:
            raise ValueError(f"k={kk} exceeds d_sae={cfg.d_sae}")
        k_aux, k_aux_local = self._auxk_widths(dead_mask)
        picks, aux_vals, aux_idx = self._select(x, (k, kk) if cfg.multi_topk else (k,), dead_mask, k_aux_local)
        xf = x.float()
        den = comm.batch_variance(xf)
        x_hat = self._decode(*picks[0])
        nmse = _sse(xf, x_hat) / den
        loss, mt = nmse, None
        if cfg.multi_topk:
            mt = _sse(xf, self._decode(*picks[1])) / den
            loss = loss + cfg.multi_topk_weight * mt
        aux = self._auxk_loss(xf - x_hat.detach().float(), aux_vals, aux_idx, k_aux)
        loss = loss + cfg.auxk_coef * aux
        values, indices = picks[0]
        return TrainOutput(loss, nmse.detach(), aux.detach(), None if mt is None else mt.detach(),
                           x_hat.detach(), values, indices)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """x^ [B, d_in] (normalised space, W_dec's dtype) of x [B, d_in] (normalised activations) by the training
        step's path without its losses: this shard's fused-encoder candidates, the exact global TopK
        (`comm.select_topk`), the sparse decodes summed over tp, + b_dec. On one process or a latent shard alike
        (unlike `forward`, which needs the whole SAE), no gradient. Under tp > 1 it is collective over the tp
        group: every tp rank calls it with the same x (its rows are selected and summed across the shards); no
        collective over dp. Transient memory: as the training forward's on B rows (`encode_topk`: one
        [B, latent_chunk] pre-activation buffer on the torch backend, never [B, d_sae]). ValueError for a wrong
        input width."""
        self._check_x(x)
        ((values, indices),), _, _ = self._select(x, (self.cfg.k,))
        return self._decode(values, indices)

    def _select(self, x: torch.Tensor, ms: tuple[int, ...], dead_mask: torch.Tensor | None = None,
                k_aux_local: int = 0):
        """([(values, indices) of this shard's entries among the global top-m of each row, per m in ms]
        (`comm.select_topk`), AuxK candidates (values, indices) or (None, None)) of x [B, d_in]: the fused
        encoder's top-min(max(ms), n_local) candidates of this shard (and its top-`k_aux_local` among the
        latents of `dead_mask`)."""
        vals, idx, aux_vals, aux_idx = encode_topk(
            x, self.W_enc, self.b_enc, self.comm.copy_to_tp(self.b_dec), min(max(ms), self.n_local),
            dead_mask=dead_mask if k_aux_local else None, k_aux=k_aux_local,
            backend=self.cfg.kernel_backend, compute_dtype=encoder_compute_dtype(self.W_enc))
        return self.comm.select_topk(vals, idx, ms), aux_vals, aux_idx

    def _decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x^ [B, d_in] = sum over the tp shards of this shard's sparse decode, + b_dec."""
        part = sparse_decode(values, indices, self.W_dec, None, backend=self.cfg.kernel_backend)
        return self.comm.reduce_from_tp(part) + self.b_dec

    def _auxk_widths(self, dead_mask: torch.Tensor | None) -> tuple[int, int]:
        """(k_aux over the whole SAE = min(k_aux, dead latents of all shards), this shard's part of it)."""
        if dead_mask is None or self.cfg.auxk_coef <= 0:
            return 0, 0
        if dead_mask.dtype != torch.bool or dead_mask.shape != (self.n_local,):
            raise ValueError(f"dead_mask must be bool [{self.n_local}], got {dead_mask.dtype} "
                             f"{tuple(dead_mask.shape)}")
        n_dead_local = dead_mask.sum()
        k_aux = min(self.cfg.k_aux, int(self.comm.sum_over_tp_(n_dead_local.clone())))
        return k_aux, min(k_aux, int(n_dead_local))

    def _auxk_loss(self, residual: torch.Tensor, aux_vals, aux_idx, k_aux: int) -> torch.Tensor:
        """AuxK (section 2.4.1, Appendix A.2): NMSE of the residual [B, d_in] (constant) by the global
        top-k_aux dead-latent candidates, decoded without b_dec; float32, NaN/Inf -> 0, 0 when k_aux = 0."""
        if k_aux == 0:
            return residual.new_zeros(())
        if aux_vals is None:  # this shard has no dead latent: an empty candidate set
            aux_vals = residual.new_empty(residual.shape[0], 0)
            aux_idx = torch.empty(residual.shape[0], 0, dtype=torch.int64, device=residual.device)
        ((v, i),) = self.comm.select_topk(aux_vals, aux_idx, (k_aux,), width=k_aux)
        # sparse_grad: the main decode gives W_dec a dense gradient, this one adds its rows to it
        e_hat = self.comm.reduce_from_tp(decode_aux(v, i, self.W_dec, backend=self.cfg.kernel_backend,
                                                    sparse_grad=True))
        return safe_ratio(_sse(residual, e_hat), self.comm.batch_variance(residual))


def topk_losses_reference(sae: TopKSAE, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> TrainOutput:
    """The losses of `TopKSAE.training_step_losses` on one process computed densely with plain torch
    (pre-activations [B, d_sae], torch.topk, embedding_bag decode, dense AuxK): the test oracle of the
    training path and the `--kernels off` row of `python -m sae_dist.bench`. Same arguments and result
    (values / indices [B, k] of the kept latents)."""
    cfg = sae.cfg
    pre = sae.pre_acts(x)
    kk = cfg.multi_topk_factor * cfg.k if cfg.multi_topk else cfg.k
    vals_all, idx_all = sae.topk_from_pre(pre, kk)
    vals, idx = vals_all[:, : cfg.k], idx_all[:, : cfg.k]
    x_hat = sae.decode_sparse(vals, idx)
    xf = x.to(x_hat.dtype)
    nmse = normalized_mse(xf, x_hat)
    loss, mt = nmse, None
    if cfg.multi_topk:
        mt = normalized_mse(xf, sae.decode_sparse(vals_all, idx_all))
        loss = loss + cfg.multi_topk_weight * mt
    aux = sae.auxk_term(pre, dead_mask, xf, x_hat)
    loss = loss + cfg.auxk_coef * aux
    return TrainOutput(loss, nmse.detach(), aux.detach(), None if mt is None else mt.detach(),
                       x_hat.detach(), vals, idx)
