"""ReLU sparse autoencoder trained with an L1 penalty (`sae=relu`; exported as SAELens' "standard").

    z   = ReLU((x - b_dec) W_enc + b_enc)                                   [B, d_sae]
    x^  = z W_dec + b_dec                                                   [B, d_in]
    L   = NMSE(x, x^) + lambda(t) * mean_b sum_i |z_bi| * (||W_dec_i|| or 1)

Sources:
- Bricken et al. 2023, "Towards Monosemanticity" (Anthropic), the autoencoder setup:
  ReLU encoder, b_dec subtracted before encoding, unit-norm decoder rows, L1 penalty on z.
- Cunningham et al. 2023, "Sparse Autoencoders Find Highly Interpretable Features in Language
  Models", section 2: the same ReLU + L1 objective with TIED weights, encoder = decoder^T
  (`tied_weights`).
- Conerly et al. 2024, "Circuits Updates - April 2024" (Anthropic), "Update on how we train SAEs":
  the L1 term weighted by the decoder row norms, sum_i |z_i| ||W_dec_i||, with an UNCONSTRAINED decoder
  (`l1_decoder_norm`, the default here), and the L1 coefficient warmed up linearly from 0 over the first
  5% of training (`l1_warmup_frac`).

The reconstruction term is the normalised MSE of Gao et al. 2024 (section 2.2) that every architecture
of this package uses (`sae_dist.sae.auxk.normalized_mse`), so lambda is in units of "fraction of
variance per unit of summed latent activation": see `ReLUOptions` for the default's derivation.
`l1_coef_at`, `l1_penalty`, `fold_decoder_norms` and the class itself are reused by the ProLU SAE
(`sae_dist.sae.prolu.ProLUSAE` subclasses `ReLUSAE`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sae_dist.sae.auxk import normalized_mse
from sae_dist.sae.base import SparseAutoencoder, TrainOutput
from sae_dist.sae.config import SAEConfig

__all__ = ["ReLUSAE", "ReLUOptions", "l1_coef_at", "l1_penalty", "fold_decoder_norms"]


def _check_number(name: str, value, lo: float, hi: float = math.inf) -> float:
    """float(value) when it is a real number in [lo, hi], else ValueError naming the option."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= float(value) <= hi:
        rng = f"[{lo}, {hi}]" if math.isfinite(hi) else f">= {lo} (finite)"
        raise ValueError(f"sae option {name}={value!r} must be a number {rng}")
    if not math.isfinite(float(value)):
        raise ValueError(f"sae option {name}={value!r} must be finite")
    return float(value)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"sae option {name}={value!r} must be true or false")
    return value


@dataclass
class ReLUOptions:
    """Options of `sae=relu` (SAEConfig.options / the top-level option keys of conf/sae/relu.yaml).

    l1_coef: lambda >= 0, the final L1 coefficient (on the NMSE scale, see below). Default 0.008.
    l1_warmup_frac: in [0, 1]; lambda rises linearly from 0 to l1_coef over this fraction of the
      training steps (Conerly et al. 2024: 5%), then stays constant. 0: constant from step 0.
    l1_decoder_norm: True (default, Conerly et al. 2024): penalise sum_i |z_i| ||W_dec_i|| and do NOT
      keep the decoder rows at unit norm; the export folds the row norms into the encoder (exact:
      ReLU is positively homogeneous) so the exported W_dec has unit rows. False (Bricken et al.
      2023): penalise sum_i |z_i| with unit-norm decoder rows (renormalised after each step, parallel
      gradient removed).
    tied_weights: True (Cunningham et al. 2023): W_enc IS W_dec^T (one parameter, W_dec); needs
      SAEConfig.enc_init_scale == 1. False (default): separate encoder, tied only at init.

    Why l1_coef = 0.008. The trainer feeds normalised inputs (layer_norm: ||x||^2 = d_in) and the loss
    is NMSE = SSE / D, D = E_b||x_b - mean(x)||^2 = c * d_in (c = 0.45 measured on SmolLM2-135M layer 19;
    0.4-0.9 is typical of residual streams). In SSE units the L1 coefficient is lambda * D, and for one
    latent with a unit decoder row the optimum of (a - z)^2 + lambda D z is the soft threshold
    z = max(0, a - tau), tau = lambda D / 2: a latent fires only when its feature's coefficient a
    exceeds tau. A token made of L0 features has coefficients ~ sqrt(D / L0); putting tau at ~40% of
    that (the heuristic this default is calibrated on: the heavy tail of small coefficients is cut,
    the bulk kept) gives lambda ~ 0.8 / sqrt(c * d_in * L0) = 0.0079 for d_in = 576,
    c = 0.45, L0 = 40. Check: 2M tokens of SmolLM2-135M layer-19 activations (d_in 576, n_latents 2048,
    default lr) end at L0 ~ 37 (still slowly falling) and NMSE 0.31. At other widths scale lambda as
    1 / sqrt(c * d_in) (e.g. ~0.007 at d_in 768, ~0.004 at 2048 for c ~ 0.45).

    Raises ValueError naming the option, the bad value and the valid range.
    """

    l1_coef: float = 0.008
    l1_warmup_frac: float = 0.05
    l1_decoder_norm: bool = True
    tied_weights: bool = False

    def __post_init__(self) -> None:
        self.l1_coef = _check_number("l1_coef", self.l1_coef, 0.0)
        self.l1_warmup_frac = _check_number("l1_warmup_frac", self.l1_warmup_frac, 0.0, 1.0)
        _check_bool("l1_decoder_norm", self.l1_decoder_norm)
        _check_bool("tied_weights", self.tied_weights)


def l1_coef_at(l1_coef: float, warmup_frac: float, step: int | None, n_steps: int | None) -> float:
    """The L1 coefficient at 0-based training `step` of `n_steps` (Conerly et al. 2024, linear warm-up):

        lambda(step) = l1_coef * min(1, step / (warmup_frac * n_steps))     (warmup_frac * n_steps > 0)
        lambda(step) = l1_coef                                              (no warm-up)

    so lambda(0) = 0 and lambda reaches l1_coef at step ceil(warmup_frac * n_steps). step/n_steps None
    (no schedule known, e.g. outside the trainer): l1_coef. Returns a Python float (no tensor state:
    the trainer calls `set_progress` before every step, so a resumed run gets the same values).
    """
    if step is None or n_steps is None:
        return float(l1_coef)
    warm = float(warmup_frac) * float(n_steps)
    if warm <= 0.0:
        return float(l1_coef)
    return float(l1_coef) * min(1.0, float(step) / warm)


def l1_penalty(z: torch.Tensor, W_dec: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens of the summed absolute latent activations (Bricken et al. 2023), each
    weighted by its decoder row norm when W_dec is given (Conerly et al. 2024):

        z [B, d_sae] (any float dtype), W_dec [d_sae, d_in] or None
        -> 0-d float32: (1/B) sum_b sum_i |z_bi| * ||W_dec_i||_2   (or without the norm factor)

    Differentiable in z and W_dec (the norm factor trains the decoder norms). Accumulates in float32.
    """
    a = z.float().abs()
    if W_dec is not None:
        a = a * W_dec.float().norm(dim=-1)
    return a.sum(-1).mean()


@torch.no_grad()
def fold_decoder_norms(W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                       eps: float = 1e-30) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move the decoder row norms n_i = ||W_dec_i|| into the encoder of a positively homogeneous
    activation f (f(c p) = c f(p) for c > 0: ReLU, ProLU with its threshold scaled alike):

        W_enc'[:, i] = n_i W_enc[:, i],  b_enc'_i = n_i b_enc_i,  W_dec'_i = W_dec_i / n_i

    so z'_i = n_i z_i and z' W_dec' = z W_dec exactly (up to rounding): same reconstruction, unit
    decoder rows (Conerly et al. 2024 fold the norms the same way when they report activations).
    W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in] -> float32 copies of the same shapes.
    A row with n_i = 0 (it reconstructs nothing) is exported as a zero row with a zero encoder column.
    """
    n = W_dec.float().norm(dim=-1)  # [d_sae]
    safe = n.clamp_min(eps)
    return W_enc.float() * n, b_enc.float() * n, W_dec.float() / safe[:, None]


class ReLUSAE(SparseAutoencoder):
    """ReLU + L1 SAE (`sae=relu`, module docstring). Export architecture "standard" (SAELens).

    Args:
      cfg: SAEConfig (k unused, may be None; cfg.options -> `ReLUOptions`).
      device: where the parameters live.
      generator: optional torch.Generator for the tied initialisation (W_enc = W_dec^T, b_enc = 0,
        Gao et al. 2024 section 2.4.1; the trainer re-initialises mesh-independently).
    Parameters: W_enc [d_in, d_sae] (absent with `tied_weights`: then `W_enc` is the view W_dec^T),
      b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in] (b_pre). No persistent buffers: the L1
      schedule is recomputed from `set_progress` every step.
    Not latent-sharded (`shardable = False`); no AuxK (dead_mask is ignored: the L1 objective does not
    use it; dead latents are only logged by the trainer).
    Raises ValueError for bad options, or tied_weights with cfg.enc_init_scale != 1.
    """

    architecture = "relu"
    export_architecture = "standard"
    shardable = False
    uses_k = False
    Options = ReLUOptions

    def __init__(self, cfg: SAEConfig, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None):
        super().__init__(cfg, device=device, generator=generator)
        self._step: int | None = None
        self._n_steps: int | None = None
        if self.opts.tied_weights:
            if cfg.enc_init_scale != 1.0:
                raise ValueError(
                    f"sae option tied_weights=true makes W_enc = W_dec^T, so enc_init_scale must be 1, "
                    f"got enc_init_scale={cfg.enc_init_scale}"
                )
            # the base created and tied-initialised a separate W_enc (= W_dec^T); drop it: from now on
            # W_enc is the view W_dec^T (the `W_enc` property), W_dec the only weight matrix
            del self._parameters["W_enc"]
            self._tied = True

    # ------------------------------------------------------------------ parameters
    @property
    def W_enc(self) -> torch.Tensor:
        """Encoder weights [d_in, d_sae]: the parameter, or W_dec^T (a view) with tied weights."""
        p = self._parameters.get("W_enc")
        if p is not None:
            return p
        if self.__dict__.get("_tied", False):
            return self.W_dec.T
        raise AttributeError("W_enc")  # not created yet (inside the base __init__)

    @property
    def unit_norm_decoder(self) -> bool:
        """Unit-norm decoder rows unless the L1 term is weighted by the decoder norms."""
        return not self.opts.l1_decoder_norm

    # ------------------------------------------------------------------ schedule
    def set_progress(self, step: int, n_steps: int) -> None:
        """Record the trainer's step for the L1 warm-up (`l1_coef_at`)."""
        self._step, self._n_steps = int(step), int(n_steps)

    def l1_coef_now(self) -> float:
        """The L1 coefficient of the current step (`l1_coef_at` of the last `set_progress`)."""
        return l1_coef_at(self.opts.l1_coef, self.opts.l1_warmup_frac, self._step, self._n_steps)

    # ------------------------------------------------------------------ forward
    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """pre [B, d_sae] -> z = ReLU(pre) [B, d_sae] (inference rule = training rule)."""
        return F.relu(pre)

    def train_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable latents z [B, d_sae] of normalised x [B, d_in] used by the training loss
        (here ReLU(pre_acts(x)); subclasses swap in their own surrogate-gradient activation)."""
        return F.relu(self.pre_acts(x))

    def training_step_losses(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> TrainOutput:
        """Losses of one batch x [B, d_in] (normalised, float32): NMSE(x, x^) + lambda(t) * L1, with
        L1 = `l1_penalty(z, W_dec if l1_decoder_norm else None)` and lambda(t) = `l1_coef_now()`.
        terms: "l1" (the unweighted penalty) and "l1_coef" (lambda(t)). dead_mask is ignored."""
        self._check_x(x)
        z = self.train_latents(x)
        x_hat = self.decode(z)
        nmse = normalized_mse(x, x_hat)
        l1 = l1_penalty(z, self.W_dec if self.opts.l1_decoder_norm else None)
        coef = self.l1_coef_now()
        loss = nmse + coef * l1
        return TrainOutput.from_dense(loss, nmse, z, x_hat,
                                      terms={"l1": l1, "l1_coef": l1.new_tensor(coef)})

    # ------------------------------------------------------------------ export
    def export_params(self) -> dict[str, torch.Tensor]:
        """Exported W_enc, b_enc, W_dec, b_dec (training space). With l1_decoder_norm the decoder row
        norms are folded into the encoder (`fold_decoder_norms`): unit W_dec rows, same x^; the
        exported latents are z_i * ||W_dec_i||, the quantity the L1 term penalised."""
        W_enc, b_enc, W_dec, b_dec = self.W_enc, self.b_enc, self.W_dec, self.b_dec
        if self.opts.l1_decoder_norm:
            W_enc, b_enc, W_dec = fold_decoder_norms(W_enc, b_enc, W_dec)
        return {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
