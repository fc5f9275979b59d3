"""Synthetic ground truth for SAE architectures: activations built from a known dictionary, and how
well a trained SAE recovers it.

Data model (the standard toy setting of sparse dictionary learning, e.g. Sharkey et al. 2022,
"Taking features out of superposition with sparse autoencoders"; Cunningham et al. 2023, section 2):
    x = sum_i c_i f_i + noise,   f_i unit vectors in R^d (the dictionary, n_features of them),
with each coefficient c_i non-zero independently with probability `p_active`, its magnitude uniform
in [min_coef, max_coef], and isotropic Gaussian noise of std `noise` per dimension.

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
      d: activation width d_in. n_features: dictionary size. p_active: probability that a feature
      is on in a sample (expected L0 of the data = n_features * p_active). min_coef, max_coef: range
      of the magnitudes of active coefficients. noise: std of the additive Gaussian noise. seed: RNG.
    Attributes: features [n_features, d] float32 unit rows.
    Raises ValueError on non-positive sizes or a probability outside (0, 1].
    """

    def __init__(self, d: int, n_features: int, *, p_active: float = 0.02, min_coef: float = 0.5,
                 max_coef: float = 2.0, noise: float = 0.01, seed: int = 0):
        if d < 1 or n_features < 1:
            raise ValueError(f"d={d} and n_features={n_features} must be >= 1")
        if not 0 < p_active <= 1:
            raise ValueError(f"p_active={p_active} must be in (0, 1]")
        if not 0 <= min_coef <= max_coef:
            raise ValueError(f"need 0 <= min_coef={min_coef} <= max_coef={max_coef}")
        self.d, self.n_features = d, n_features
        self.p_active, self.min_coef, self.max_coef, self.noise = p_active, min_coef, max_coef, noise
        self.gen = torch.Generator().manual_seed(seed)
        f = torch.randn(n_features, d, generator=self.gen)
        self.features = f / f.norm(dim=-1, keepdim=True)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [n, d] float32, coefficients [n, n_features] float32) of n fresh samples."""
        on = torch.rand(n, self.n_features, generator=self.gen) < self.p_active
        mag = self.min_coef + (self.max_coef - self.min_coef) * torch.rand(n, self.n_features, generator=self.gen)
        coef = on * mag
        x = coef @ self.features + self.noise * torch.randn(n, self.d, generator=self.gen)
        return x, coef


@torch.no_grad()
def mean_max_cosine(features: torch.Tensor, W_dec: torch.Tensor) -> float:
    """Mean over true features [n_f, d] of the max cosine similarity to any decoder row of
    W_dec [n_latents, d] (rows need not be normalised). Returns a float in [-1, 1]."""
    f = features.float() / features.float().norm(dim=-1, keepdim=True)
    w = W_dec.float() / W_dec.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return float((f @ w.T).max(dim=1).values.mean())
