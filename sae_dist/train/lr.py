"""Learning-rate rule and schedule (Gao et al. 2024, section 2.4.2 / Appendix A)."""

from __future__ import annotations

import math

__all__ = ["PAPER_LR_CONSTANT", "BUDGET_STEPS", "MAX_BUDGET_FACTOR", "budget_factor", "default_lr",
           "lr_at_step"]


# The paper fits lr = 2e-4 / sqrt(n / 2^14) on runs trained to convergence (Appendix A.3). Short runs want
# more: measured at 195 and 390 steps of 4096 tokens (docs/evaluation.md, "The learning rate at the budgets
# users run"), the best lr was ~11x and ~6-8x the paper's at every n and k tried, i.e. it shrinks like
# 1/sqrt(steps). `budget_factor` is that fit, 1 from BUDGET_STEPS steps on, capped at the largest factor
# measured (shorter runs were not measured).
PAPER_LR_CONSTANT = 2e-4
BUDGET_STEPS = 24_000
MAX_BUDGET_FACTOR = 12.0


def budget_factor(n_steps: int) -> float:
    """clip(sqrt(BUDGET_STEPS / n_steps), 1, MAX_BUDGET_FACTOR): how far above the paper's converged-run rule
    the lr of an `n_steps`-step run goes (11.1 at 195 steps, 7.8 at 390, 1 from 24,000 steps on).

    n_steps: optimizer steps of the whole run (> 0). Raises ValueError otherwise. Fitted at batches of 4096
    tokens; the paper's own runs (batch 131072, tens of thousands of steps) get 1, i.e. the paper's rule.
    """
    if n_steps <= 0:
        raise ValueError(f"n_steps must be > 0, got {n_steps}")
    return min(MAX_BUDGET_FACTOR, max(1.0, math.sqrt(BUDGET_STEPS / n_steps)))


def default_lr(n_latents: int, n_steps: int) -> float:
    """lr = 2e-4 / sqrt(n / 2^14) * budget_factor(n_steps): the paper's 1/sqrt(n) rule (Gao et al. 2024,
    Appendix A.3) raised for short runs.

    n_latents: the SAE width n (> 0); n_steps: optimizer steps of the run (> 0). Returns the Adam learning
    rate (float). Raises ValueError on a non-positive argument. Set `trainer.lr` to override it.
    """
    if n_latents <= 0:
        raise ValueError(f"n_latents must be > 0, got {n_latents}")
    return PAPER_LR_CONSTANT / math.sqrt(n_latents / 2**14) * budget_factor(n_steps)


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
