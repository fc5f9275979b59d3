"""TrainerConfig: the trainer's options (the `trainer` config group; `store.shuffle_shards` and
`store.prefetch` are the `store` node's, sae_dist.config.StoreConfig, which takes their defaults from here).

Every field's default, type and one-line doc is declared once, here; the CLI's structured config
(sae_dist.config) is derived from this class, and `sae-train --help-config` prints the docs.
"""

from __future__ import annotations

from dataclasses import dataclass

from sae_dist.fielddoc import option

__all__ = ["TrainerConfig"]


@dataclass
class TrainerConfig:
    """Trainer options (paper defaults where it gives them, Appendix A).

    tokens: total training tokens (steps = max(1, tokens // batch_tokens)).
    batch_tokens: tokens per step (paper: 131072; default 4096 for laptops).
    lr: None -> 2e-4 / sqrt(d_sae / 2^14) * budget_factor(steps) (`default_lr`: the paper's rule,
      raised for runs shorter than 24,000 steps, 11x at 195 steps, at most 12x).
    adam_betas, adam_eps: (0.9, 0.999), 6.25e-10.
    warmup_steps: linear warmup; lr_decay_frac: linear decay to 0 over that final fraction of the
      steps (0 = constant).
    ema, ema_decay: keep an EMA of the weights (W_dec rows of the EMA renormalised after each
      update); eval/export use it when on.
    grad_clip_norm: None or max global grad norm.
    checkpoint_every_steps, keep_checkpoints: DCP checkpoint cadence / how many to keep (0: none).
    log_every_steps: jsonl/wandb/progress cadence.
    feature_density_every_steps: the feature-density window in steps (SAELens' feature_sampling_window,
      whose default 2000 it takes): at every multiple of it the window's per-latent firing frequencies
      are summarised (sae_dist.train.density) and the window restarts; 0: off (no per-step counting).
    bf16: autocast to bfloat16 on CUDA (ignored on CPU); master weights stay fp32.
    shuffle_shards, prefetch: ActivationStore options. b_dec_sample_tokens: sample size for b_dec.
    max_steps: stop after this many (global) steps without exporting (simulates an interruption).
    engine: "torch" (fused torch Adam) or "deepspeed" (DeepSpeed ZeRO over the dp group);
      zero_stage: 1 or 2 (deepspeed); offload_optimizer: ZeRO optimizer-state CPU offload (deepspeed).
    deterministic: `torch.use_deterministic_algorithms(True)` for the run (restored afterwards), which
      also selects the kernels' sorted segment sums instead of atomic adds, and on CUDA sets
      CUBLAS_WORKSPACE_CONFIG=:4096:8 when unset: two runs of one configuration on one machine (same
      device, world size and thread count) give bit-identical weights and logs. An op without a
      deterministic implementation raises RuntimeError instead of running.
    eval_every_steps, eval_contexts: the held-out evaluation during training (`sae_dist.train.heldout`): every
      eval_every_steps steps (0: never) the LM's CE and KL with the SAE spliced in, on the first eval_contexts
      held-out contexts; sae-train runs it when the LM loads from local files (under parallel.tp > 1 on every tp
      rank of dp replica 0, the latent shards spliced together).

    Raises ValueError naming the option (as the CLI key `trainer.<name>`) and its valid range.
    """

    tokens: int = option(10_000_000, "tokens to train on (steps = max(1, tokens // batch_tokens))")
    batch_tokens: int = option(4096, "tokens per optimizer step (the paper uses 131072 at scale)")
    lr: float | None = option(None, "learning rate; null: 2e-4 / sqrt(d_sae / 2^14) x budget factor "
                                    "(1..12, 11 at 195 steps; docs/evaluation.md)")
    adam_betas: tuple[float, float] = option((0.9, 0.999), "Adam betas (old key: trainer.betas)")
    adam_eps: float = option(6.25e-10, "Adam epsilon (old key: trainer.eps)")
    warmup_steps: int = option(20, "linear lr warmup steps")
    lr_decay_frac: float = option(0.0, "linear lr decay to 0 over this final fraction of training, in [0, 1]")
    ema: bool = option(False, "keep an EMA of the weights; eval and export use it")
    ema_decay: float = option(0.999, "decay of the weight EMA, in (0, 1)")
    grad_clip_norm: float | None = option(None, "max global gradient norm; null: no clipping")
    checkpoint_every_steps: int = option(500, "steps between checkpoints (the unit of resume)")
    keep_checkpoints: int = option(2, "checkpoints kept (0: none)")
    log_every_steps: int = option(10, "steps between jsonl / wandb / progress-bar logs")
    feature_density_every_steps: int = option(
        2000, "steps per feature-density window (SAELens' feature_sampling_window): its per-latent firing "
              "frequencies go to wandb as a histogram and three summaries; 0: off (docs/reference.md#wandb)")
    bf16: bool = option(True, "bf16 autocast on CUDA (fp32 master weights); ignored on CPU")
    shuffle_shards: int = option(4, "shuffle buffer in shards' worth of rows, read as inner chunks from all shards")
    prefetch: int = option(2, "batches prepared ahead by the background thread")
    b_dec_sample_tokens: int = option(32768, "tokens sampled to initialise b_dec (sae.b_dec_init)")
    max_steps: int | None = option(None, "stop after this many steps without exporting (simulates an "
                                         "interruption); null: run to the end")
    engine: str = option("torch", "torch (fused Adam) | deepspeed (ZeRO over the dp group)")
    zero_stage: int = option(1, "deepspeed only: 1 (optimizer state sharded over dp) or 2 (+ gradients)")
    offload_optimizer: bool = option(False, "deepspeed only: keep the ZeRO optimizer state in CPU memory")
    deterministic: bool = option(False, "deterministic torch algorithms and kernels: bit-identical weights and "
                                        "logs on one machine (docs/reference.md#reproducibility)")
    eval_every_steps: int = option(1000, "steps between held-out evaluations: the LM's CE loss and KL with the SAE "
                                         "spliced in (the EMA when on); 0: off; off anyway without a local LM "
                                         "(docs/reference.md#held-out-evaluation-during-training)")
    eval_contexts: int = option(32, "held-out contexts of data.ctx_len tokens in each held-out evaluation (the "
                                    "first ones of sae-eval's)")

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.batch_tokens < 1:
            raise ValueError(
                f"trainer.tokens={self.tokens} and trainer.batch_tokens={self.batch_tokens} must be >= 1"
            )
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"trainer.lr={self.lr} must be > 0 (or null for the 1/sqrt(n) rule)")
        if not 0.0 <= self.lr_decay_frac <= 1.0:
            raise ValueError(f"trainer.lr_decay_frac={self.lr_decay_frac} must be in [0, 1]")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"trainer.ema_decay={self.ema_decay} must be in (0, 1)")
        if self.checkpoint_every_steps < 1 or self.log_every_steps < 1:
            raise ValueError("trainer.checkpoint_every_steps and trainer.log_every_steps must be >= 1")
        if self.feature_density_every_steps < 0:
            raise ValueError(f"trainer.feature_density_every_steps={self.feature_density_every_steps} must be "
                             ">= 0 (0: off)")
        if self.eval_every_steps < 0 or self.eval_contexts < 1:
            raise ValueError(f"trainer.eval_every_steps={self.eval_every_steps} must be >= 0 (0: off) and "
                             f"trainer.eval_contexts={self.eval_contexts} >= 1")
        self.adam_betas = tuple(self.adam_betas)
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"trainer.adam_betas={list(self.adam_betas)} must be two numbers in [0, 1)")
        if self.engine not in ("torch", "deepspeed"):
            raise ValueError(f"trainer.engine={self.engine!r}; valid: torch, deepspeed")
