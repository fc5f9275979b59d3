"""TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

    z   = TopK(W_enc^T (x - b_pre) + b_enc), ReLU on the kept values        (section 2.3, eq. 3)
    x^  = W_dec^T z + b_pre                                                  (section 2.1, eq. 2)

Parameter names and layouts follow the export contract (SAELens): `W_enc` [d_in, d_sae],
`b_enc` [d_sae], `W_dec` [d_sae, d_in] (unit-norm rows), `b_dec` [d_in] (b_dec IS b_pre).
Inputs of this module are the NORMALISED activations the store yields; the exported/loaded
module (`sae_dist.sae.export.load_sae`) takes raw activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sae_dist.sae.auxk import auxk_loss, normalized_mse, sparse_decode
from sae_dist.sae.config import SAEConfig

__all__ = ["TopKSAE", "TrainOutput"]


@dataclass
class TrainOutput:
    """Result of `TopKSAE.training_step_losses`. All losses are 0-d float32 tensors.

    loss = normalized_mse (+ multi_topk_weight * multi_topk_mse) + auxk_coef * auxk_loss.
    values/indices [B, k] are the TopK latents (for dead-latent tracking), x_hat [B, d_in].
    """

    loss: torch.Tensor
    normalized_mse: torch.Tensor
    auxk_loss: torch.Tensor
    multi_topk_mse: torch.Tensor | None
    x_hat: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor


def _torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class TopKSAE(nn.Module):
    """TopK SAE with the paper's training recipe hooks.

    Args:
      cfg: SAEConfig.
      device: where the parameters live.
      generator: optional torch.Generator for the tied initialisation (else the global RNG).
    Initialisation (section 2.4.1 "tied init"): W_dec rows are random unit vectors, W_enc =
    cfg.enc_init_scale * W_dec^T, b_enc = 0, b_dec (b_pre) = 0 until `sae_dist.sae.init.init_b_pre`.
    """

    def __init__(
        self,
        cfg: SAEConfig,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        dtype = _torch_dtype(cfg.dtype)
        d, n = cfg.d_in, cfg.n_latents
        self.W_enc = nn.Parameter(torch.empty(d, n, dtype=dtype, device=device))
        self.b_enc = nn.Parameter(torch.zeros(n, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(torch.empty(n, d, dtype=dtype, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d, dtype=dtype, device=device))
        from sae_dist.sae.init import tied_init_

        tied_init_(self, generator=generator, enc_scale=cfg.enc_init_scale)

    # ------------------------------------------------------------------ shapes / properties
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.n_latents

    @property
    def k(self) -> int:
        return self.cfg.k

    @property
    def b_pre(self) -> torch.Tensor:
        """Alias of b_dec (the paper's b_pre)."""
        return self.b_dec

    def _check_x(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"input last dim {x.shape[-1]} != SAE d_in {self.cfg.d_in} "
                f"(input shape {tuple(x.shape)})"
            )

    # ------------------------------------------------------------------ encoder
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations W_enc^T (x - b_pre) + b_enc: x [B, d_in] -> [B, d_sae].

        A dense matmul (the fused Triton encoder+TopK of sae_dist.kernels replaces it on CUDA).
        """
        self._check_x(x)
        return (x.to(self.W_enc.dtype) - self.b_dec) @ self.W_enc + self.b_enc

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

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, d_in] -> dense z [B, d_sae] with k non-negative entries per row (rest 0)."""
        pre = self.pre_acts(x)
        vals, idx = self.topk_from_pre(pre)
        return torch.zeros_like(pre).scatter_(-1, idx, vals)

    # ------------------------------------------------------------------ decoder
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Dense decode z [B, d_sae] -> z @ W_dec + b_pre [B, d_in] (for inference/eval only)."""
        return z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

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
        """
        cfg = self.cfg
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
        if dead_mask is not None and cfg.auxk_coef > 0:
            residual = (xf - x_hat.detach()).float()
            aux = auxk_loss(pre, dead_mask, residual, self.W_dec, cfg.k_aux)
        else:
            aux = pre.new_zeros((), dtype=torch.float32)
        loss = loss + cfg.auxk_coef * aux
        return TrainOutput(loss, nmse.detach(), aux.detach(), None if mt is None else mt.detach(),
                           x_hat.detach(), vals.detach(), idx)

    # ------------------------------------------------------------------ decoder constraint
    @torch.no_grad()
    def remove_parallel_grads_(self) -> None:
        """Remove from W_dec.grad the component parallel to each (unit) row of W_dec (section 2.4.1
        / Appendix A.1), so the step moves along the unit sphere's tangent: g_i -= (g_i . w_i) w_i.
        No-op when W_dec.grad is None."""
        g = self.W_dec.grad
        if g is None:
            return
        w = self.W_dec
        g.sub_((g * w).sum(-1, keepdim=True) * w)

    @torch.no_grad()
    def normalize_decoder_(self, eps: float = 0.0) -> None:
        """Rescale each W_dec row to unit L2 norm (after every optimizer step, section 2.4.1)."""
        norms = self.W_dec.norm(dim=-1, keepdim=True)
        if eps:
            norms = norms.clamp_min(eps)
        self.W_dec.div_(norms)
