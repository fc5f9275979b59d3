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

Two departures from the papers, both measured on a planted dictionary (docs/architectures.md, "ReLU +
L1"; tests/unit/sae/test_arch_relu.py):
- the initial encoder scale (`init_scale`, `auto_init_scale`): with the tied init W_enc = W_dec^T and
  b_enc = 0, about half of the n latents fire on every token and the first reconstruction is about
  n / (2 d_in) times the input (measured fvu 10.8 after 20 steps at n / d_in = 8). By default the
  encoder starts at 2 d_in / n times the transpose, the scale at which that first reconstruction
  matches the input in expectation.
- an L0 target (`target_l0`, `l1_controller_step`): instead of a fixed lambda, a controller on log
  lambda moves lambda each step by a small multiple of the log-ratio log(L0 / target) extrapolated
  tau steps ahead, so the training L0 settles at the target (the L1 coefficient that gives a wanted
  L0 is not known in advance).

The reconstruction term is the normalised MSE of Gao et al. 2024 (section 2.2) that every architecture
of this package uses (`sae_dist.sae.base.normalized_mse`), so lambda is in units of "fraction of
variance per unit of summed latent activation": see `ReLUOptions` for the default's derivation.
`l1_coef_at`, `l1_penalty`, `fold_decoder_norms` and the class itself are reused by the ProLU SAE
(`sae_dist.sae.prolu.ProLUSAE` subclasses `ReLUSAE`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sae_dist.sae.base import SparseAutoencoder, TrainOutput, normalized_mse, parse_options
from sae_dist.sae.config import SAEConfig

__all__ = ["ReLUSAE", "ReLUOptions", "l1_coef_at", "l1_penalty", "fold_decoder_norms", "auto_init_scale",
           "l1_controller_step"]


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
      With `target_l0`: lambda's starting value (> 0), which the controller then moves.
    l1_warmup_frac: in [0, 1]; lambda rises linearly from 0 to l1_coef over this fraction of the
      training steps (Conerly et al. 2024: 5%), then stays constant. 0: constant from step 0.
    l1_decoder_norm: True (default, Conerly et al. 2024): penalise sum_i |z_i| ||W_dec_i|| and do NOT
      keep the decoder rows at unit norm; the export folds the row norms into the encoder (exact:
      ReLU is positively homogeneous) so the exported W_dec has unit rows. False (Bricken et al.
      2023): penalise sum_i |z_i| with unit-norm decoder rows (renormalised after each step, parallel
      gradient removed).
    tied_weights: True (Cunningham et al. 2023): W_enc IS W_dec^T (one parameter, W_dec); needs
      SAEConfig.enc_init_scale == 1. False (default): separate encoder, tied only at init.
    init_scale: "auto" (default) or a number > 0: the initial encoder is init_scale *
      SAEConfig.enc_init_scale * W_dec^T (`auto_init_scale`: min(1, 2 d_in / d_sae) for a separate
      encoder, 1 with tied weights). 1 is the plain tied init of earlier versions.
    target_l0: None (default: lambda follows l1_coef and its warm-up) or a number > 0: after the
      warm-up, lambda is driven by `l1_controller_step` so that the training L0 (non-zero latents per
      token) settles at target_l0; l1_coef is lambda's starting value.
    l0_gain: in (0, 1] (default 0.01), the controller's rate: log lambda moves by l0_gain *
      clip(e + tau de/dt, -1, 1) per step, e = log(L0 / target_l0) (`l1_controller_step`), so lambda
      changes by at most a factor e^(l0_gain * steps) over a run. Larger settles faster but overshoots:
      the SAE answers a change of lambda only over tens to hundreds of Adam steps.
    l0_tau_frac: in [0, 1] (default 0.1), the controller's look-ahead tau as a fraction of the training
      steps: lambda only rises while L0 is above the target AND not closing the gap within ~tau steps
      (0: a plain integral controller). Measured on the planted dictionary of docs/architectures.md
      (target 4, 488 steps): fvu 0.41 at L0 4.3 with 0.1, fvu 0.47 at L0 3.8 with 0.

    Why l1_coef = 0.008. The trainer feeds normalised inputs (layer_norm: ||x||^2 = d_in) and the loss
    is NMSE = SSE / D, D = E_b||x_b - mean(x)||^2 = c * d_in (c = 0.45 measured on SmolLM2-135M layer 19;
    0.4-0.9 is typical of residual streams). In SSE units the L1 coefficient is lambda * D, and for one
    latent with a unit decoder row the optimum of (a - z)^2 + lambda D z is the soft threshold
    z = max(0, a - tau), tau = lambda D / 2: a latent fires only when its feature's coefficient a
    exceeds tau. A token made of L0 features has coefficients ~ sqrt(D / L0); putting tau at ~40% of
    that (the heuristic this default is calibrated on: the heavy tail of small coefficients is cut,
    the bulk kept) gives lambda ~ 0.8 / sqrt(c * d_in * L0) = 0.0079 for d_in = 576,
    c = 0.45, L0 = 40. Check: 2M tokens of SmolLM2-135M layer-19 activations (d_in 576, d_sae 2048,
    default lr, before `init_scale` existed) end at L0 ~ 37 (still slowly falling) and NMSE 0.31. At
    other widths scale lambda as 1 / sqrt(c * d_in) (e.g. ~0.007 at d_in 768, ~0.004 at 2048 for
    c ~ 0.45). When the wanted L0 is known, `target_l0` finds lambda instead.

    Why init_scale = "auto". With W_enc = W_dec^T (unit rows w_i) and b_enc = 0, latent i fires when
    w_i . x > 0, i.e. on about half the latents, and E_w[ReLU(w . x) w] = x / (2 d_in) for a random unit
    w, so the first reconstruction is ~ c * n / (2 d_in) * x for W_enc = c W_dec^T: c = 1 overshoots the
    input n / (2 d_in)-fold (4-fold at n / d_in = 8: measured fvu 10.8 after 20 steps), and the first
    hundred-odd Adam steps only undo that. c = 2 d_in / n makes it unbiased. Measured on the planted
    dictionary of docs/architectures.md (d_in 64, 512 latents, 2M tokens, default lr, lambda 0.035):
    L0 33 / fvu 0.23 with c = 1, L0 14 / fvu 0.15 with c = 0.25 (auto); with target_l0 = 4, fvu 0.84
    with c = 1 and 0.41 with auto. With tied weights the encoder cannot be scaled apart from the
    decoder, and scaling the decoder rows too was worse (MMCS 0.88 / 0.71 with both at 0.5 / 0.32),
    so "auto" keeps 1 there.

    Raises ValueError naming the option, the bad value and the valid range.
    """

    l1_coef: float = 0.008
    l1_warmup_frac: float = 0.05
    l1_decoder_norm: bool = True
    tied_weights: bool = False
    init_scale: float | str = "auto"
    target_l0: float | None = None
    l0_gain: float = 0.01
    l0_tau_frac: float = 0.1

    def __post_init__(self) -> None:
        self.l1_coef = _check_number("l1_coef", self.l1_coef, 0.0)
        self.l1_warmup_frac = _check_number("l1_warmup_frac", self.l1_warmup_frac, 0.0, 1.0)
        _check_bool("l1_decoder_norm", self.l1_decoder_norm)
        _check_bool("tied_weights", self.tied_weights)
        if self.init_scale != "auto":
            if isinstance(self.init_scale, str) or not _is_positive(self.init_scale):
                raise ValueError(f"sae option init_scale={self.init_scale!r} must be \"auto\" or a number > 0 "
                                 "(finite)")
            self.init_scale = float(self.init_scale)
        if self.target_l0 is not None:
            if not _is_positive(self.target_l0):
                raise ValueError(f"sae option target_l0={self.target_l0!r} must be null or a number > 0 (finite)")
            self.target_l0 = float(self.target_l0)
            if self.l1_coef <= 0:
                raise ValueError(f"sae option l1_coef={self.l1_coef!r} must be > 0 with target_l0 (it is the "
                                 "controller's starting lambda, which moves multiplicatively)")
        if not _is_positive(self.l0_gain) or self.l0_gain > 1:
            raise ValueError(f"sae option l0_gain={self.l0_gain!r} must be a number in (0, 1]")
        self.l0_gain = float(self.l0_gain)
        self.l0_tau_frac = _check_number("l0_tau_frac", self.l0_tau_frac, 0.0, 1.0)


def _is_positive(value) -> bool:
    """True for a finite real number > 0 (not a bool)."""
    return (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(float(value))
            and float(value) > 0)


def auto_init_scale(d_in: int, d_sae: int, tied_weights: bool) -> float:
    """The initial encoder scale c of init_scale="auto" (W_enc = c * SAEConfig.enc_init_scale * W_dec^T):

        c = min(1, 2 d_in / d_sae)     (separate encoder)        c = 1     (tied weights)

    With unit decoder rows w_i and b_enc = 0, E_w[ReLU(c w . x) w] = c x / (2 d_in) for w uniform on the
    sphere, so the n latents' first reconstruction is ~ c n / (2 d_in) x: c = 2 d_in / n makes it the
    input's scale in expectation instead of n / (2 d_in) times it (`ReLUOptions`). Capped at 1 (an
    SAE narrower than 2 d_in undershoots even at 1). With tied weights c would scale the decoder too
    (measured worse, `ReLUOptions`). Returns a Python float in (0, 1].
    """
    if tied_weights:
        return 1.0
    return min(1.0, 2.0 * float(d_in) / float(d_sae))


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


#: smoothing of the controller's error rate (an EMA over ~1 / (1 - beta) = 10 steps)
CONTROLLER_RATE_BETA = 0.9


def l1_controller_step(state: tuple[float, float, float], l0: float, target_l0: float, gain: float,
                       tau: float) -> tuple[float, float, float]:
    """One step of the L0-target controller of `target_l0` on the state (log lambda, e_prev, r):

        e_t = log(max(L0_t, target_l0 / 1000) / target_l0)   (the log-ratio error; L0 = 0 counts as 1/1000
                                                              of the target)
        r_t = beta r_{t-1} + (1 - beta) (e_t - e_{t-1})      (the error's rate per step, beta = 0.9;
                                                              r_t = r_{t-1} at the first call, e_prev NaN)
        log lambda_{t+1} = log lambda_t + gain * clip(e_t + tau r_t, -1, 1)

    L0_t: mean non-zero latents per token of step t's (global) batch, >= 0. e + tau r is the error
    expected tau steps ahead at the current rate: lambda rises only while L0 is above the target AND
    not closing the gap within ~tau steps, falls while L0 is below it (and not recovering), and holds
    while L0 approaches the target by itself. Without the tau term (tau = 0: an integral controller)
    lambda keeps rising while the SAE is still adapting to the last raise, overshoots, and the
    shrinkage of that overshoot costs reconstruction long after (measured, docs/architectures.md).
    Multiplicative (log space): L0 answers the ratio of lambdas (doubling lambda roughly halved L0 on
    the planted dictionary). Not from the papers (they fix lambda). Python floats in and out.
    """
    log_coef, e_prev, rate = (float(v) for v in state)
    e = math.log(max(float(l0), float(target_l0) / 1000.0) / float(target_l0))
    if not math.isnan(e_prev):
        rate = CONTROLLER_RATE_BETA * rate + (1.0 - CONTROLLER_RATE_BETA) * (e - e_prev)
    u = max(-1.0, min(1.0, e + float(tau) * rate))
    return log_coef + float(gain) * u, e, rate


class ReLUSAE(SparseAutoencoder):
    """ReLU + L1 SAE (`sae=relu`, module docstring). Export architecture "standard" (SAELens).

    Args:
      cfg: SAEConfig (k unused, may be None; cfg.options -> `ReLUOptions`).
      device: where the parameters live.
      generator: optional torch.Generator for the tied initialisation (W_enc = W_dec^T, b_enc = 0,
        Gao et al. 2024 section 2.4.1; the trainer re-initialises mesh-independently).
    Parameters: W_enc [d_in, d_sae] (absent with `tied_weights`: then `W_enc` is the view W_dec^T),
      b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in].
    Initial encoder: `self.cfg` is `cfg` with enc_init_scale multiplied by the `init_scale` option's
      factor (`init_factor`, `auto_init_scale`), so that both this constructor's tied init and the
      trainer's mesh-independent re-initialisation (which reads `sae.cfg.enc_init_scale`) apply it.
    Persistent buffer (only with `target_l0`; checkpointed and copied into the EMA model):
      l1_controller float64 [3]: the state (log lambda, last error e, error rate r) of the L0-target
      controller, (log(l1_coef), NaN, 0) at construction, updated in place by each training step after
      the warm-up (`l1_controller_step`). Every rank computes the same update (`update_l1_controller_`).
      Without target_l0 there is no buffer: lambda is recomputed from `set_progress` every step.
    Not latent-sharded (`shardable = False`); no AuxK (dead_mask is ignored: the L1 objective does not
    use it; dead latents are only logged by the trainer).
    Raises ValueError for bad options, or tied_weights with cfg.enc_init_scale != 1 or a numeric
    init_scale != 1.
    """

    architecture = "relu"
    export_architecture = "standard"
    shardable = False
    uses_k = False
    Options = ReLUOptions

    def __init__(self, cfg: SAEConfig, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None):
        opts = parse_options(self.Options, cfg.options, cfg.architecture or self.architecture)
        if opts.tied_weights and (cfg.enc_init_scale != 1.0 or opts.init_scale not in ("auto", 1.0)):
            raise ValueError(
                f"sae option tied_weights=true makes W_enc = W_dec^T, so enc_init_scale and init_scale must be "
                f"1 (or init_scale \"auto\"), got enc_init_scale={cfg.enc_init_scale}, "
                f"init_scale={opts.init_scale!r}"
            )
        factor = self.init_factor(opts, cfg)
        if factor != 1.0:
            cfg = dataclasses.replace(cfg, enc_init_scale=cfg.enc_init_scale * factor)
        super().__init__(cfg, device=device, generator=generator)
        self._step: int | None = None
        self._n_steps: int | None = None
        if self.opts.target_l0 is not None:
            self.register_buffer("l1_controller", torch.tensor([math.log(self.opts.l1_coef), math.nan, 0.0],
                                                               dtype=torch.float64, device=device))
        if self.opts.tied_weights:
            # the base created and tied-initialised a separate W_enc (= W_dec^T); drop it: from now on
            # W_enc is the view W_dec^T (the `W_enc` property), W_dec the only weight matrix
            del self._parameters["W_enc"]
            self._tied = True

    @staticmethod
    def init_factor(opts: ReLUOptions, cfg: SAEConfig) -> float:
        """The factor applied to cfg.enc_init_scale: `auto_init_scale` for init_scale="auto", else the
        number given."""
        if opts.init_scale == "auto":
            return auto_init_scale(cfg.d_in, cfg.d_sae, opts.tied_weights)
        return float(opts.init_scale)

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
        """The L1 coefficient of the current step: `l1_coef_at` of the last `set_progress`, with
        `target_l0` the same warm-up ramp times the controller's lambda, exp(l1_controller[0])."""
        if self.opts.target_l0 is None:
            return l1_coef_at(self.opts.l1_coef, self.opts.l1_warmup_frac, self._step, self._n_steps)
        return l1_coef_at(math.exp(float(self.l1_controller[0])), self.opts.l1_warmup_frac, self._step,
                          self._n_steps)

    def _warming_up(self) -> bool:
        """True while the L1 warm-up ramp is below 1 (the controller waits for its end)."""
        if self._step is None or self._n_steps is None:
            return False
        return float(self._step) < self.opts.l1_warmup_frac * float(self._n_steps)

    @torch.no_grad()
    def update_l1_controller_(self, l0_sum: torch.Tensor, n_tokens: int) -> float:
        """After a training step with `target_l0`: L0 = l0_sum / n_tokens (non-zero latents per token of
        this rank's batch), averaged over the dp ranks (`self.comm`) (one all-reduce of two numbers,
        so every replica sees the same global L0 and keeps the same lambda), then `l1_controller_step`
        on the l1_controller buffer with tau = l0_tau_frac * n_steps (0 outside the trainer, where no
        set_progress was called). Skipped during the warm-up. l0_sum: 0-d tensor (any dtype/device).
        Returns the L0 used (float), or NaN when skipped. RuntimeError without target_l0."""
        if self.opts.target_l0 is None:
            raise RuntimeError("update_l1_controller_ needs the sae option target_l0")
        if self._warming_up():
            return math.nan
        counts = torch.stack([l0_sum.detach().to(torch.float64).reshape(()),
                              torch.tensor(float(n_tokens), dtype=torch.float64, device=l0_sum.device)])
        self.comm.sum_over_dp_(counts)
        l0 = float(counts[0] / counts[1])
        tau = 0.0 if self._n_steps is None else self.opts.l0_tau_frac * self._n_steps
        new = l1_controller_step(self.l1_controller.tolist(), l0, self.opts.target_l0, self.opts.l0_gain, tau)
        self.l1_controller.copy_(torch.tensor(new, dtype=torch.float64))
        return l0

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
        terms: "l1" (the penalty as weighted) and "l1_coef" (lambda(t), the value this loss used).
        With `target_l0`, in training mode with gradients enabled (a training step, not an evaluation),
        the controller then updates lambda for the next step from this batch's L0
        (`update_l1_controller_`). dead_mask is ignored."""
        self._check_x(x)
        z = self.train_latents(x)
        x_hat = self.decode(z)
        nmse = normalized_mse(x, x_hat)
        l1 = l1_penalty(z, self.W_dec if self.opts.l1_decoder_norm else None)
        coef = self.l1_coef_now()
        loss = nmse + coef * l1
        out = TrainOutput.from_dense(loss, nmse, z, x_hat, terms={"l1": l1, "l1_coef": l1.new_tensor(coef)})
        if self.opts.target_l0 is not None and self.training and torch.is_grad_enabled():
            self.update_l1_controller_(out.l0_sum, x.shape[0])
        return out

    # ------------------------------------------------------------------ export
    def export_params(self) -> dict[str, torch.Tensor]:
        """Exported W_enc, b_enc, W_dec, b_dec (training space). With l1_decoder_norm the decoder row
        norms are folded into the encoder (`fold_decoder_norms`): unit W_dec rows, same x^; the
        exported latents are z_i * ||W_dec_i||, the quantity the L1 term penalised."""
        W_enc, b_enc, W_dec, b_dec = self.W_enc, self.b_enc, self.W_dec, self.b_dec
        if self.opts.l1_decoder_norm:
            W_enc, b_enc, W_dec = fold_decoder_norms(W_enc, b_enc, W_dec)
        return {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
