"""Soft TopK sparse autoencoder (`sae=soft_topk`): the TopK SAE of Gao et al. 2024 trained through a
differentiable relaxation of the top-k selection; inference and the export are the hard TopK.

The relaxation (the Limited Multi-Label projection, Amos, Koltun, Kolter 2019, "The Limited
Multi-Label Projection Layer", arXiv:1906.08707, section 3). For one token with pre-activations
(scores) s [d_sae] and a temperature T > 0, the soft top-k mask is the projection of s / T onto the
polytope {m in [0, 1]^d_sae : sum_i m_i = k} regularised by the binary entropy, whose solution is

    m_i = sigmoid((s_i - tau) / T),   tau the unique root of  g(tau) = sum_i sigmoid((s_i - tau)/T) - k

(LML's y* = sigmoid(x + nu*) with x = s / T, nu* = -tau / T). g is strictly decreasing in tau, so tau
is found by bisection (LML's bracketing method) on a bracket known in closed form (`soft_topk_threshold`),
then polished by safeguarded Newton steps. Its gradient follows from the implicit function theorem on
g(tau(s), s) = 0 (LML section 3, backward pass):

    d tau / d s_j = w_j = m_j (1 - m_j) / sum_i m_i (1 - m_i),
    d m_i / d s_j = m_i (1 - m_i) / T * (delta_ij - w_j),

which `soft_topk_mask` realises with autograd (tau is detached, then re-attached to first order as
tau + sum_j w_j (s_j - stop_grad(s_j)) with w detached: its value is tau, its derivative w).
As T -> 0 with distinct k-th and (k+1)-th scores, m tends to the hard top-k indicator (every m_i with
s_i above the gap tends to 1, below to 0), so the soft latents below tend to the TopK latents.
The same family of relaxations: Xie et al. 2020 ("Differentiable Top-k with Optimal Transport",
entropic OT), Sander et al. 2023 ("Fast, Differentiable and Sparse Top-k: a Convex Analysis
Perspective", other regularisers); we use LML's binary-entropy one for its closed-form mask.

Soft latents (dense [B, d_sae]):   z_soft = m * ReLU(pre)      (TopK's ReLU on the kept values)
Hard latents (TopK, Gao et al. 2024 section 2.3):  z_hard = TopK(pre) with ReLU on the kept values.

Two training modes (`SoftTopKOptions.mode`):
  "ste"  (default): forward = z_hard (the exact TopK SAE forward), backward = the gradient of z_soft
         at temperature T (a straight-through estimator with the relaxation as the surrogate,
         Bengio, Leonard, Courville 2013, "Estimating or Propagating Gradients Through Stochastic
         Neurons", arXiv:1308.3432): z = z_hard.detach() + (z_soft - z_soft.detach()). Unlike hard
         TopK, latents just outside the top k get a gradient (through their own mask and, for all
         latents, through tau).
  "soft": forward = z_soft itself, T annealed from `temperature` to `final_temperature` over the run
         (`set_progress`), so training ends close to the hard TopK the export uses.
Both decode densely (z [B, d_sae] @ W_dec): the relaxation needs every latent's pre-activation, so the
dense path (a few [B, d_sae] float32 buffers, (n_bisect + n_newton) elementwise passes for tau) is
used; acceptable at the scales this architecture is compared at, and why it is not latent-sharded.
The losses are TopK's: normalised MSE (Gao et al. 2024 section 2.2) + auxk_coef * AuxK on the dense
pre-activations of the dead latents (section 2.4.1, Appendix A.2). Dead-latent tracking and the
logged L0 count the hard top-k (what the exported model uses), also in "soft" mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sae_dist.sae.base import TrainOutput, normalized_mse
from sae_dist.sae.config import SAEConfig
from sae_dist.sae.topk import TopKSAE

__all__ = ["SoftTopKSAE", "SoftTopKOptions", "soft_topk_threshold", "soft_topk_mask", "annealed_temperature",
           "MODES", "ANNEALS"]

MODES = ("ste", "soft")
ANNEALS = ("exponential", "linear", "none")


def _positive_float(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)) or float(v) <= 0:
        raise ValueError(f"sae option {name}={v!r} must be a finite number > 0")
    return float(v)


@dataclass
class SoftTopKOptions:
    """Options of `sae=soft_topk` (module docstring).

    mode: "ste" (forward hard TopK, backward the relaxation's gradient) | "soft" (forward the
      relaxation, annealed towards hard TopK).
    temperature: T at the start of the run, > 0, in PRE-ACTIVATION units of the normalised training
      space (a latent's mask goes from 0.12 to 0.88 over +-2T around the threshold tau). With
      layer_norm inputs a trained TopK SAE's k-th pre-activation is ~1 and the pre-activations' per-token
      std ~0.4, hence the default 0.1.
    final_temperature: T reached at `anneal_end` of the run, > 0 (default 0.01).
    anneal: "exponential" (T0 * (T1/T0)^p, geometric; default) | "linear" (T0 + (T1 - T0) p) | "none"
      (T0 throughout; final_temperature unused), p = min(1, step / (anneal_end * (n_steps - 1))).
    anneal_end: fraction of the run, in (0, 1], at which T reaches final_temperature and then stays
      (default 1.0: the last step trains at final_temperature).
    Raises ValueError naming the option, the bad value and the valid range.
    """

    mode: str = "ste"
    temperature: float = 0.1
    final_temperature: float = 0.01
    anneal: str = "exponential"
    anneal_end: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"sae option mode={self.mode!r}; valid: {', '.join(MODES)}")
        if self.anneal not in ANNEALS:
            raise ValueError(f"sae option anneal={self.anneal!r}; valid: {', '.join(ANNEALS)}")
        self.temperature = _positive_float("temperature", self.temperature)
        self.final_temperature = _positive_float("final_temperature", self.final_temperature)
        e = self.anneal_end
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not 0.0 < float(e) <= 1.0:
            raise ValueError(f"sae option anneal_end={e!r} must be a number in (0, 1]")
        self.anneal_end = float(e)


def annealed_temperature(step: int, n_steps: int, temperature: float, final_temperature: float,
                         anneal: str = "exponential", anneal_end: float = 1.0) -> float:
    """The temperature of 0-based training `step` of `n_steps` (SoftTopKOptions): with
    p = min(1, step / max(anneal_end * (n_steps - 1), 1e-12)) (p = 0 for a one-step run),
    "exponential": T0 * (T1 / T0) ** p, "linear": T0 + (T1 - T0) * p, "none": T0.
    Returns a Python float. ValueError for an unknown anneal."""
    if anneal not in ANNEALS:
        raise ValueError(f"anneal={anneal!r}; valid: {', '.join(ANNEALS)}")
    if anneal == "none" or n_steps <= 1:
        return float(temperature)
    p = min(1.0, max(0.0, step / (anneal_end * (n_steps - 1))))
    if anneal == "exponential":
        return float(temperature * (final_temperature / temperature) ** p)
    return float(temperature + (final_temperature - temperature) * p)


def _work_dtype(t: torch.Tensor) -> torch.Tensor:
    """float32 for half/bfloat16 scores (the solver's sums need the precision), else unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@torch.no_grad()
def soft_topk_threshold(scores: torch.Tensor, k: int, temperature, n_bisect: int = 8,
                        n_newton: int = 8) -> torch.Tensor:
    """The LML threshold tau [...] of scores [..., n]: the root of
    g(tau) = sum_i sigmoid((s_i - tau) / T) - k, per row (Amos et al. 2019, section 3; module docstring).

    Bracket in closed form, from the (k)-th and (k+1)-th largest scores s_(k) >= s_(k+1):
      lo = max(s_(k+1) - T log k, min(s) - T logit(k/n))   (g(lo) >= 0: the top k+1 masks are each
           >= k/(k+1), or every mask is >= k/n),
      hi = min(s_(k) + T log(n-k), max(s) - T logit(k/n))  (g(hi) <= 0: the k-th and lower masks are
           each <= 1/(n-k+1), or every mask is <= k/n),
    so the bracket is about the k-th gap plus a few T wide. `n_bisect` bisection steps on it, then
    `n_newton` safeguarded Newton steps (a step leaving the current bracket is replaced by the
    midpoint; every evaluation shrinks the bracket by the sign of g). Each step is one vectorised
    elementwise pass over [..., n] (dense; no host synchronisation). The defaults reach the float32
    resolution of the mask sum for T from 1e-3 to 10 times the score spread.
    scores: float tensor (half/bfloat16 computed in float32; float64 kept); temperature: float or
    0-d tensor > 0 (same units as the scores). Returns tau in the working dtype (no graph);
    -inf rows when k >= n (every mask 1). ValueError for k < 1 or a non-positive temperature given
    as a Python number.
    """
    if k < 1:
        raise ValueError(f"soft_topk_threshold: k={k} must be >= 1")
    if not torch.is_tensor(temperature) and not float(temperature) > 0:
        raise ValueError(f"soft_topk_threshold: temperature={temperature!r} must be > 0")
    s = _work_dtype(scores.detach())
    n = s.shape[-1]
    if k >= n:
        return torch.full(s.shape[:-1], float("-inf"), dtype=s.dtype, device=s.device)
    T = torch.as_tensor(temperature, dtype=s.dtype, device=s.device)
    c = math.log(k / (n - k))
    top = s.topk(k + 1, dim=-1, sorted=True).values
    lo = torch.maximum(top[..., k] - T * math.log(k), s.amin(-1) - T * c)
    hi = torch.minimum(top[..., k - 1] + T * math.log(n - k), s.amax(-1) - T * c)
    for _ in range(n_bisect):
        mid = 0.5 * (lo + hi)
        over = torch.sigmoid((s - mid.unsqueeze(-1)) / T).sum(-1) > k  # mid below the root
        lo = torch.where(over, mid, lo)
        hi = torch.where(over, hi, mid)
    tau = 0.5 * (lo + hi)
    for _ in range(n_newton):
        m = torch.sigmoid((s - tau.unsqueeze(-1)) / T)
        resid = m.sum(-1) - k  # > 0: tau below the root
        lo = torch.where(resid > 0, tau, lo)
        hi = torch.where(resid > 0, hi, tau)
        slope = (m * (1 - m)).sum(-1) / T  # = -g'(tau)
        new = tau + resid / slope
        ok = (slope > 0) & (new >= lo) & (new <= hi)
        tau = torch.where(resid == 0, tau, torch.where(ok, new, 0.5 * (lo + hi)))
    return tau


def soft_topk_mask(scores: torch.Tensor, k: int, temperature, tau: torch.Tensor | None = None) -> torch.Tensor:
    """Soft top-k mask m [..., n] of scores [..., n]: m_i = sigmoid((s_i - tau) / T), sum_i m_i = k
    per row (LML, Amos et al. 2019, section 3), differentiable in the scores with the exact implicit
    gradient d m_i / d s_j = m_i (1 - m_i) / T (delta_ij - w_j), w_j = m_j(1-m_j) / sum m(1-m)
    (module docstring). tau: a precomputed `soft_topk_threshold` (else computed here).
    Half/bfloat16 scores are computed in float32. Tends to the hard top-k indicator as T -> 0 (no
    tie at the k-th score). All ones when k >= n.
    """
    s = _work_dtype(scores)
    if k >= s.shape[-1]:
        return torch.ones_like(s)
    if tau is None:
        tau = soft_topk_threshold(s, k, temperature)
    T = torch.as_tensor(temperature, dtype=s.dtype, device=s.device)
    tau = tau.detach().to(s.dtype).unsqueeze(-1)
    if not s.requires_grad:
        return torch.sigmoid((s - tau) / T)
    with torch.no_grad():
        m0 = torch.sigmoid((s - tau) / T)
        v = m0 * (1 - m0)
        w = v / v.sum(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    tau_g = tau + (w * (s - s.detach())).sum(-1, keepdim=True)  # value tau, d tau / d s = w
    return torch.sigmoid((s - tau_g) / T)


class SoftTopKSAE(TopKSAE):
    """Soft TopK SAE (`sae=soft_topk`, module docstring): TopK SAE trained through the LML relaxation.

    Args: cfg (SAEConfig; cfg.k = active latents per token; cfg.options -> SoftTopKOptions), device,
      generator (tied init as TopK: W_enc = W_dec^T, Gao et al. 2024 section 2.4.1).
    Buffer (persistent: checkpointed, copied into the EMA model, updated in place):
      temperature float32 []: the current T (set by `set_progress`; `options.temperature` before).
    Inference (`activation`, `encode_sparse`, `forward`) and the export are the hard TopK (cfg.json
    architecture "topk" with k, plus the training fields). Not latent-sharded (`shardable = False`);
    `cfg.kernels` is ignored (dense path); `cfg.multi_topk` is not supported (ValueError).
    """

    architecture = "soft_topk"
    export_architecture = "topk"
    shardable = False
    uses_k = True
    Options = SoftTopKOptions

    def __init__(self, cfg: SAEConfig, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None):
        super().__init__(cfg, device=device, generator=generator)
        self.refuse_multi_topk()
        self.register_buffer("temperature",
                             torch.tensor(self.opts.temperature, dtype=torch.float32, device=device))

    # ------------------------------------------------------------------ schedule
    def temperature_at(self, step: int, n_steps: int) -> float:
        """T of 0-based `step` of `n_steps` under this model's options (`annealed_temperature`)."""
        o = self.opts
        return annealed_temperature(step, n_steps, o.temperature, o.final_temperature, o.anneal, o.anneal_end)

    @torch.no_grad()
    def set_progress(self, step: int, n_steps: int) -> None:
        """Set the `temperature` buffer (in place) to `temperature_at(step, n_steps)`."""
        self.temperature.fill_(self.temperature_at(step, n_steps))

    # ------------------------------------------------------------------ relaxation
    def soft_latents(self, pre: torch.Tensor, temperature=None):
        """(z_soft, m): m = soft_topk_mask(pre, k, T) and z_soft = m * ReLU(pre), both [B, d_sae]
        (float32 at least), differentiable in pre (implicit LML gradient). temperature: default the
        `temperature` buffer."""
        T = self.temperature if temperature is None else temperature
        s = _work_dtype(pre)
        m = soft_topk_mask(s, self.cfg.k, T)
        return m * F.relu(s), m

    def train_latents(self, pre: torch.Tensor, temperature=None):
        """The training latents of pre [B, d_sae] under `opts.mode`: returns (z, z_soft, m, values,
        indices) with z, z_soft, m [B, d_sae] (float32 at least; `soft_latents`) and
          "ste":  z = z_hard.detach() + (z_soft - z_soft.detach())  (value z_hard, gradient of z_soft)
          "soft": z = z_soft.
        values [B, k], indices [B, k] int64: the hard top-k (ReLU'd values, no graph), what the
        exported model keeps; z_hard is their dense scatter.
        """
        z_soft, m = self.soft_latents(pre, temperature)
        with torch.no_grad():
            vals, idx = self.topk_from_pre(pre)
        if self.opts.mode == "soft":
            return z_soft, z_soft, m, vals, idx
        z_hard = torch.zeros_like(z_soft).scatter_(-1, idx, vals.to(z_soft.dtype))
        return z_hard + (z_soft - z_soft.detach()), z_soft, m, vals, idx

    # ------------------------------------------------------------------ training
    def training_step_losses(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> TrainOutput:
        """Losses of one batch x [B, d_in] (normalised): NMSE of x^ = z W_dec + b_dec with z from
        `train_latents` + auxk_coef * AuxK (dense pre-activations of the dead latents reconstruct
        x - x^.detach(); Gao et al. 2024 Appendix A.2). dead_mask: bool [d_sae] or None (no AuxK).

        Returns a TrainOutput with the hard top-k values/indices (dead-latent tracking and train/l0
        count the hard top-k, what the export uses) and terms:
          temperature: T of this step;
          hard_l0: mean number of hard top-k latents > 0 per token (= train/l0);
          soft_l0: mean number of non-zero soft latents z_soft per token (the forward's L0 in "soft");
          soft_mass_outside: mean per token of sum of the masks outside the hard top-k, in [0, k]
            (-> 0 as T -> 0);
          fvu_hard: NMSE of the hard TopK reconstruction (equals fvu in "ste").
        """
        cfg = self.cfg
        pre = self.pre_acts(x)
        z, z_soft, m, vals, idx = self.train_latents(pre)
        x_hat = z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        xf = x.to(x_hat.dtype)
        nmse = normalized_mse(xf, x_hat)
        loss = nmse
        aux = self.auxk_term(pre, dead_mask, xf, x_hat)
        loss = loss + cfg.auxk_coef * aux
        with torch.no_grad():
            B = pre.shape[0]
            zs = z_soft.detach()
            in_top = torch.zeros_like(zs, dtype=torch.bool).scatter_(-1, idx, True)
            m = m.detach()
            if self.opts.mode == "soft":
                fvu_hard = normalized_mse(xf, self.decode_sparse(vals, idx))
            else:
                fvu_hard = nmse.detach()
            terms = {
                "temperature": self.temperature.detach().clone().float(),
                "hard_l0": (vals > 0).sum().float() / B,
                "soft_l0": (zs != 0).sum().float() / B,
                "soft_mass_outside": m.masked_fill(in_top, 0).sum().float() / B,
                "fvu_hard": fvu_hard.float(),
            }
        return TrainOutput(loss, nmse.detach().float(), aux.detach().float(), None, x_hat.detach(),
                           vals.detach(), idx, terms=terms)

    # ------------------------------------------------------------------ export
    def export_cfg(self) -> dict:
        """cfg.json fields: a TopK SAE ("topk", k) plus the training relaxation's settings."""
        o = self.opts
        return {**super().export_cfg(), "training_activation": "soft_topk", "soft_topk_mode": o.mode,
                "temperature": o.temperature, "final_temperature": o.final_temperature,
                "anneal": o.anneal, "anneal_end": o.anneal_end}
