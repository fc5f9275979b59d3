"""TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

    z   = TopK(W_enc^T (x - b_pre) + b_enc), ReLU on the kept values        (section 2.3, eq. 3)
    x^  = W_dec^T z + b_pre                                                  (section 2.1, eq. 2)

Parameter names and layouts follow the export contract (SAELens): `W_enc` [d_in, d_sae],
`b_enc` [d_sae], `W_dec` [d_sae, d_in] (unit-norm rows), `b_dec` [d_in] (b_dec IS b_pre).
Inputs of this module are the NORMALISED activations the store yields; the exported/loaded
module (`sae_dist.sae.export.load_sae`) takes raw activations.
"""

from __future__ import annotations

import importlib
import warnings

import torch
import torch.nn.functional as F

from sae_dist.sae.auxk import normalized_mse, sparse_decode
from sae_dist.sae.base import SparseAutoencoder, TrainOutput
from sae_dist.sae.config import SAEConfig

__all__ = ["TopKSAE", "TrainOutput", "kernel_ops", "encoder_operands"]


_KERNEL_OPS: tuple | None = None
_KERNEL_IMPORT_ERROR: str | None = None


def kernel_ops():
    """The `sae_dist.kernels` ops used by the kernel training path, or None when they cannot be imported.

    Returns (encode_topk, sparse_decode, auxk_loss) from `sae_dist.kernels.encoder_topk`,
    `.sparse_decode` and `.auxk`. On an ImportError, warns once (RuntimeWarning naming the error and
    the switch `sae.kernels=false`) and returns None, so `SAEConfig.kernels=True` falls back to the plain
    torch path instead of breaking training.
    """
    global _KERNEL_OPS, _KERNEL_IMPORT_ERROR
    if _KERNEL_OPS is not None:
        return _KERNEL_OPS
    if _KERNEL_IMPORT_ERROR is not None:
        return None
    try:
        enc = importlib.import_module("sae_dist.kernels.encoder_topk")
        dec = importlib.import_module("sae_dist.kernels.sparse_decode")
        aux = importlib.import_module("sae_dist.kernels.auxk")
        _KERNEL_OPS = (enc.encode_topk, dec.sparse_decode, aux.auxk_loss)
    except (ImportError, AttributeError) as e:
        _KERNEL_IMPORT_ERROR = f"{type(e).__name__}: {e}"
        warnings.warn(
            f"SAEConfig.kernels=True but sae_dist.kernels could not be imported ({_KERNEL_IMPORT_ERROR}); "
            "using the plain torch training path (set sae.kernels=false to silence this)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return _KERNEL_OPS


def encoder_operands(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_pre: torch.Tensor):
    """(x, W_enc, b_enc, b_pre) for the fused encoder, in the autocast dtype when autocast is on for
    their device (e.g. bf16 on CUDA with fp32 master weights), else x cast to W_enc's dtype.

    The fused encoder is a custom op that autocast does not see, so without this it would run its
    matmul in fp32 (tf32 at best) under bf16 autocast; the casts are differentiable, so the fp32
    parameters still get (fp32) gradients, as for an autocast matmul.
    """
    dev = W_enc.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        if dt != W_enc.dtype:
            return x.to(dt), W_enc.to(dt), b_enc.to(dt), b_pre.to(dt)
    return x.to(W_enc.dtype), W_enc, b_enc, b_pre


class TopKSAE(SparseAutoencoder):
    """TopK SAE with the paper's training recipe hooks (`sae=topk`; the base of the TopK family).

    Args:
      cfg: SAEConfig.
      device: where the parameters live.
      generator: optional torch.Generator for the tied initialisation (else the global RNG).
    Initialisation (section 2.4.1 "tied init"): W_dec rows are random unit vectors, W_enc =
    cfg.enc_init_scale * W_dec^T, b_enc = 0, b_dec (b_pre) = 0 until `sae_dist.sae.init.init_b_pre`.
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
        """Sparse decode (values, indices) [B, k] -> sum_j v_j W_dec[i_j] + b_pre [B, d_in]."""
        return sparse_decode(values, indices, self.W_dec) + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, d_in] -> x_hat [B, d_in] (normalised space)."""
        vals, idx = self.encode_sparse(x)
        return self.decode_sparse(vals, idx)

    # ------------------------------------------------------------------ training
    def training_step_losses(
        self, x: torch.Tensor, dead_mask: torch.Tensor | None = None
    ) -> TrainOutput:
        """Losses of one training batch x [B, d_in] (normalised), never a dense decode.

        - main: normalised MSE (section 2.2) of x^ = decode_sparse(TopK(x)).
        - Multi-TopK (section 5.3, optional): + multi_topk_weight * NMSE(decode(TopK_{f*k}(x))).
        - AuxK (section 2.4.1): + auxk_coef * auxk_loss(pre, dead_mask, x - x^.detach(), W_dec).
        dead_mask: bool [d_sae] or None (no AuxK term).
        The returned `values` [B, k] stay attached to the graph, so a subclass can add loss terms on
        them (e.g. `sae_dist.sae.tree`); the trainer only reads them.

        With `cfg.kernels` (default) the `sae_dist.kernels` ops compute the same losses without the
        [B, d_sae] pre-activations: one fused encoder + TopK pass yields the top max(k, f*k) latents
        (Multi-TopK's TopK_k is its first k columns, values sorted descending) and the AuxK candidates,
        then sparse decodes; gradients reach W_enc, b_enc, b_dec (b_pre, via encoder and decoder) and
        W_dec as in the plain path. With `cfg.kernels=False` (or when the kernels cannot be imported)
        the plain torch path below runs.
        """
        cfg = self.cfg
        if cfg.kernels:
            ops = kernel_ops()
            if ops is not None:
                return self._training_step_losses_kernels(x, dead_mask, ops)
        pre = self.pre_acts(x)
        if cfg.multi_topk:
            kk = cfg.multi_topk_factor * cfg.k
            vals_all, idx_all = self.topk_from_pre(pre, kk)
            vals, idx = vals_all[:, : cfg.k], idx_all[:, : cfg.k]
        else:
            vals, idx = self.topk_from_pre(pre)
        x_hat = self.decode_sparse(vals, idx)
        xf = x.to(x_hat.dtype)
        nmse = normalized_mse(xf, x_hat)
        loss = nmse
        mt = None
        if cfg.multi_topk:
            x_hat_mt = self.decode_sparse(vals_all, idx_all)
            mt = normalized_mse(xf, x_hat_mt)
            loss = loss + cfg.multi_topk_weight * mt
        aux = self.auxk_term(pre, dead_mask, xf, x_hat)
        loss = loss + cfg.auxk_coef * aux
        return TrainOutput(loss, nmse.detach(), aux.detach(), None if mt is None else mt.detach(),
                           x_hat.detach(), vals, idx)

    def _training_step_losses_kernels(self, x, dead_mask, ops) -> TrainOutput:
        """`training_step_losses` through the sae_dist.kernels ops (see there); never [B, d_sae]."""
        encode_topk, k_sparse_decode, k_auxk_loss = ops
        cfg = self.cfg
        self._check_x(x)
        backend = cfg.kernel_backend
        use_aux = dead_mask is not None and cfg.auxk_coef > 0
        k_aux = 0
        if use_aux:
            if dead_mask.dtype != torch.bool or dead_mask.shape != (cfg.n_latents,):
                raise ValueError(
                    f"dead_mask must be bool [{cfg.n_latents}], got {dead_mask.dtype} "
                    f"{tuple(dead_mask.shape)}"
                )
            k_aux = min(cfg.k_aux, int(dead_mask.sum()))
        kk = cfg.multi_topk_factor * cfg.k if cfg.multi_topk else cfg.k
        xw, W, be, bp = encoder_operands(x, self.W_enc, self.b_enc, self.b_dec)
        vals_all, idx_all, aux_vals, aux_idx = encode_topk(
            xw, W, be, bp, kk, dead_mask=dead_mask if k_aux > 0 else None, k_aux=k_aux, backend=backend,
        )
        if cfg.multi_topk:
            vals, idx = vals_all[:, : cfg.k], idx_all[:, : cfg.k]
        else:
            vals, idx = vals_all, idx_all
        x_hat = k_sparse_decode(vals, idx, self.W_dec, self.b_dec, backend=backend)
        xf = x.to(x_hat.dtype)
        nmse = normalized_mse(xf, x_hat)
        loss = nmse
        mt = None
        if cfg.multi_topk:
            x_hat_mt = k_sparse_decode(vals_all, idx_all, self.W_dec, self.b_dec, backend=backend)
            mt = normalized_mse(xf, x_hat_mt)
            loss = loss + cfg.multi_topk_weight * mt
        if k_aux > 0:
            residual = (xf - x_hat.detach()).float()
            # NaN -> 0 inside; sparse_grad: the main decode above gives W_dec a dense gradient
            aux = k_auxk_loss(aux_vals, aux_idx, self.W_dec, residual, backend=backend,
                              sparse_grad=True)
        else:
            aux = x_hat.new_zeros((), dtype=torch.float32)
        loss = loss + cfg.auxk_coef * aux
        return TrainOutput(loss, nmse.detach(), aux.detach(), None if mt is None else mt.detach(),
                           x_hat.detach(), vals, idx)
