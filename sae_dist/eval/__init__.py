"""sae_dist.eval: SAE evaluation (Gao et al. 2024 metrics) -> eval.json.

- `metrics`: streaming `ReconstructionStats` (fvu, normalized_mse, explained_variance, mse, l0) and
  `LatentFiringCounter` (per-latent firing counts, dead fraction, density histogram).
- `downstream`: `downstream_loss` (CE clean / SAE-spliced / zero-ablated, CE loss score, KL).
- `progressive`: progressive recovery (sec. 5.3): test-time TopK(k') and one-threshold JumpReLU curves,
  threshold calibration and the JumpReLU export (`export_fixed_threshold`).
- `evaluate`: `evaluate(...)` end to end and `write_eval_json`.
"""

from sae_dist.eval.downstream import downstream_loss
from sae_dist.eval.evaluate import CONTRACT_KEYS, evaluate, write_eval_json
from sae_dist.eval.metrics import LatentFiringCounter, ReconstructionStats

__all__ = [
    "CONTRACT_KEYS",
    "LatentFiringCounter",
    "ReconstructionStats",
    "downstream_loss",
    "evaluate",
    "write_eval_json",
]
