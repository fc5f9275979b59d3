"""Synthetic ground truth for SAE architectures: activations built from a known dictionary, and how
well a trained SAE recovers it.

Data model (the standard toy setting of sparse dictionary learning, e.g. Sharkey et al. 2022,
"Taking features out of superposition with sparse autoencoders"; Cunningham et al. 2023, section 2):
    x = sum_i c_i f_i + noise,   f_i unit vectors in R^d (the dictionary, n_features of them),
with each coefficient c_i non-zero independently with probability `p_active`, its magnitude uniform
in [min_coef, max_coef], and isotropic Gaussian noise of std `noise` per dimension.

Two optional departures make the toy closer to LM features (both off by default; the defaults draw
exactly the same numbers as before they existed):
- `freq_exponent` a > 0: Zipf-like feature frequencies p_i proportional to (i + 1)^-a, scaled so their
  mean stays `p_active` (the expected L0 stays n_features * p_active): a few common features and a
  long tail of rare ones, as in the heavy-tailed firing frequencies of SAE latents on LMs;
- `magnitudes="lognormal"`: active magnitudes exp(N(log_mean, log_std^2)) instead of uniform ones: a
  heavy tail of small and large coefficients, the case where an L1 penalty's shrinkage matters most.

Recovery metric: the mean max cosine similarity (MMCS) of the true features to the SAE's decoder
directions, mean_i max_j cos(f_i, W_dec[j]) (Sharkey et al. 2022): 1 when every true feature has a
decoder row pointing exactly along it.
"""

from __future__ import annotations

import torch

__all__ = ["SyntheticDictionary", "mean_max_cosine"]


class SyntheticDictionary:
    """A random dictionary of unit features and a sampler of sparse combinations of them.

    Args:
      d: activation width d_in. n_features: dictionary size. p_active: mean probability that a feature
      is on in a sample (expected L0 of the data = n_features * p_active). min_coef, max_coef: range
      of the magnitudes of active coefficients (magnitudes="uniform"). noise: std of the additive
      Gaussian noise. seed: RNG.
      freq_exponent: a >= 0; feature i is on with probability p_i = p_active * n_features * (i + 1)^-a /
        sum_j (j + 1)^-a (Zipf-like; 0, the default: p_i = p_active for all i).
      magnitudes: "uniform" (default, U[min_coef, max_coef]) or "lognormal" (exp(N(log_mean, log_std^2)),
        min_coef / max_coef unused).
    Attributes: features [n_features, d] float32 unit rows; probs [n_features] float32 (p_i).
    Raises ValueError on non-positive sizes, a probability outside (0, 1] (also any p_i > 1), bad
    magnitude ranges, an unknown `magnitudes`, a negative freq_exponent or log_std.
    """

    def __init__(self, d: int, n_features: int, *, p_active: float = 0.02, min_coef: float = 0.5,
                 max_coef: float = 2.0, noise: float = 0.01, seed: int = 0, freq_exponent: float = 0.0,
                 magnitudes: str = "uniform", log_mean: float = 0.0, log_std: float = 0.5):
        if d < 1 or n_features < 1:
            raise ValueError(f"d={d} and n_features={n_features} must be >= 1")
        if not 0 < p_active <= 1:
            raise ValueError(f"p_active={p_active} must be in (0, 1]")
        if not 0 <= min_coef <= max_coef:
            raise ValueError(f"need 0 <= min_coef={min_coef} <= max_coef={max_coef}")
        if not freq_exponent >= 0:
            raise ValueError(f"freq_exponent={freq_exponent} must be >= 0")
        if magnitudes not in ("uniform", "lognormal"):
            raise ValueError(f"magnitudes={magnitudes!r}; valid: uniform, lognormal")
        if not log_std >= 0:
            raise ValueError(f"log_std={log_std} must be >= 0")
        self.d, self.n_features = d, n_features
        self.p_active, self.min_coef, self.max_coef, self.noise = p_active, min_coef, max_coef, noise
        self.freq_exponent, self.magnitudes = float(freq_exponent), magnitudes
        self.log_mean, self.log_std = float(log_mean), float(log_std)
        w = torch.arange(1, n_features + 1, dtype=torch.float64).pow(-self.freq_exponent)
        probs = p_active * n_features * w / w.sum()
        if float(probs.max()) > 1.0 + 1e-9:
            raise ValueError(f"freq_exponent={freq_exponent} with p_active={p_active}: the most frequent "
                             f"feature would have probability {float(probs.max()):.3f} > 1; lower either")
        self.probs = probs.float()
        self.gen = torch.Generator().manual_seed(seed)
        f = torch.randn(n_features, d, generator=self.gen)
        self.features = f / f.norm(dim=-1, keepdim=True)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [n, d] float32, coefficients [n, n_features] float32, >= 0) of n fresh samples."""
        p = self.p_active if self.freq_exponent == 0 else self.probs
        on = torch.rand(n, self.n_features, generator=self.gen) < p
        if self.magnitudes == "lognormal":
            z = torch.randn(n, self.n_features, generator=self.gen)
            mag = (self.log_mean + self.log_std * z).exp()
        else:
            u = torch.rand(n, self.n_features, generator=self.gen)
            mag = self.min_coef + (self.max_coef - self.min_coef) * u
        coef = on * mag
        x = coef @ self.features + self.noise * torch.randn(n, self.d, generator=self.gen)
        return x, coef


@torch.no_grad()
def mean_max_cosine(features: torch.Tensor, W_dec: torch.Tensor) -> float:
    """Mean over true features [n_f, d] of the max cosine similarity to any decoder row of
    W_dec [d_sae, d] (rows need not be normalised). Returns a float in [-1, 1]."""
    f = features.float() / features.float().norm(dim=-1, keepdim=True)
    w = W_dec.float() / W_dec.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return float((f @ w.T).max(dim=1).values.mean())
