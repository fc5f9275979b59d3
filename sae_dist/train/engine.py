"""Optimisation: the learning-rate rule and schedule, and the engines that turn a step's loss into the
next step's weights.

`TorchEngine` (trainer.engine=torch, default): fused torch Adam on each rank's parameters (the local
shard under tensor parallelism), gradients summed over dp (`sync_grads_over_dp`) and optionally clipped
to a global norm (`clip_grad_norm_`), both through the model's collectives `model.comm` (identities on
one process).
The DeepSpeed engine (trainer.engine=deepspeed, ZeRO-1/2 over the dp group) lives in
`sae_dist.train.deepspeed_engine`. Both implement the `Engine` protocol, all the trainer calls:

    engine.set_lr(lr)
    engine.step(loss)                 # zero grads, backward, dp reduction, decoder-gradient projection,
                                      # optional clipping, optimizer step, W_dec row renormalisation
    engine.optimizer_state() -> {param name: {"exp_avg": T, "exp_avg_sq": T, "step": 0-d T}}
                                      # T: this rank's local shard, or (DeepSpeed at dp > 1) its ZeRO
                                      # partition of it as a `sae_dist.parallel.state.RankPart`
    engine.load_optimizer_state(state)   # in place, the layout optimizer_state() returns
    engine.close()                    # release what the engine holds (process groups, buffers)

The per-step recipe is Gao et al. 2024, section 2.4.1 / Appendix A.1: remove the gradient component
parallel to each W_dec row, Adam(0.9, 0.999, eps 6.25e-10), renormalise the W_dec rows. The lr rule is
section 2.4.2 / Appendix A (`default_lr`, `lr_at_step`).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

__all__ = ["Engine", "TorchEngine", "make_optimizer", "adam_state_template", "sync_grads_over_dp",
           "clip_grad_norm_", "PAPER_LR_CONSTANT", "BUDGET_STEPS", "MAX_BUDGET_FACTOR", "budget_factor",
           "default_lr", "lr_at_step"]


# ----------------------------------------------------------------------------------------- lr

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


def default_lr(d_sae: int, n_steps: int) -> float:
    """lr = 2e-4 / sqrt(n / 2^14) * budget_factor(n_steps): the paper's 1/sqrt(n) rule (Gao et al. 2024,
    Appendix A.3) raised for short runs.

    d_sae: the SAE width n (> 0); n_steps: optimizer steps of the run (> 0). Returns the Adam learning
    rate (float). Raises ValueError on a non-positive argument. Set `trainer.lr` to override it.
    """
    if d_sae <= 0:
        raise ValueError(f"d_sae must be > 0, got {d_sae}")
    return PAPER_LR_CONSTANT / math.sqrt(d_sae / 2**14) * budget_factor(n_steps)


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


# ----------------------------------------------------------------------------------------- engine
@torch.no_grad()
def sync_grads_over_dp(model: torch.nn.Module) -> None:
    """Sum every gradient of `model` over its dp ranks (`model.comm.sum_over_dp_`; identities on one
    process): the per-rank losses are shares of the global loss (or, for whole-SAE replicas, loss / dp),
    so the sum is the global gradient."""
    if model.comm.dp == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            model.comm.sum_over_dp_(p.grad)


@torch.no_grad()
def clip_grad_norm_(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients of `model` to a global L2 norm over the whole (unsharded) SAE: the latent shards'
    squared norms summed over tp (`model.comm.sum_over_tp_`), the replicated b_dec (and any other
    replicated parameter) counted once. Returns the total norm before clipping (0-d float32)."""
    sharded = {"W_enc", "b_enc", "W_dec"} if model.comm.tp > 1 else set()
    grads = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    zero = torch.zeros((), device=model.W_dec.device)
    sq_sharded = sum((g.float().pow(2).sum() for n, g in grads if n in sharded), zero)
    sq_replicated = sum((g.float().pow(2).sum() for n, g in grads if n not in sharded), zero)
    total = (model.comm.sum_over_tp_(sq_sharded) + sq_replicated).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for _, g in grads:
        g.mul_(coef.to(g.dtype))
    return total


class Engine(Protocol):
    """What the trainer calls between a step's loss and the next step's weights (module docstring)."""

    def set_lr(self, lr: float) -> None: ...

    def step(self, loss: torch.Tensor) -> None: ...

    def optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]: ...

    def load_optimizer_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None: ...

    def close(self) -> None: ...


def make_optimizer(sae: torch.nn.Module, lr: float, tcfg) -> torch.optim.Adam:
    """Adam with the paper's betas/eps (Gao et al. 2024, Appendix A), fused (one multi-tensor kernel,
    no per-parameter temporaries: at n=2^18 the unfused step adds two weight-sized buffers)."""
    return torch.optim.Adam(sae.parameters(), lr=lr, betas=tcfg.adam_betas, eps=tcfg.adam_eps, fused=True)


def adam_state_template(p: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fresh Adam state for parameter p (zeros; step 0-d float32 on p's device, as fused Adam keeps it)."""
    return {"step": torch.zeros((), dtype=torch.float32, device=p.device),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


class TorchEngine:
    """torch.optim.Adam (fused) on this rank's parameters of `model` (an SAE, whole or a latent shard
    under `parallelize_sae`; its `comm` carries the dp / tp collectives); tcfg: TrainerConfig."""

    def __init__(self, model: torch.nn.Module, lr: float, tcfg):
        self.model = model
        self.tcfg = tcfg
        self.optimizer = make_optimizer(model, lr, tcfg)
        self.names = {p: n for n, p in model.named_parameters()}

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def step(self, loss: torch.Tensor) -> None:
        m = self.model
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sync_grads_over_dp(m)
        m.remove_parallel_grads_()
        if self.tcfg.grad_clip_norm is not None:
            clip_grad_norm_(m, self.tcfg.grad_clip_norm)
        self.optimizer.step()
        m.normalize_decoder_()

    def close(self) -> None:
        """Nothing to release (the `Engine` protocol)."""

    def optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for p, name in self.names.items():
            st = self.optimizer.state.get(p)
            if not st:  # before the first step: the state Adam would create
                st = self.optimizer.state[p] = adam_state_template(p)
            out[name] = {k: st[k] for k in ("step", "exp_avg", "exp_avg_sq")}
        return out

    def load_optimizer_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        cur = self.optimizer_state()
        for name, st in state.items():
            for k, v in st.items():
                if cur[name][k] is not v:
                    cur[name][k].copy_(v)
