"""The collectives an SAE's training step uses, as an object the model holds (`sae.comm`).

A model never talks to torch.distributed: every batch-level statistic or cross-shard selection goes
through `self.comm`. On one process that is `LocalComm` below, whose operations are identities (no
copies, no synchronisation). `sae_dist.parallel.tp.parallelize_sae` installs a `MeshComm` with the same
methods over the dp x tp process mesh (docs/parallel.md), so one training step serves a single GPU
and a 64-rank latent-sharded job alike. Terms: "tp" are the ranks holding the latent shards of one
SAE (the same batch rows), "dp" the replicas that see different rows of the global batch.
"""

from __future__ import annotations

import torch

__all__ = ["LocalComm", "LOCAL"]


class LocalComm:
    """One process holding the whole SAE and the whole batch: tp = dp = 1, every collective the identity.

    The methods (the contract `MeshComm` implements over a mesh):
      copy_to_tp(t) / reduce_from_tp(t): the two conjugate tensor-parallel operators (Shoeybi et al.
        2019): identity forward with the gradient summed over tp, and the sum over tp forward with an
        identity backward. Differentiable.
      sum_over_tp_(t), sum_over_dp_(t), max_over_dp_(t): in-place sums / maxima of a no-grad tensor.
      gather_over_dp(t): rows of every dp rank concatenated along dim 0 (rank order).
      batch_variance(x): sum_b ||x_b - mean(x)||^2 over the GLOBAL batch (all dp ranks' rows), float32;
        the denominator of the paper's normalised MSE (Gao et al. 2024, section 2.2).
      select_topk(values, indices, ms, width): per m in ms, this shard's entries among the global
        top-m of each row of the candidates (values, indices [B, w], values sorted descending along
        each row, w >= max(ms) here); returns [(values [B, m'], indices [B, m'])] with -1 indices (and
        values 0) where a slot holds no kept entry. Locally: the first m columns. width: the common
        candidate width over tp (pad target; unused here).
    """

    tp = 1
    dp = 1
    tp_rank = 0

    def copy_to_tp(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def reduce_from_tp(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def sum_over_tp_(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def sum_over_dp_(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def max_over_dp_(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def gather_over_dp(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def batch_variance(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf - xf.mean(0, keepdim=True)).pow(2).sum()

    def select_topk(self, values: torch.Tensor, indices: torch.Tensor, ms: tuple[int, ...],
                    width: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(values[:, :m], indices[:, :m]) for m in ms]


#: The shared single-process instance (stateless).
LOCAL = LocalComm()
