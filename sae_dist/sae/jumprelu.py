"""JumpReLU sparse autoencoder trained on an L0 penalty through straight-through estimators
(`sae=jumprelu`; exported as SAELens' "jumprelu" with a per-latent `threshold`).

    pre = (x - b_dec) W_enc + b_enc                                          [B, d_sae]
    z   = JumpReLU_theta(pre) = pre * H(pre - theta),  theta = exp(log_threshold (+ offset)) > 0
    x^  = z W_dec + b_dec                                                    [B, d_in]
    L   = NMSE(x, x^) + lambda(t) * S,   S = L0 = mean_b sum_i H(pre_bi - theta_i)
                                         or S = (L0 / target_l0 - 1)^2  (option `target_l0`)

Sources:
- Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU Sparse
  Autoencoders" (arXiv:2407.14435): section 3 (the JumpReLU SAE and its L0 loss), section 4
  (straight-through estimators: the pseudo-derivatives w.r.t. the threshold, eq. 11 for JumpReLU and
  eq. 12 for the Heaviside step, with a kernel K of bandwidth epsilon; the rectangle kernel
  K(u) = 1[|u| < 1/2]) and the pseudo-code appendix (log-parametrised threshold; the gradient w.r.t.
  the pre-activations is the ordinary one of pre * H(pre - theta) and ZERO through the step of the
  L0 term):

      ð/ðtheta JumpReLU_theta(pre) := -(theta / eps) K((pre - theta) / eps)              (eq. 11)
      ð/ðtheta H(pre - theta)      := -(1 / eps)     K((pre - theta) / eps)              (eq. 12)

  Summed over a batch, (1 / (B eps)) sum_b K((pre_bi - theta_i) / eps) is a kernel density estimate
  of the pre-activation density at theta_i, so the threshold receives the gradient of the EXPECTED
  loss (section 4), which the true (zero almost everywhere) derivative does not give.
- Lieberum et al. 2024, "Gemma Scope" (arXiv:2408.05147): the recipe at scale: threshold initialised
  at 0.001, bandwidth 0.001 (inputs scaled by one constant to a fixed mean squared norm), a linear
  warm-up of the sparsity coefficient, no auxiliary loss for dead latents (dead_mask is ignored).
- The threshold's initial value: `JumpReLUOptions.init_threshold` ("auto", derived from the first
  batch, by default: with the papers' 0.001 the threshold cannot reach a useful value within a run of
  a few hundred Adam steps; measured numbers there).
- `target_l0` (not in the papers): the penalty lambda * (L0 / target_l0 - 1)^2 through the same
  straight-through estimator, as in the JumpReLU trainer of the `dictionary_learning` library (Marks,
  Karvonen, Mueller 2024). Its threshold gradient is lambda * 2 (L0 / T - 1) / T * ð L0 / ð theta:
  it raises the thresholds while L0 > T and LOWERS them while L0 < T, so L0 settles where the
  reconstruction's pull towards more latents balances a small excess over T (see `JumpReLUOptions`).

The reconstruction term is the normalised MSE of Gao et al. 2024 (section 2.2) that every architecture
of this package uses (`sae_dist.sae.base.normalized_mse`), i.e. the paper's squared error divided by
the batch variance D = E_b||x_b - mean(x)||^2: lambda here is the paper's lambda / D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sae_dist.sae.base import SparseAutoencoder, TrainOutput, normalized_mse
from sae_dist.sae.config import SAEConfig

__all__ = ["JumpReLUSAE", "JumpReLUOptions", "JumpReLUFunction", "StepFunction", "jumprelu", "step",
           "rectangle", "l0_coef_at"]


# ---------------------------------------------------------------------------------------- options
def _check_number(name: str, value, lo: float, hi: float = math.inf, *, lo_open: bool = False) -> float:
    """float(value) when it is a finite real number in [lo, hi] ((lo, hi] with lo_open), else
    ValueError naming the option, the value and the valid range."""
    rng = f"{'(' if lo_open else '['}{lo}, {hi}]" if math.isfinite(hi) else (
        f"> {lo} (finite)" if lo_open else f">= {lo} (finite)")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"sae option {name}={value!r} must be a number {rng}")
    v = float(value)
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
        raise ValueError(f"sae option {name}={value!r} must be a number {rng}")
    return v


@dataclass
class JumpReLUOptions:
    """Options of `sae=jumprelu` (SAEConfig.options / the top-level option keys of conf/sae/jumprelu.yaml).

    l0_coef: lambda >= 0, the final coefficient of the sparsity term (NMSE scale: the paper's lambda
      divided by the batch variance D). Default in the class docstring below.
    l0_warmup_frac: in [0, 1]; lambda rises linearly from 0 to l0_coef over this fraction of the
      training steps, then stays constant (Gemma Scope warms the sparsity coefficient up linearly at
      the start of training; a fraction keeps the same shape in runs of any length). 0: constant.
    target_l0: None (default: the paper's penalty lambda * L0) or a number > 0: the sparsity term is
      lambda * (L0 / target_l0 - 1)^2 instead (module docstring), which drives L0 towards target_l0
      from both sides; l0_coef then sets how tightly (the residual excess of L0 over the target
      shrinks as 1 / l0_coef).
    init_threshold: "auto" (default) or a number > 0 (activation units of the training space): theta
      at initialisation, the same for every latent. A number is the papers' recipe (Gemma Scope:
      0.001 with E||x||^2 = d_in, the scale of our normalised inputs, ||x|| = sqrt(d_in)). "auto"
      derives it from the first training batch (`JumpReLUSAE.auto_threshold`): sqrt(lambda * D) (the
      threshold at which a latent's squared contribution pays for its L0 price, see below), or with
      `target_l0` the value that makes that batch's L0 equal the target.
    bandwidth: epsilon > 0 of the rectangle kernel of the pseudo-derivatives (eq. 11-12), activation
      units (paper / Gemma Scope: 0.001 at that scale).

    Why "auto" by default. Adam moves log_threshold by at most ~lr per step, so theta can change by a
    factor of at most exp(lr * steps) over a run. The papers train on billions of tokens (Gemma
    Scope: 4-16B tokens, ~10^6 steps); this project's default runs are a few hundred steps at lr
    ~2e-4 - 2e-3 (the demo: 390 steps at 2.8e-4, a factor 1.1 at most), while the threshold that
    gives tens of latents per token on the demo data is ~1.6, 1600 times 0.001. Measured on the
    synthetic dictionary (d_in 32, true L0 3.2, 293 steps, lr 2.3e-3): from 0.001 theta reached
    0.0018 and L0 stayed ~51 (MMCS 0.47). "auto" starts theta where the loss balances; the paper's
    straight-through gradients then adjust each latent's threshold (within that factor).

    Why the default l0_coef. A latent with a unit decoder row whose pre-activation p matches the
    residual it explains lowers the squared error by about p^2 when it fires and costs lambda * D in
    the NMSE-scaled loss, so the loss balances at theta^2 ~ lambda * D (the paper's section 4
    threshold gradient is the density at theta times this balance). See conf/sae/jumprelu.yaml for
    the value chosen for the demo data and the measured L0.

    Raises ValueError naming the option, the bad value and the valid range.
    """

    l0_coef: float = 0.01
    l0_warmup_frac: float = 0.05
    target_l0: float | None = None
    init_threshold: float | str = "auto"
    bandwidth: float = 0.001

    def __post_init__(self) -> None:
        self.l0_coef = _check_number("l0_coef", self.l0_coef, 0.0)
        self.l0_warmup_frac = _check_number("l0_warmup_frac", self.l0_warmup_frac, 0.0, 1.0)
        if self.target_l0 is not None:
            self.target_l0 = _check_number("target_l0", self.target_l0, 0.0, lo_open=True)
        if self.init_threshold != "auto":
            if isinstance(self.init_threshold, str):
                raise ValueError(f"sae option init_threshold={self.init_threshold!r} must be \"auto\" or a "
                                 "number > 0 (finite)")
            self.init_threshold = _check_number("init_threshold", self.init_threshold, 0.0, lo_open=True)
        self.bandwidth = _check_number("bandwidth", self.bandwidth, 0.0, lo_open=True)


def l0_coef_at(l0_coef: float, warmup_frac: float, step: int | None, n_steps: int | None) -> float:
    """lambda at 0-based training `step` of `n_steps`: l0_coef * min(1, step / (warmup_frac * n_steps))
    (linear warm-up from 0, Rajamanoharan et al. 2024 / Lieberum et al. 2024), l0_coef without a
    warm-up or outside the trainer (step/n_steps None). A Python float: no state, so a resumed run
    recomputes the same values from `set_progress`."""
    if step is None or n_steps is None:
        return float(l0_coef)
    warm = float(warmup_frac) * float(n_steps)
    if warm <= 0.0:
        return float(l0_coef)
    return float(l0_coef) * min(1.0, float(step) / warm)


# ------------------------------------------------------------------- straight-through estimators
def rectangle(u: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel K(u) = 1[-1/2 < u < 1/2] (Rajamanoharan et al. 2024, section 4), u's dtype."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _theta_grad(pre: torch.Tensor, theta: torch.Tensor, scale: torch.Tensor, bandwidth: float,
                grad_out: torch.Tensor) -> torch.Tensor:
    """sum over the leading dims of -(scale / eps) K((pre - theta) / eps) * grad_out, float32 [d_sae]."""
    p = pre.float()
    t = theta.float()
    k = rectangle((p - t) / bandwidth) * grad_out.float()
    g = -(scale.float() / bandwidth) * k.reshape(-1, p.shape[-1]).sum(0)
    return g.to(theta.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """z = pre * 1[pre > theta] with the paper's straight-through gradients (section 4, eq. 11):

        dL/dpre   = dL/dz * 1[pre > theta]                                 (the ordinary derivative)
        dL/dtheta = sum_b dL/dz_b * ( -(theta / eps) K((pre_b - theta) / eps) )   (pseudo-derivative)

    pre [..., d_sae] (any float dtype), theta [d_sae] (> 0), bandwidth eps: float > 0.
    Returns z with pre's shape and dtype. The kernel is evaluated in float32.
    """

    @staticmethod
    def forward(ctx, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = float(bandwidth)
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        pre, theta = ctx.saved_tensors
        g_pre = g_theta = None
        if ctx.needs_input_grad[0]:
            g_pre = grad_out * (pre > theta).to(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            g_theta = _theta_grad(pre, theta, theta, ctx.bandwidth, grad_out)
        return g_pre, g_theta, None


class StepFunction(torch.autograd.Function):
    """H(pre - theta) = 1[pre > theta] with the paper's straight-through gradients (section 4, eq. 12):

        dL/dpre   = 0                                                       (no pseudo-derivative)
        dL/dtheta = sum_b dL/dH_b * ( -(1 / eps) K((pre_b - theta) / eps) )

    pre [..., d_sae], theta [d_sae] (> 0), bandwidth eps > 0. Returns H in pre's dtype (0. / 1.).
    """

    @staticmethod
    def forward(ctx, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = float(bandwidth)
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        pre, theta = ctx.saved_tensors
        g_pre = torch.zeros_like(pre) if ctx.needs_input_grad[0] else None
        g_theta = None
        if ctx.needs_input_grad[1]:
            g_theta = _theta_grad(pre, theta, torch.ones((), device=theta.device), ctx.bandwidth, grad_out)
        return g_pre, g_theta, None


def jumprelu(pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """`JumpReLUFunction.apply`: pre [..., d_sae], theta [d_sae] -> z [..., d_sae]."""
    return JumpReLUFunction.apply(pre, theta, bandwidth)


def step(pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """`StepFunction.apply`: pre [..., d_sae], theta [d_sae] -> H(pre - theta) [..., d_sae]."""
    return StepFunction.apply(pre, theta, bandwidth)


# ------------------------------------------------------------------------------------------ model
#: theta before the data-derived initialisation of init_threshold="auto" (Gemma Scope's value).
PAPER_INIT_THRESHOLD = 0.001


class JumpReLUSAE(SparseAutoencoder):
    """JumpReLU SAE (`sae=jumprelu`, module docstring; Rajamanoharan et al. 2024). Export "jumprelu".

    Args:
      cfg: SAEConfig (k unused, may be None; cfg.options -> `JumpReLUOptions`).
      device: where the parameters live.
      generator: optional torch.Generator for the tied initialisation (W_enc = W_dec^T, b_enc = 0,
        Gao et al. 2024 section 2.4.1; the trainer re-initialises mesh-independently).
    Parameters: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in] (unit-norm rows, the base
      default: renormalised after every step with the parallel gradient removed. The loss is invariant
      under W_dec_i -> c W_dec_i with W_enc[:, i], b_enc_i, theta_i -> / c (same x^, same L0), so the
      constraint only fixes that scale and gives the export contract's unit rows; it does not change
      which reconstructions are reachable), b_dec [d_in], and log_threshold float32 [d_sae] (the paper's
      log-parametrised threshold, latent-indexed along dim 0; checkpointed and EMA-averaged like
      every parameter):

          theta = exp(log_threshold + log_threshold_offset)        float32 [d_sae], > 0

    Persistent buffers (checkpointed, copied into the EMA model; updated in place):
      log_threshold_offset float32 []: 0 with a numeric init_threshold (log_threshold is then log theta
        exactly, log(init_threshold) at init); with init_threshold="auto" log(0.001) until the first
        training step, then log of the data-derived threshold (`auto_threshold`) while log_threshold
        starts at 0. Held in a buffer so that the EMA model and a resumed run get it exactly.
      threshold_initialized bool []: whether the initial threshold is final (True for a number).
    The lambda schedule is recomputed from `set_progress` every step (no state).
    Pre-activations are computed in float32 even under bf16 autocast: bf16 resolves |pre| ~ 1 only to
    ~2^-8, coarser than the kernel bandwidth (0.001), which would turn the threshold's
    pseudo-gradient into a count of rounding coincidences. The decoder follows autocast.
    Not latent-sharded (`shardable = False`); no AuxK: the papers use none, dead_mask is ignored.
    Raises ValueError for bad options.
    """

    architecture = "jumprelu"
    export_architecture = "jumprelu"
    shardable = False
    uses_k = False
    Options = JumpReLUOptions

    def __init__(self, cfg: SAEConfig, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None):
        super().__init__(cfg, device=device, generator=generator)
        auto = self.opts.init_threshold == "auto"
        init = 0.0 if auto else math.log(self.opts.init_threshold)
        offset = math.log(PAPER_INIT_THRESHOLD) if auto else 0.0
        self.log_threshold = torch.nn.Parameter(
            torch.full((cfg.d_sae,), init, dtype=torch.float32, device=device))
        self.register_buffer("log_threshold_offset", torch.tensor(offset, dtype=torch.float32, device=device))
        self.register_buffer("threshold_initialized", torch.tensor(not auto, device=device))
        self._init_pending = auto
        self._step: int | None = None
        self._n_steps: int | None = None

    # ------------------------------------------------------------------ threshold / schedule
    @property
    def threshold(self) -> torch.Tensor:
        """theta = exp(log_threshold + log_threshold_offset), float32 [d_sae] (differentiable in
        log_threshold), activation units of the training (normalised) space."""
        return (self.log_threshold + self.log_threshold_offset).exp()

    def set_progress(self, step: int, n_steps: int) -> None:
        """Record the trainer's step for the lambda warm-up (`l0_coef_at`)."""
        self._step, self._n_steps = int(step), int(n_steps)

    def l0_coef_now(self) -> float:
        """lambda of the current step (`l0_coef_at` of the last `set_progress`)."""
        return l0_coef_at(self.opts.l0_coef, self.opts.l0_warmup_frac, self._step, self._n_steps)

    @torch.no_grad()
    def auto_threshold(self, x: torch.Tensor, pre: torch.Tensor) -> float:
        """The data-derived initial threshold of init_threshold="auto" from one batch x [B, d_in]
        (normalised) and its pre-activations pre [B, d_sae]:

          no target_l0:   theta_0 = sqrt(l0_coef * D),  D = mean_b ||x_b - mean(x)||^2 (the NMSE
                          denominator): a latent whose pre-activation p reconstructs its share of x
                          lowers the NMSE by ~p^2 / D when it fires and costs l0_coef, so firing pays
                          from p^2 > l0_coef * D on (module docstring, `JumpReLUOptions`);
          target_l0 = T:  theta_0 = midway between the k-th and (k+1)-th largest entries of pre,
                          k = round(B * T): the one threshold for all latents with which this
                          batch's L0 is T (to 1 / B).

        Floored at the bandwidth (theta > 0 even for l0_coef = 0 or a batch with too few positive
        pre-activations). Under data parallelism (`self.comm`) the ranks' values are averaged, so
        every replica starts from the same theta. Returns a Python float.
        """
        if self.opts.target_l0 is None:
            xf = x.float()
            den = (xf - xf.mean(0, keepdim=True)).pow(2).sum(-1).mean()
            theta = (self.opts.l0_coef * den).sqrt()
        else:
            flat = pre.detach().float().reshape(-1)
            kk = min(flat.numel() - 1, max(1, round(pre.shape[0] * self.opts.target_l0)))
            if kk < 1:  # a single entry (B = d_sae = 1): nothing to choose between
                theta = flat.max()
            else:
                top = flat.topk(kk + 1, sorted=True).values
                theta = 0.5 * (top[kk - 1] + top[kk])  # exactly kk entries above it
        theta = theta.reshape(1).clamp_min(self.opts.bandwidth)
        if self.comm.dp > 1:
            self.comm.sum_over_dp_(theta)
            theta /= self.comm.dp
        return float(theta)

    @torch.no_grad()
    def _maybe_init_threshold_(self, x: torch.Tensor, pre: torch.Tensor) -> None:
        """init_threshold="auto": at the first training step set theta = `auto_threshold` for every
        latent (log_threshold_offset; in place, once: the flag is checkpointed)."""
        if not self._init_pending:
            return
        if bool(self.threshold_initialized):
            self._init_pending = False
            return
        theta0 = self.auto_threshold(x, pre)
        self.log_threshold.zero_()
        self.log_threshold_offset.fill_(math.log(theta0))
        self.threshold_initialized.fill_(True)
        self._init_pending = False

    # ------------------------------------------------------------------ forward
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """(x - b_dec) W_enc + b_enc: x [B, d_in] -> float32 [B, d_sae] (autocast off: see the class)."""
        self._check_x(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return (x.float() - self.b_dec.float()) @ self.W_enc.float() + self.b_enc.float()

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """pre [B, d_sae] -> z = pre * 1[pre > theta] [B, d_sae] (inference rule = training forward;
        equal to ReLU(pre) * 1[pre > theta] since theta > 0)."""
        return pre * (pre > self.threshold.detach().to(pre.dtype)).to(pre.dtype)

    def sparsity_terms(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L0, S) from pre [B, d_sae]: L0 = mean_b sum_i H(pre_bi - theta_i) through `step` (0-d
        float32, differentiable in log_threshold only), S = L0 or (L0 / target_l0 - 1)^2."""
        l0 = step(pre, self.threshold, self.opts.bandwidth).float().sum(-1).mean()
        if self.opts.target_l0 is None:
            return l0, l0
        return l0, (l0 / self.opts.target_l0 - 1.0) ** 2

    def training_step_losses(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> TrainOutput:
        """Losses of one batch x [B, d_in] (normalised, float32): NMSE(x, x^) + lambda(t) * S (module
        docstring), z = `jumprelu`(pre, theta, bandwidth). The first call of a run with
        init_threshold="auto" first sets the initial threshold (`auto_threshold`). terms:
        "l0_penalty" (S), "l0_coef" (lambda(t)), "mean_threshold" (mean theta over latents).
        dead_mask is ignored (the papers use no AuxK)."""
        pre = self.pre_acts(x)
        self._maybe_init_threshold_(x, pre)
        theta = self.threshold
        z = jumprelu(pre, theta, self.opts.bandwidth)
        x_hat = self.decode(z)
        nmse = normalized_mse(x, x_hat)
        _, s = self.sparsity_terms(pre)
        coef = self.l0_coef_now()
        loss = nmse + coef * s
        return TrainOutput.from_dense(loss, nmse, z, x_hat, terms={
            "l0_penalty": s, "l0_coef": s.new_tensor(coef), "mean_threshold": theta.mean()})

    # ------------------------------------------------------------------ export
    def export_extras(self) -> dict[str, torch.Tensor]:
        """{"threshold": theta [d_sae]} in activation units of the training space (the export divides
        it by the normalisation fold factor, like b_enc)."""
        return {"threshold": self.threshold.detach()}

    def export_cfg(self) -> dict:
        """cfg.json fields: SAELens' "jumprelu" (z = ReLU(pre) * 1[pre > threshold])."""
        return {"architecture": self.export_architecture, "activation_fn": "relu",
                "activation_fn_kwargs": {}}
