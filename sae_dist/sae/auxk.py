"""AuxK loss against dead latents (Gao et al. 2024, section 2.4.1 and Appendix A.2) and the
normalised-MSE helper shared by the main loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sae_dist.kernels.auxk import auxk_loss_reference
from sae_dist.kernels.sparse_decode import sparse_decode_reference

__all__ = ["sparse_decode", "normalized_mse", "auxk_loss", "DeadLatentTracker"]


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """sum_j values[b, j] * W_dec[indices[b, j]] without a dense [B, n_latents] matrix.

    values [B, k] float, indices [B, k] int64 in [0, n_latents), W_dec [n_latents, d_in].
    Returns [B, d_in] in W_dec's dtype (no bias), differentiable in values and W_dec: the torch path
    of `sae_dist.kernels.sparse_decode` (embedding_bag, section 5.1's sparse decoder).
    Raises ValueError for mismatched shapes or out-of-range indices.
    """
    return sparse_decode_reference(values, indices, W_dec, None)


def normalized_mse(target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Paper's normalised MSE (section 2.2): sum_b ||t_b - r_b||^2 / sum_b ||t_b - mean_b(t)||^2.

    target, recon [B, d]. Over one batch this equals the fraction of variance unexplained (fvu).
    Returns a 0-d tensor (float32 accumulation); NaN/Inf if the batch has zero variance.
    """
    t = target.float()
    r = recon.float()
    num = (t - r).pow(2).sum(-1).mean()
    den = (t - t.mean(0, keepdim=True)).pow(2).sum(-1).mean()
    return num / den


def auxk_loss(
    pre_acts: torch.Tensor,
    dead_mask: torch.Tensor,
    residual: torch.Tensor,
    W_dec: torch.Tensor,
    k_aux: int,
) -> torch.Tensor:
    """AuxK auxiliary loss (Gao et al. 2024, section 2.4.1, Appendix A.2).

    The top-k_aux pre-activations among the dead latents (ReLU applied) reconstruct the main
    reconstruction's residual e = x - x^.detach() through W_dec (no b_pre):
        e^ = sum_{j in TopK_aux(dead)} relu(pre_j) W_dec[j]
        L_aux = ||e - e^||^2 / ||e - mean_batch(e)||^2    (normalised MSE, summed over the batch)
    Args:
      pre_acts [B, n_latents]: encoder pre-activations W_enc^T (x - b_pre) + b_enc.
      dead_mask [n_latents] bool: True for dead latents.
      residual [B, d_in]: e, must already be detached from the main reconstruction.
      W_dec [n_latents, d_in].
      k_aux: number of dead latents used per token (min(k_aux, n_dead) are used).
    Returns a 0-d float32 tensor; exactly 0 when no latent is dead; NaN/Inf (e.g. zero-variance
    residual) are replaced by 0 as in the paper's implementation.
    """
    if dead_mask.dtype != torch.bool or dead_mask.shape != pre_acts.shape[-1:]:
        raise ValueError(
            f"dead_mask must be bool [{pre_acts.shape[-1]}], got {dead_mask.dtype} "
            f"{tuple(dead_mask.shape)}"
        )
    n_dead = int(dead_mask.sum())
    if n_dead == 0:
        return pre_acts.new_zeros((), dtype=torch.float32)
    k_eff = min(k_aux, n_dead)
    masked = pre_acts.masked_fill(~dead_mask, float("-inf"))
    vals, idx = masked.topk(k_eff, dim=-1, sorted=False)
    return auxk_loss_reference(F.relu(vals), idx, W_dec, residual)


class DeadLatentTracker:
    """Per-latent count of tokens since each latent last fired (section 2.4.1).

    `tokens_since_fired` int64 [n_latents]; `ever_fired` bool [n_latents]. A latent is dead when
    tokens_since_fired >= dead_tokens. A latent "fires" on a token when it is among the TopK and
    its ReLU'd value is > 0.
    """

    def __init__(self, n_latents: int, dead_tokens: int, device: torch.device | str = "cpu"):
        self.n_latents = n_latents
        self.dead_tokens = int(dead_tokens)
        self.tokens_since_fired = torch.zeros(n_latents, dtype=torch.int64, device=device)
        self.ever_fired = torch.zeros(n_latents, dtype=torch.bool, device=device)

    @torch.no_grad()
    def fired(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """bool [n_latents]: latents among `indices` [B, k] with a value > 0 in `values` [B, k]."""
        fired = torch.zeros(self.n_latents, dtype=torch.bool, device=indices.device)
        fired[indices[values > 0]] = True
        return fired

    @torch.no_grad()
    def update(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        """values, indices [B, k] of one batch of B tokens."""
        self.update_fired(self.fired(values, indices), indices.shape[0])

    @torch.no_grad()
    def update_fired(self, fired: torch.Tensor, n_tokens: int) -> None:
        """Advance the counters by a batch of n_tokens in which the latents of bool [n_latents] `fired`
        fired (under data parallelism: OR-reduced over dp, n_tokens = the global batch)."""
        self.tokens_since_fired += int(n_tokens)
        self.tokens_since_fired[fired] = 0
        self.ever_fired |= fired

    def dead_mask(self) -> torch.Tensor:
        """bool [n_latents]: True where tokens_since_fired >= dead_tokens."""
        return self.tokens_since_fired >= self.dead_tokens

    def dead_fraction(self) -> float:
        return float(self.dead_mask().float().mean())

    def state_dict(self) -> dict:
        return {
            "tokens_since_fired": self.tokens_since_fired,
            "ever_fired": self.ever_fired,
        }

    def load_state_dict(self, sd: dict) -> None:
        self.tokens_since_fired.copy_(sd["tokens_since_fired"])
        self.ever_fired.copy_(sd["ever_fired"])
