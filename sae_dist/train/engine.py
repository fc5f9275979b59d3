"""Optimisation engines: what happens between a step's loss and the next step's weights.

`TorchEngine` (trainer.engine=torch, default): fused torch Adam on each rank's parameters (the local
shard under tensor parallelism), gradients summed over dp (`sae_dist.parallel.tp.sync_grads_over_dp`).
The DeepSpeed engine (trainer.engine=deepspeed, ZeRO-1/2 over the dp group) lives in
`sae_dist.train.deepspeed_engine`. Both implement the `Engine` protocol, all the trainer calls:

    engine.set_lr(lr)
    engine.step(loss)                 # zero grads, backward, dp reduction, decoder-gradient projection,
                                      # optional clipping, optimizer step, W_dec row renormalisation
    engine.optimizer_state() -> {param name: {"exp_avg": T, "exp_avg_sq": T, "step": 0-d T}}
    engine.load_optimizer_state(state)   # in place, same layout (this rank's local shard shapes)
    engine.close()                    # release what the engine holds (process groups, buffers)

The per-step recipe is Gao et al. 2024, section 2.4.1 / Appendix A.1: remove the gradient component
parallel to each W_dec row, Adam(0.9, 0.999, eps 6.25e-10), renormalise the W_dec rows.
"""

from __future__ import annotations

from typing import Protocol

import torch

from sae_dist.parallel.mesh import ParallelContext
from sae_dist.parallel.tp import clip_grad_norm_, sync_grads_over_dp

__all__ = ["Engine", "TorchEngine", "make_optimizer", "adam_state_template"]


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
    under `parallelize_sae`); ctx: the process's ParallelContext (None: one process)."""

    def __init__(self, model: torch.nn.Module, lr: float, tcfg, ctx: ParallelContext | None = None):
        self.model = model
        self.tcfg = tcfg
        self.ctx = ParallelContext() if ctx is None else ctx
        self.optimizer = make_optimizer(model, lr, tcfg)
        self.names = {p: n for n, p in model.named_parameters()}

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def step(self, loss: torch.Tensor) -> None:
        m = self.model
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sync_grads_over_dp(m, self.ctx)
        m.remove_parallel_grads_()
        if self.tcfg.grad_clip_norm is not None:
            clip_grad_norm_(m, self.tcfg.grad_clip_norm, self.ctx)
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
