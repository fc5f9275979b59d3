"""BatchTopK sparse autoencoder (Bussmann, Leask, Nanda 2024, "BatchTopK Sparse Autoencoders",
arXiv:2412.06410).

Training (paper section 3, eq. 3-4): the TopK of Gao et al. 2024 taken over the WHOLE batch instead of
per token. With pre = (x - b_dec) W_enc + b_enc [B, d_sae],

    z = BatchTopK_{k*B}(ReLU(pre))   keep the k*B largest entries of the flattened [B * d_sae] matrix

so the mean L0 over the batch is exactly k (fewer only when fewer than k*B pre-activations are
positive) while single tokens may use more or fewer latents. x^ = z W_dec + b_dec; the loss is the
normalised MSE plus AuxK against dead latents (Gao et al. 2024 section 2.4.1; the paper's code adds
the same auxiliary loss).

Inference (paper section 3, "BatchTopK at inference"): batch selection makes a token's code depend
on the other tokens of its batch, so the model is used with a single global threshold theta,

    z = ReLU(pre) * 1[pre > theta]     (a JumpReLU with the same threshold for every latent)

where theta estimates E_batch[min{kept positive activation}] (the paper: the average over batches of
the smallest positive activation the batch selection keeps). Here theta is a persistent buffer
updated in place during training with a bias-corrected exponential moving average of the per-batch
minimum (`threshold_beta`; 1.0 is the plain running mean of the paper's text, 0.99 the momentum of
the authors' code, whose zero-initialised average this corrects for its start-up bias). The export
is therefore a JumpReLU SAE (cfg.json "jumprelu", `threshold` = theta for every latent), which
SAELens loads as such.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sae_dist.sae.base import TrainOutput, count_fires, normalized_mse
from sae_dist.sae.config import SAEConfig
from sae_dist.sae.topk import TopKSAE

__all__ = ["BatchTopKSAE", "BatchTopKOptions", "batch_topk", "decode_entries"]


@dataclass
class BatchTopKOptions:
    """Options of `sae=batchtopk` (the threshold estimate of paper section 3).

    threshold_beta: momentum of the bias-corrected EMA of the per-batch minimum kept positive
      activation, in [0, 1]. 1.0: plain running mean over all estimating batches (the paper's
      "average"); 0.99 (default): the momentum of the authors' code (an effective window of ~100
      batches, forgetting the estimates of the untrained early model); 0: the last batch only.
    threshold_start_step: first training step whose batch enters the estimate (>= 0). The effective
      start is min(threshold_start_step, n_steps // 2), so every run ends with an estimate.
    Raises ValueError naming the option, the bad value and the valid range.
    """

    threshold_beta: float = 0.99
    threshold_start_step: int = 0

    def __post_init__(self) -> None:
        b = self.threshold_beta
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= float(b) <= 1.0:
            raise ValueError(f"sae option threshold_beta={b!r} must be a number in [0, 1]")
        self.threshold_beta = float(b)
        s = self.threshold_start_step
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"sae option threshold_start_step={s!r} must be an int >= 0")


def batch_topk(pre: torch.Tensor, k: int):
    """BatchTopK selection (Bussmann et al. 2024, section 3): the k*B largest entries of pre [B, d_sae]
    over the whole batch, ReLU applied to the kept values.

    Returns (rows, cols, values), each [k*B] (capped at B*d_sae): int64 token index, int64 latent
    index and the ReLU'd values (pre's dtype, differentiable; zeros where fewer than k*B entries are
    positive). Order unspecified. ValueError for a non-2-D pre or k < 1.
    """
    if pre.dim() != 2:
        raise ValueError(f"batch_topk needs pre-activations [B, d_sae], got shape {tuple(pre.shape)}")
    if k < 1:
        raise ValueError(f"batch_topk: k={k} must be >= 1")
    B, n = pre.shape
    vals, flat = pre.reshape(-1).topk(min(k * B, B * n), sorted=False)
    return flat // n, flat % n, F.relu(vals)


def decode_entries(bags: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor,
                   n_bags: int) -> torch.Tensor:
    """Sparse decode of a variable number of latents per output row:
    out[b] = sum over entries e with bags[e] == b of values[e] * W_dec[cols[e]] (no bias).

    bags, cols int64 [E] (bags in [0, n_bags), cols in [0, d_sae)); values [E] float (cast to W_dec's
    dtype); W_dec [d_sae, d_in]. Returns [n_bags, d_in] in W_dec's dtype, zero rows for empty bags;
    differentiable in values and W_dec. One F.embedding_bag (mode "sum") over the entries sorted by
    bag: cost E * d_in, never a dense [n_bags, d_sae] matrix (the sparse decoder of Gao et al. 2024
    section 5.1, with per-row counts that vary as BatchTopK's do).
    """
    order = torch.argsort(bags)
    counts = torch.bincount(bags, minlength=n_bags)
    offsets = counts.cumsum(0) - counts
    return F.embedding_bag(cols[order], W_dec, offsets, mode="sum",
                           per_sample_weights=values[order].to(W_dec.dtype))


class BatchTopKSAE(TopKSAE):
    """BatchTopK SAE (`sae=batchtopk`, module docstring; Bussmann et al. 2024).

    Args: cfg (SAEConfig; cfg.k = mean active latents per token; cfg.options -> BatchTopKOptions),
      device, generator (tied init as TopK: W_enc = W_dec^T, Gao et al. 2024 section 2.4.1).
    Buffers (persistent: checkpointed, copied into the EMA model, updated in place):
      threshold float32 [] theta in activation units of the training (normalised) space; 0 until
        the first estimating batch (inference is then a plain ReLU).
      threshold_batches int64 []: number of batches folded into the estimate.
    Not latent-sharded (`shardable = False`: the batch selection needs every latent's
    pre-activations). `cfg.kernels` is ignored (plain torch path, dense [B, d_sae] pre-activations,
    sparse decode); `cfg.multi_topk` is not supported (ValueError).
    """

    architecture = "batchtopk"
    export_architecture = "jumprelu"
    shardable = False
    uses_k = True
    Options = BatchTopKOptions

    def __init__(self, cfg: SAEConfig, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None):
        super().__init__(cfg, device=device, generator=generator)
        self.refuse_multi_topk()
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32, device=device))
        self.register_buffer("threshold_batches", torch.zeros((), dtype=torch.int64, device=device))
        self._step, self._n_steps = 0, None

    # ------------------------------------------------------------------ schedule
    def set_progress(self, step: int, n_steps: int) -> None:
        """Record the trainer's step (the threshold estimate starts at `threshold_start_step`)."""
        self._step, self._n_steps = int(step), int(n_steps)

    def threshold_start(self) -> int:
        """First estimating step: min(threshold_start_step, n_steps // 2) (n_steps from
        `set_progress`; threshold_start_step when it was never called)."""
        s = self.opts.threshold_start_step
        return s if self._n_steps is None else min(s, self._n_steps // 2)

    def estimates_threshold(self) -> bool:
        """Whether this training step folds its batch minimum into theta."""
        return self._step >= self.threshold_start()

    @torch.no_grad()
    def update_threshold_(self, values: torch.Tensor) -> None:
        """Fold a batch into theta (in place): m = min of the kept values > 0 (values: any shape, the
        batch selection's ReLU'd values), averaged over the dp group when attached; with n the new
        count of estimating batches and beta = threshold_beta,
            theta <- theta + w_n (m - theta),  w_n = (1 - beta) / (1 - beta^n)  (1/n when beta = 1),
        i.e. theta_n = EMA_n / (1 - beta^n), the bias-corrected EMA of the batch minima (Adam-style
        correction, so the zero start does not bias theta). A batch (all dp ranks) without any
        positive kept value leaves theta and the count unchanged. No host synchronisation.
        """
        v = values.detach().float()
        m = v.masked_fill(v <= 0, float("inf")).min()
        has = torch.isfinite(m)
        stats = torch.stack([torch.where(has, m, torch.zeros_like(m)).double(), has.double()])
        self.comm.sum_over_dp_(stats)
        has_any = stats[1] > 0
        batch_min = stats[0] / stats[1].clamp_min(1.0)
        count = self.threshold_batches + has_any.long()
        n = count.double().clamp_min(1.0)
        beta = self.opts.threshold_beta
        w = 1.0 / n if beta == 1.0 else (1.0 - beta) / (1.0 - torch.pow(torch.full_like(n, beta), n))
        w = torch.where(has_any, w, torch.zeros_like(w))
        theta = self.threshold.double()
        self.threshold.copy_((theta + w * (batch_min - theta)).float())
        self.threshold_batches.copy_(count)

    # ------------------------------------------------------------------ inference
    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """Inference rule (paper section 3): pre [B, d_sae] -> z = ReLU(pre) * 1[pre > theta]."""
        return F.relu(pre) * (pre > self.threshold)

    def encode_sparse(self, x: torch.Tensor, k: int | None = None):
        """x [B, d_in] -> the inference latents (`activation`) in sparse form (values [B, m] float,
        indices [B, m] int64), m = the largest count of active latents in a row, rows padded with
        value 0 and index -1 (which `decode_sparse` skips). `k` is ignored (the threshold decides)."""
        z = self.encode(x)
        m = max(int((z > 0).sum(1).max()) if z.numel() else 0, 1)
        vals, idx = z.topk(min(m, z.shape[-1]), dim=-1)
        return vals, idx.masked_fill(vals <= 0, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, d_in] -> x_hat [B, d_in] with the inference rule (threshold)."""
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------ training
    def select_entries(self, pre: torch.Tensor):
        """The training selection of pre [B, d_sae]: `batch_topk(pre, k)` -> (rows, cols, values) [k*B]."""
        return batch_topk(pre, self.cfg.k)

    def reconstruction_losses(self, x: torch.Tensor, rows, cols, values):
        """(x_hat [B, d_in], reconstruction loss, NMSE of x_hat, extra terms) from the kept entries.
        BatchTopK: x^ = decode_entries(...) + b_dec, loss = NMSE (Gao et al. 2024 section 2.2)."""
        x_hat = decode_entries(rows, cols, values, self.W_dec, x.shape[0]) + self.b_dec
        nmse = normalized_mse(x, x_hat)
        return x_hat, nmse, nmse, {}

    def training_step_losses(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> TrainOutput:
        """Losses of one batch x [B, d_in] (normalised): reconstruction loss of the batch selection
        (`reconstruction_losses`) + auxk_coef * AuxK (dense pre-activations of the dead latents
        reconstruct the residual x - x^.detach(); Gao et al. 2024 Appendix A.2), and, from
        `threshold_start()` on, the threshold update (`update_threshold_`).
        dead_mask: bool [d_sae] or None (no AuxK). Returns a TrainOutput with fire_counts (int64 [d_sae]),
        l0_sum (non-zero kept values), values/indices None and terms (e.g. "threshold").
        """
        cfg = self.cfg
        pre = self.pre_acts(x)
        rows, cols, vals = self.select_entries(pre)
        xf = x.to(self.W_dec.dtype)
        x_hat, loss, nmse, terms = self.reconstruction_losses(xf, rows, cols, vals)
        aux = self.auxk_term(pre, dead_mask, xf, x_hat)
        loss = loss + cfg.auxk_coef * aux
        if self.uses_threshold() and self.training and self.estimates_threshold():
            self.update_threshold_(vals)
        with torch.no_grad():
            fire_counts = count_fires(vals, cols, self.d_sae)
            l0_sum = (vals.detach() > 0).sum().to(torch.float64)
        terms = {n: t.detach().float() for n, t in terms.items()}
        if self.uses_threshold():
            terms["threshold"] = self.threshold.detach().clone()
        return TrainOutput(loss, nmse.detach().float(), aux.detach().float(), None, x_hat.detach(),
                           fire_counts=fire_counts, l0_sum=l0_sum, terms=terms)

    def uses_threshold(self) -> bool:
        """Whether inference (and the export) uses the estimated threshold (True for BatchTopK)."""
        return True

    # ------------------------------------------------------------------ export
    def export_extras(self) -> dict[str, torch.Tensor]:
        """{"threshold": theta * ones(d_sae)} (activation units; the export folds the normalisation)."""
        return {"threshold": self.threshold.detach().float() * torch.ones(self.d_sae, device=self.threshold.device)}

    def export_cfg(self) -> dict:
        """cfg.json fields: a JumpReLU SAE (SAELens' "jumprelu") plus the training k and estimate."""
        return {"architecture": "jumprelu", "activation_fn": "relu", "activation_fn_kwargs": {},
                "k": int(self.cfg.k), "training_activation": "batchtopk",
                "threshold_batches": int(self.threshold_batches),
                "threshold_beta": self.opts.threshold_beta}

