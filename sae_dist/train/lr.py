"""Learning-rate rule and schedule (Gao et al. 2024, section 2.4.2 / Appendix A)."""

from __future__ import annotations

import math

__all__ = ["default_lr", "lr_at_step"]


def default_lr(n_latents: int) -> float:
    """lr = 2e-4 / sqrt(n / 2^14): the paper's fitted 1/sqrt(n) learning-rate rule (Appendix A.3)."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


def lr_at_step(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0,
               decay_frac: float = 0.0) -> float:
    """LR for 0-based `step`: linear warmup over `warmup_steps` (from base_lr/warmup_steps), then
    constant, then linear decay to 0 over the final `decay_frac` of `total_steps` (0 = no decay)."""
    lr = base_lr
    if warmup_steps > 0 and step < warmup_steps:
        lr = base_lr * (step + 1) / warmup_steps
    if decay_frac > 0:
        decay_steps = max(1, int(round(decay_frac * total_steps)))
        start = total_steps - decay_steps
        if step >= start:
            lr = min(lr, base_lr * (total_steps - step) / decay_steps)
    return lr
