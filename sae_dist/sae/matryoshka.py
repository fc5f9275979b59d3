"""Matryoshka sparse autoencoder (Bussmann, Nabeshima, Karvonen, Nanda 2025, "Learning Multi-Level
Features with Matryoshka Sparse Autoencoders", arXiv:2503.17547, section 3; Nabeshima 2024,
"Matryoshka Sparse Autoencoders", AI Alignment Forum).

The latents are ordered and nested: prefixes m_1 < m_2 < ... < m_L = d_sae. One encoder pass and
one selection (TopK per token, or BatchTopK over the batch: option `base`) give the kept latents z;
every prefix must reconstruct the input on its own from ITS latents of that same selection:

    x^_l = sum_{j < m_l} z_j W_dec[j] + b_dec,      L = sum_l w_l * NMSE(x, x^_l)  (+ auxk_coef * AuxK)

(paper section 3, eq. 2: the sum over the nested dictionaries of their reconstruction losses; the
normalised MSE of Gao et al. 2024 section 2.2 per level). The early latents are thus pushed to carry
the most frequent / general features, and the later ones refine them (the paper's remedy for feature
absorption). AuxK (Gao et al. 2024 section 2.4.1) reconstructs the residual of the FULL reconstruction
x^_L, as the authors' code does.

Cost: the prefix reconstructions are one sparse decode. Each kept entry (token b, latent j) lies in
exactly one band [m_{l-1}, m_l); decoding the entries into L x B bags (band, token) gives the band
contributions D_l [B, d_in], and x^_l = b_dec + D_1 + ... + D_l is a cumulative sum over the bands
(x^_l = x^_{l-1} + D_l). So the work is that of one decode of the kept entries (k*B rows of W_dec)
plus L x B x d_in additions, never a dense [B, d_sae] decode per level.

Inference and export follow the base: "topk" -> TopK per token (cfg.json "topk", k); "batchtopk" ->
the estimated global threshold (cfg.json "jumprelu" with `threshold`, `sae_dist.sae.batchtopk`).
cfg.json records `matryoshka_prefixes`, `matryoshka_level_weights` and `matryoshka_base`; a user
keeps the first m_l latents (rows of W_dec, columns of W_enc, entries of b_enc / threshold) for a
smaller SAE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import torch

from sae_dist.sae.batchtopk import BatchTopKOptions, BatchTopKSAE, decode_entries
from sae_dist.sae.config import SAEConfig
from sae_dist.sae.topk import TopKSAE

__all__ = ["MatryoshkaSAE", "MatryoshkaOptions", "default_prefixes", "check_prefixes", "BASES"]

BASES = ("topk", "batchtopk")


@dataclass
class MatryoshkaOptions(BatchTopKOptions):
    """Options of `sae=matryoshka`.

    base: "batchtopk" (default, the paper's choice) or "topk": the selection of the kept latents.
    prefixes: list of ints m_1 < ... < m_L = d_sae (each >= 1), or None: `default_prefixes`
      (n/16, n/8, n/4, n/2, n: the paper's group sizes n/16, n/16, n/8, n/4, n/2).
    level_weights: list of L non-negative numbers (sum > 0), or None: uniform. Always normalised to
      sum 1, so the loss is a weighted MEAN of the level NMSEs, on the scale of one NMSE (the learning
      rate and the AuxK coefficient keep their meaning).
    threshold_beta, threshold_start_step: the BatchTopK threshold estimate (`BatchTopKOptions`);
      unused with base "topk".
    Raises ValueError naming the option, the bad value and the valid range (prefixes against
    d_sae are checked by `MatryoshkaSAE`).
    """

    base: str = "batchtopk"
    prefixes: list | None = None
    level_weights: list | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.base not in BASES:
            raise ValueError(f"sae option base={self.base!r}; valid: {', '.join(BASES)}")
        # lists are checked against d_sae by MatryoshkaSAE (check_prefixes, _check_weights)


def default_prefixes(d_sae: int) -> list[int]:
    """The default ladder [n/16, n/8, n/4, n/2, n] (integer division; zeros and repeats dropped)."""
    return sorted({m for m in (d_sae // 16, d_sae // 8, d_sae // 4, d_sae // 2, d_sae)
                   if m >= 1})


def check_prefixes(prefixes, d_sae: int) -> list[int]:
    """Validate prefixes: a non-empty list of ints, strictly increasing, first >= 1, last ==
    d_sae. Returns them as a list of int; ValueError naming the option, value and valid range."""
    if isinstance(prefixes, (str, bytes)) or not hasattr(prefixes, "__iter__"):
        raise ValueError(f"sae option prefixes={prefixes!r} must be a list of ints (or null for the default)")
    p = list(prefixes)
    if not p:
        raise ValueError(f"sae option prefixes={prefixes!r} must not be empty (last entry = d_sae={d_sae})")
    for m in p:
        if isinstance(m, bool) or not isinstance(m, int):
            raise ValueError(f"sae option prefixes={p!r}: entry {m!r} is not an int")
    if p[0] < 1:
        raise ValueError(f"sae option prefixes={p!r}: entries must be >= 1 (got {p[0]})")
    for a, b in pairwise(p):
        if b <= a:
            raise ValueError(f"sae option prefixes={p!r} must be strictly increasing ({a} then {b})")
    if p[-1] != d_sae:
        raise ValueError(
            f"sae option prefixes={p!r}: the last prefix must equal d_sae={d_sae} (got {p[-1]}); "
            f"valid: strictly increasing ints in [1, {d_sae}] ending with {d_sae}"
        )
    return p


def _check_weights(weights, n_levels: int) -> list[float]:
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__iter__"):
        raise ValueError(f"sae option level_weights={weights!r} must be a list of numbers (or null: uniform)")
    w = list(weights)
    if len(w) != n_levels:
        raise ValueError(
            f"sae option level_weights={w!r} has {len(w)} entries; it needs one per prefix ({n_levels})"
        )
    for v in w:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"sae option level_weights={w!r}: entry {v!r} must be a finite number >= 0")
    total = float(sum(w))
    if total <= 0:
        raise ValueError(f"sae option level_weights={w!r} must have a positive sum")
    return [float(v) / total for v in w]


class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka SAE (`sae=matryoshka`, module docstring). One class over both selections: it
    reuses `TopKSAE` (base "topk": per-token selection, inference, export "topk") or `BatchTopKSAE`
    (base "batchtopk": batch selection, threshold buffer, export "jumprelu"); only the nested
    reconstruction loss is its own.

    Args: cfg (SAEConfig; cfg.k = active latents per token, on average for "batchtopk";
      cfg.options -> MatryoshkaOptions), device, generator (tied init).
    Attributes: prefixes (list[int]), level_weights (list[float], sum 1).
    The threshold buffers exist for both bases (unused with "topk"). Not latent-sharded; cfg.kernels
    ignored; cfg.multi_topk unsupported (ValueError). ValueError for bad options.
    """

    architecture = "matryoshka"
    export_architecture = "jumprelu"  # base "batchtopk"; `export_cfg` says "topk" for base "topk"
    shardable = False
    uses_k = True
    Options = MatryoshkaOptions

    def __init__(self, cfg: SAEConfig, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None):
        super().__init__(cfg, device=device, generator=generator)
        o = self.opts
        self.prefixes = (default_prefixes(cfg.d_sae) if o.prefixes is None
                         else check_prefixes(o.prefixes, cfg.d_sae))
        n_levels = len(self.prefixes)
        self.level_weights = ([1.0 / n_levels] * n_levels if o.level_weights is None
                              else _check_weights(o.level_weights, n_levels))
        # band boundaries m_1..m_{L-1}: latent j is in band l when m_{l-1} <= j < m_l
        self.register_buffer("_bounds", torch.tensor(self.prefixes[:-1], dtype=torch.int64, device=device),
                             persistent=False)

    @property
    def base(self) -> str:
        return self.opts.base

    def uses_threshold(self) -> bool:
        return self.base == "batchtopk"

    # ------------------------------------------------------------------ selection / inference
    def select_entries(self, pre: torch.Tensor):
        """Kept entries of pre [B, d_sae] -> (rows, cols, values) [k*B]: BatchTopK (base
        "batchtopk") or TopK per token then ReLU (base "topk", `TopKSAE.topk_from_pre`)."""
        if self.base == "batchtopk":
            return super().select_entries(pre)
        vals, idx = self.topk_from_pre(pre)
        B, k = idx.shape
        rows = torch.arange(B, device=pre.device).repeat_interleave(k)
        return rows, idx.reshape(-1), vals.reshape(-1)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """pre [B, d_sae] -> z: TopK per token (base "topk") or ReLU(pre) * 1[pre > theta]."""
        if self.base == "topk":
            return TopKSAE.activation(self, pre)
        return super().activation(pre)

    def encode_sparse(self, x: torch.Tensor, k: int | None = None):
        """(values, indices) of the inference latents: [B, k] for base "topk" (`TopKSAE`), padded
        [B, m] with index -1 for base "batchtopk" (`BatchTopKSAE.encode_sparse`)."""
        if self.base == "topk":
            return TopKSAE.encode_sparse(self, x, k)
        return super().encode_sparse(x, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, d_in] -> x_hat [B, d_in] with all latents and the base's inference rule."""
        if self.base == "topk":
            return TopKSAE.forward(self, x)
        return super().forward(x)

    # ------------------------------------------------------------------ nested loss
    def band_decodes(self, rows, cols, values, n_rows: int) -> torch.Tensor:
        """D_l for every band: [L, B, d_in] in W_dec's dtype, D_l[b] = sum of the kept entries of token
        b with latent in [m_{l-1}, m_l) (one sparse decode into (band, token) bags; no b_dec).
        x^_l = b_dec + D_1 + ... + D_l. rows, cols int64 [E], values [E]."""
        band = torch.bucketize(cols, self._bounds, right=True)
        L = len(self.prefixes)
        parts = decode_entries(band * n_rows + rows, cols, values, self.W_dec, L * n_rows)
        return parts.view(L, n_rows, -1)

    def reconstruction_losses(self, x: torch.Tensor, rows, cols, values):
        """(x^_L, sum_l w_l NMSE(x, x^_l), NMSE(x, x^_L), {"nmse_level{l}": NMSE of level l < L-1}).
        x^_l = x^_{l-1} + D_l (`band_decodes`), x^_0 = b_dec; NMSE as `sae_dist.sae.base.normalized_mse`
        (float32 sums, one denominator for all levels)."""
        parts = self.band_decodes(rows, cols, values, x.shape[0])
        xf = x.float()
        den = (xf - xf.mean(0, keepdim=True)).pow(2).sum(-1).mean()
        x_hat, loss, nmses = self.b_dec, 0.0, []
        for level, w in enumerate(self.level_weights):
            x_hat = x_hat + parts[level]
            nmses.append((xf - x_hat.float()).pow(2).sum(-1).mean() / den)
            loss = loss + w * nmses[-1]
        terms = {f"nmse_level{i}": v for i, v in enumerate(nmses[:-1])}
        return x_hat, loss, nmses[-1], terms

    # ------------------------------------------------------------------ export
    def export_extras(self) -> dict[str, torch.Tensor]:
        """{"threshold": theta * ones(d_sae)} for base "batchtopk"; nothing for "topk"."""
        return super().export_extras() if self.base == "batchtopk" else {}

    def export_cfg(self) -> dict:
        """cfg.json fields: the base's ("jumprelu" + threshold estimate, or "topk" with k) plus
        matryoshka_prefixes, matryoshka_level_weights (normalised) and matryoshka_base."""
        if self.base == "batchtopk":
            out = super().export_cfg()
        else:
            k = int(self.cfg.k)
            out = {"architecture": "topk", "k": k, "activation_fn": "topk", "activation_fn_kwargs": {"k": k}}
        out.update(matryoshka_prefixes=list(self.prefixes), matryoshka_level_weights=list(self.level_weights),
                   matryoshka_base=self.base)
        return out
