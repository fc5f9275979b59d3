"""Streaming reconstruction metrics for SAEs: FVU / normalized MSE / explained variance / L0, and
latent firing counts.

Definitions (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", sec. 2.1; the eval.json
keys of docs/evaluation.md). Over the N evaluated tokens x_i in R^d with reconstructions x^_i:

    fvu            = sum_i ||x_i - x^_i||^2 / sum_i ||x_i - mu||^2,   mu = (1/N) sum_i x_i
    normalized_mse = MSE(x, x^) / MSE(x, mu)      (the paper's "normalized MSE": the baseline predicts
                                                   the mean activation vector mu of the eval set)
    explained_variance = 1 - fvu
    mse            = sum_i ||x_i - x^_i||^2 / (N d)   (per element, like `torch.nn.MSELoss`)
    l0             = (1/N) sum_i #{j : z_ij != 0}     (mean number of active latents per token)

With a single global mean mu, `normalized_mse` and `fvu` are the same number (the 1/(N d) factors
cancel); both keys are reported because the contract names both. Per-batch variants (e.g. averaging
`mse_b / var_b` over batches, with each batch's own mean, as some libraries log during training) are
NOT the same: each batch's mean is closer to its own tokens than the global mean, so per-batch
denominators are smaller and the averaged ratio is biased upwards for small batches. We accumulate over
the whole eval set in one pass instead:

* the squared error sum is a float64 scalar;
* the denominator sum_i ||x_i - mu||^2 is accumulated per dimension with Chan et al.'s pairwise
  (parallel) update of (count, mean, M2) (Chan, Golub & LeVeque 1979), which is exact up to rounding,
  numerically stable for activations with a large mean (the residual stream often has one), needs a
  single pass, and merges across batches or ranks (`merge`, `all_reduce`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["ReconstructionStats", "LatentFiringCounter", "LatentCodes"]


def _as_2d(name: str, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 2:
        raise ValueError(f"{name} must have shape [B, d], got shape {tuple(t.shape)}; flatten tokens first")
    return t


class ReconstructionStats:
    """One-pass, mergeable accumulator of SAE reconstruction metrics (float64).

    Args:
        d_in: activation width d. If None it is taken from the first `update`.
        device: where the float64 accumulators live (default: the device of the first `update`).

    Use:
        stats = ReconstructionStats()
        for x, x_hat, z in batches:          # x, x_hat: [B, d_in] any float dtype; z: [B, d_sae]
            stats.update(x, x_hat, l0=z)
        stats.result()  # {"fvu", "normalized_mse", "explained_variance", "mse", "mse_per_token", "l0", ...}

    Definitions and the difference from per-batch variants: see the module docstring.
    """

    def __init__(self, d_in: int | None = None, device: str | torch.device | None = None):
        self.d_in = d_in
        self.device = torch.device(device) if device is not None else None
        self.n = 0  # tokens seen
        self.mean: torch.Tensor | None = None  # float64 [d_in]
        self.m2: torch.Tensor | None = None  # float64 [d_in]: sum_i (x_i - mean)^2 per dimension
        self.sum_sq_err = 0.0  # python float (float64): sum_i ||x_i - x^_i||^2
        self.l0_sum = 0.0  # sum over tokens of active-latent counts
        self.l0_n = 0  # tokens for which an l0 was given

    # ------------------------------------------------------------------ accumulation
    def _init(self, d: int, device: torch.device) -> None:
        if self.d_in is None:
            self.d_in = d
        if self.device is None:
            self.device = device
        if self.mean is None:
            self.mean = torch.zeros(self.d_in, dtype=torch.float64, device=self.device)
            self.m2 = torch.zeros(self.d_in, dtype=torch.float64, device=self.device)

    def _combine(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        """Chan et al. pairwise update of (n, mean, M2) with a batch's (n_b, mean_b, M2_b)."""
        if n_b == 0:
            return
        n_a = self.n
        n = n_a + n_b
        delta = mean_b.to(self.device, torch.float64) - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b.to(self.device, torch.float64) + delta.square() * (n_a * n_b / n)
        self.n = n

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, l0: torch.Tensor | None = None) -> None:
        """Add a batch of tokens.

        Args:
            x: activations [B, d_in], any float dtype (raw, i.e. un-normalised, units of the LM).
            x_hat: reconstructions [B, d_in], same units.
            l0: optional. Either per-token active-latent counts [B] (int or float), or the latent
                activations [B, d_sae] (dense; a latent counts as active where its value != 0).

        Raises:
            ValueError: shape mismatch (message names both shapes) or d_in different from earlier
                batches.
        """
        x = _as_2d("x", x)
        x_hat = _as_2d("x_hat", x_hat)
        if x.shape != x_hat.shape:
            raise ValueError(f"x has shape {tuple(x.shape)} but x_hat has shape {tuple(x_hat.shape)}")
        if self.d_in is not None and x.shape[1] != self.d_in:
            raise ValueError(f"x has width {x.shape[1]} but this accumulator has d_in={self.d_in}")
        self._init(x.shape[1], x.device)
        b = x.shape[0]
        if b == 0:
            return
        x64 = x.to(torch.float64)
        err = x64 - x_hat.to(device=x.device, dtype=torch.float64)
        self.sum_sq_err += float(err.square().sum())
        mean_b = x64.mean(0)
        m2_b = (x64 - mean_b).square().sum(0)
        self._combine(b, mean_b, m2_b)
        if l0 is not None:
            if l0.ndim == 1:
                if l0.shape[0] != b:
                    raise ValueError(f"l0 has {l0.shape[0]} entries but the batch has {b} tokens")
                self.l0_sum += float(l0.to(torch.float64).sum())
            elif l0.ndim == 2:
                if l0.shape[0] != b:
                    raise ValueError(f"latent activations have {l0.shape[0]} rows but the batch has {b} tokens")
                self.l0_sum += float((l0 != 0).sum())
            else:
                raise ValueError(
                    f"l0 must be per-token counts [B] or latent activations [B, d_sae], got shape {tuple(l0.shape)}"
                )
            self.l0_n += b

    def merge(self, other: "ReconstructionStats") -> "ReconstructionStats":
        """Fold another accumulator (e.g. another rank's or another shard's) into this one; returns self.

        Raises:
            ValueError: the two accumulators have different d_in.
        """
        if other.n == 0 and other.l0_n == 0:
            return self
        if self.d_in is not None and other.d_in is not None and self.d_in != other.d_in:
            raise ValueError(f"cannot merge accumulators with d_in={self.d_in} and d_in={other.d_in}")
        self._init(other.d_in, other.mean.device if other.mean is not None else torch.device("cpu"))
        self.sum_sq_err += other.sum_sq_err
        self.l0_sum += other.l0_sum
        self.l0_n += other.l0_n
        self._combine(other.n, other.mean, other.m2)
        return self

    # ------------------------------------------------------------------ distributed
    def state_dict(self) -> dict[str, Any]:
        """Plain CPU state (for checkpoints or `torch.distributed.all_gather_object`)."""
        return {
            "d_in": self.d_in,
            "n": self.n,
            "mean": None if self.mean is None else self.mean.cpu(),
            "m2": None if self.m2 is None else self.m2.cpu(),
            "sum_sq_err": self.sum_sq_err,
            "l0_sum": self.l0_sum,
            "l0_n": self.l0_n,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: str | torch.device = "cpu") -> "ReconstructionStats":
        out = cls(state["d_in"], device=device)
        out.n = int(state["n"])
        if state["mean"] is not None:
            out.mean = state["mean"].to(device, torch.float64)
            out.m2 = state["m2"].to(device, torch.float64)
        out.sum_sq_err = float(state["sum_sq_err"])
        out.l0_sum = float(state["l0_sum"])
        out.l0_n = int(state["l0_n"])
        return out

    def all_reduce(self, group=None) -> "ReconstructionStats":
        """Merge the accumulators of every rank of `group` (torch.distributed must be initialised);
        afterwards every rank holds the global statistics. Returns self."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        states: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(states, self.state_dict(), group=group)
        merged = ReconstructionStats(self.d_in, device=self.device or "cpu")
        for s in states:
            merged.merge(ReconstructionStats.from_state_dict(s, device=self.device or "cpu"))
        self.__dict__.update(merged.__dict__)
        return self

    # ------------------------------------------------------------------ result
    @property
    def total_variance(self) -> float:
        """sum_i ||x_i - mu||^2 over all tokens seen (float64)."""
        return 0.0 if self.m2 is None else float(self.m2.sum())

    def result(self) -> dict[str, Any]:
        """Metrics over everything seen so far.

        Returns a dict of plain Python floats/ints: `fvu`, `normalized_mse` (== fvu, see module doc),
        `explained_variance`, `mse` (per element), `mse_per_token` (sum of squares per token),
        `variance_per_token` (sum_i ||x_i - mu||^2 / N), `l0` (None if no l0 was ever given),
        `n_tokens`, `d_in`.

        Raises:
            ValueError: no tokens were added.
        """
        if self.n == 0:
            raise ValueError("ReconstructionStats.result(): no tokens were added; call update() first")
        var = self.total_variance
        fvu = self.sum_sq_err / var if var > 0 else math.nan
        return {
            "fvu": fvu,
            "normalized_mse": fvu,
            "explained_variance": 1.0 - fvu,
            "mse": self.sum_sq_err / (self.n * self.d_in),
            "mse_per_token": self.sum_sq_err / self.n,
            "variance_per_token": var / self.n,
            "l0": (self.l0_sum / self.l0_n) if self.l0_n else None,
            "n_tokens": int(self.n),
            "d_in": int(self.d_in),
        }


class LatentFiringCounter:
    """Counts, per latent, on how many tokens it fired (value != 0); for dead fraction and the
    log-density histogram (Gao et al. 2024 sec. 4 / Bricken et al. 2023 feature-density plots).

    Args:
        d_sae: number of latents n.
        device: where the int64 counter lives.
    """

    def __init__(self, d_sae: int, device: str | torch.device = "cpu"):
        if int(d_sae) <= 0:
            raise ValueError(f"d_sae must be positive, got {d_sae}")
        self.d_sae = int(d_sae)
        self.counts = torch.zeros(self.d_sae, dtype=torch.int64, device=device)
        self.n_tokens = 0

    @torch.no_grad()
    def update_dense(self, z: torch.Tensor) -> None:
        """z: latent activations [B, d_sae] (any dtype); a latent fires where z != 0."""
        if z.ndim != 2 or z.shape[1] != self.d_sae:
            raise ValueError(f"latent activations must have shape [B, {self.d_sae}], got {tuple(z.shape)}")
        self.counts += (z != 0).sum(0).to(self.counts.device, torch.int64)
        self.n_tokens += z.shape[0]

    @torch.no_grad()
    def update_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        """values [B, k] float, indices [B, k] int64 (as from `encode_sparse`); fired where value != 0.
        Indices within a row must be distinct (true for TopK)."""
        if values.shape != indices.shape or values.ndim != 2:
            raise ValueError(
                f"values and indices must both be [B, k]; got {tuple(values.shape)} and {tuple(indices.shape)}"
            )
        idx = indices[values != 0].to(self.counts.device, torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.d_sae):
            raise ValueError(f"latent index out of range [0, {self.d_sae}): min {int(idx.min())}, max {int(idx.max())}")
        self.counts += torch.bincount(idx, minlength=self.d_sae)
        self.n_tokens += values.shape[0]

    def merge(self, other: "LatentFiringCounter") -> "LatentFiringCounter":
        """Add another counter's counts (same d_sae); returns self."""
        if other.d_sae != self.d_sae:
            raise ValueError(f"cannot merge counters with d_sae={self.d_sae} and d_sae={other.d_sae}")
        self.counts += other.counts.to(self.counts.device)
        self.n_tokens += other.n_tokens
        return self

    def all_reduce(self, group=None) -> "LatentFiringCounter":
        """Sum counts and token totals over the ranks of `group` (torch.distributed initialised)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts, group=group)
            n = torch.tensor([self.n_tokens], dtype=torch.int64, device=self.counts.device)
            dist.all_reduce(n, group=group)
            self.n_tokens = int(n.item())
        return self

    def density(self) -> np.ndarray:
        """Firing frequency per latent: counts / n_tokens, float64 [d_sae]."""
        if self.n_tokens == 0:
            raise ValueError("LatentFiringCounter: no tokens counted yet")
        return self.counts.cpu().numpy().astype(np.float64) / self.n_tokens

    def dead_fraction(self) -> float:
        """Fraction of latents that never fired on the counted tokens."""
        return float((self.counts == 0).double().mean())

    def log10_density_histogram(self, bins: int = 50, range_: tuple[float, float] = (-8.0, 0.0)):
        """Histogram of log10(density) over latents that fired at least once.

        Returns (counts int64 [bins], edges float64 [bins + 1], n_dead)."""
        d = self.density()
        alive = d[d > 0]
        hist, edges = np.histogram(np.log10(alive), bins=bins, range=range_)
        return hist, edges, int((d == 0).sum())


class LatentCodes:
    """Accumulates the non-zero latent activations of a stream of tokens in coordinate (COO) form, for
    the per-latent metrics that need the activations themselves (probe loss, Gao et al. 2024 sec. 4.3;
    ablation sparsity, sec. 4.5, which picks the tokens where a latent fires).

    Args:
        d_sae: number of latents n.

    Use:
        codes = LatentCodes(d_sae)
        codes.add_sparse(values, indices)   # TopK: values/indices [B, k]; or codes.add_dense(z [B, d_sae])
        rows, latents, values = codes.tensors()

    `rows` int64 [nnz] are token indices in the order tokens were added (0 .. n_tokens-1), `latents`
    int64 [nnz] latent ids, `values` float32 [nnz] the activations (only entries != 0 are kept), all on
    the CPU. Memory: 20 bytes per non-zero (n_tokens * L0 entries).
    """

    def __init__(self, d_sae: int):
        if int(d_sae) <= 0:
            raise ValueError(f"d_sae must be positive, got {d_sae}")
        self.d_sae = int(d_sae)
        self.n_tokens = 0
        self._rows: list[torch.Tensor] = []
        self._lat: list[torch.Tensor] = []
        self._val: list[torch.Tensor] = []

    @torch.no_grad()
    def add_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        """values [B, k] float, indices [B, k] int64 (as from `encode_sparse`); entries with value 0 are
        dropped. ValueError on a shape mismatch or an index outside [0, d_sae)."""
        if values.shape != indices.shape or values.ndim != 2:
            raise ValueError(
                f"values and indices must both be [B, k]; got {tuple(values.shape)} and {tuple(indices.shape)}"
            )
        b, k = values.shape
        nz = values != 0
        rows = (torch.arange(b, device=values.device).unsqueeze(1).expand(b, k))[nz] + self.n_tokens
        lat = indices[nz].to(torch.int64)
        if lat.numel() and (int(lat.min()) < 0 or int(lat.max()) >= self.d_sae):
            raise ValueError(f"latent index out of range [0, {self.d_sae}): min {int(lat.min())}, max {int(lat.max())}")
        self._rows.append(rows.cpu())
        self._lat.append(lat.cpu())
        self._val.append(values[nz].float().cpu())
        self.n_tokens += b

    @torch.no_grad()
    def add_dense(self, z: torch.Tensor) -> None:
        """z: latent activations [B, d_sae]; entries != 0 are kept."""
        if z.ndim != 2 or z.shape[1] != self.d_sae:
            raise ValueError(f"latent activations must have shape [B, {self.d_sae}], got {tuple(z.shape)}")
        r, c = (z != 0).nonzero(as_tuple=True)
        self._rows.append((r + self.n_tokens).cpu())
        self._lat.append(c.cpu())
        self._val.append(z[r, c].float().cpu())
        self.n_tokens += z.shape[0]

    @classmethod
    def from_dense(cls, z: torch.Tensor) -> "LatentCodes":
        """Codes of a dense activation matrix z [N, d_sae]."""
        out = cls(z.shape[1])
        out.add_dense(z)
        return out

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows int64 [nnz], latents int64 [nnz], values float32 [nnz]) on the CPU."""
        if not self._rows:
            e = torch.zeros(0, dtype=torch.int64)
            return e, e.clone(), torch.zeros(0, dtype=torch.float32)
        if len(self._rows) > 1:  # consolidate once
            self._rows = [torch.cat(self._rows)]
            self._lat = [torch.cat(self._lat)]
            self._val = [torch.cat(self._val)]
        return self._rows[0], self._lat[0], self._val[0]

    def to_dense(self) -> torch.Tensor:
        """Dense float32 [n_tokens, d_sae] (for small cases and tests)."""
        rows, lat, val = self.tensors()
        z = torch.zeros(self.n_tokens, self.d_sae, dtype=torch.float32)
        z[rows, lat] = val
        return z
