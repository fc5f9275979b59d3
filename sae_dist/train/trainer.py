"""Single-process TopK SAE trainer (the recipe of Gao et al. 2024, "Scaling and evaluating sparse
autoencoders", sections 2 and Appendix A).

One loop, top to bottom: open the activation store -> tied init + b_pre at the geometric median of
the first batches -> Adam steps (gradient component parallel to the W_dec rows removed, W_dec rows
renormalised after each step, optional clipping and EMA, bf16 autocast on CUDA with fp32 master
weights) -> AuxK against latents dead for `dead_tokens` tokens -> logs (tqdm, jsonl, wandb) ->
atomic DCP checkpoints with exact resume -> export to `out_dir/sae/`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from sae_dist.sae.auxk import DeadLatentTracker
from sae_dist.sae.config import SAEConfig
from sae_dist.sae.export import export_sae
from sae_dist.sae.init import init_b_pre_
from sae_dist.sae.topk import TopKSAE
from sae_dist.store.errors import NonFiniteError
from sae_dist.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from sae_dist.train.logging import JsonlLogger, WandbLogger, truncate_jsonl
from sae_dist.train.lr import default_lr, lr_at_step

__all__ = ["TrainerConfig", "train"]


@dataclass
class TrainerConfig:
    """Trainer options (paper defaults where it gives them, Appendix A).

    tokens: total training tokens (steps = max(1, tokens // batch_tokens)).
    batch_tokens: tokens per step (paper: 131072; default 4096 for laptops).
    lr: None -> 2e-4 / sqrt(n_latents / 2^14). adam_betas, adam_eps: (0.9, 0.999), 6.25e-10.
    warmup_steps: linear warmup; lr_decay_frac: linear decay to 0 over that final fraction of the
      steps (0 = constant).
    ema, ema_decay: keep an EMA of the weights (W_dec rows of the EMA renormalised after each
      update); eval/export use it when on.
    grad_clip_norm: None or max global grad norm.
    checkpoint_every_steps, keep_checkpoints: DCP checkpoint cadence / how many to keep (0: none).
    log_every_steps: jsonl/wandb/progress cadence.
    bf16: autocast to bfloat16 on CUDA (ignored on CPU); master weights stay fp32.
    shuffle_shards, prefetch: ActivationStore options. b_pre_sample_tokens: sample size for b_pre.
    max_steps: stop after this many (global) steps without exporting (simulates an interruption).
    """

    tokens: int = 2_000_000
    batch_tokens: int = 4096
    lr: float | None = None
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 6.25e-10
    warmup_steps: int = 10
    lr_decay_frac: float = 0.0
    ema: bool = False
    ema_decay: float = 0.999
    grad_clip_norm: float | None = None
    checkpoint_every_steps: int = 500
    keep_checkpoints: int = 2
    log_every_steps: int = 10
    bf16: bool = True
    shuffle_shards: int = 4
    prefetch: int = 2
    b_pre_sample_tokens: int = 32768
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.batch_tokens < 1:
            raise ValueError(
                f"TrainerConfig.tokens={self.tokens} and batch_tokens={self.batch_tokens} must be >= 1"
            )
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"TrainerConfig.lr={self.lr} must be > 0 (or null for the 1/sqrt(n) rule)")
        if not 0.0 <= self.lr_decay_frac <= 1.0:
            raise ValueError(f"TrainerConfig.lr_decay_frac={self.lr_decay_frac} must be in [0, 1]")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"TrainerConfig.ema_decay={self.ema_decay} must be in (0, 1)")
        if self.checkpoint_every_steps < 1 or self.log_every_steps < 1:
            raise ValueError("checkpoint_every_steps and log_every_steps must be >= 1")
        self.adam_betas = tuple(self.adam_betas)


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _open_store(store_path, batch_tokens, seed, tcfg: TrainerConfig, device, normalize):
    from sae_dist.store import ActivationStore

    return ActivationStore(
        store_path,
        batch_tokens=batch_tokens,
        seed=seed,
        shuffle=True,
        shuffle_shards=tcfg.shuffle_shards,
        prefetch=tcfg.prefetch,
        device=device,
        normalize=normalize,
    )


def _close(obj) -> None:
    close = getattr(obj, "close", None)
    if callable(close):
        close()


@torch.no_grad()
def _ema_update(ema: TopKSAE, sae: TopKSAE, decay: float) -> None:
    e = [p for p in ema.parameters()]
    s = [p.detach() for p in sae.parameters()]
    torch._foreach_lerp_(e, s, 1.0 - decay)
    ema.normalize_decoder_()


def make_optimizer(sae: torch.nn.Module, lr: float, tcfg: "TrainerConfig") -> torch.optim.Adam:
    """Adam with the paper's betas/eps (Gao et al. 2024, Appendix A), fused (one multi-tensor kernel,
    no per-parameter temporaries: at n=2^18 the unfused step adds two weight-sized buffers)."""
    return torch.optim.Adam(sae.parameters(), lr=lr, betas=tcfg.adam_betas, eps=tcfg.adam_eps, fused=True)


#: Options a checkpoint cannot be resumed under once changed: they fix parameter shapes, the loss or
#: the data order. Kept in checkpoints/run_identity.json and compared before any checkpoint is loaded.
_IDENTITY_KEYS = ("d_in", "n_latents", "k", "k_aux", "multi_topk", "normalize", "batch_tokens", "seed")


def _check_run_identity(ckpt_root: Path, sae_cfg: SAEConfig, tcfg: TrainerConfig, seed: int,
                        resuming: bool) -> None:
    """Record (new run) or verify (resume) the options that a resumed run must share with its checkpoints.

    Raises ValueError naming each changed option with its checkpointed and its new value.
    """
    ident = {**{k: getattr(sae_cfg, k) for k in _IDENTITY_KEYS[:6]},
             "batch_tokens": tcfg.batch_tokens, "seed": seed}
    path = ckpt_root / "run_identity.json"
    if resuming and path.is_file():
        old = json.loads(path.read_text())
        changed = [f"{k}: checkpoint {old.get(k)!r} != now {ident[k]!r}" for k in ident if old.get(k) != ident[k]]
        if changed:
            raise ValueError(
                f"cannot resume the checkpoints in {ckpt_root} with a different configuration ("
                + "; ".join(changed) + "). Use a new run_dir, or restore the checkpointed values."
            )
        return
    ckpt_root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ident, indent=2))


#: The eval.json contract's dead-latent window: a latent is dead when it did not fire in the last 10M
#: training tokens, or over the whole run when the run is shorter (ARCHITECTURE.md, eval.json keys).
#: Independent of `SAEConfig.dead_tokens`, which only sets the AuxK threshold.
DEAD_WINDOW_TOKENS = 10_000_000


def _dead_summary(tracker: DeadLatentTracker, tokens_trained: int) -> tuple[float, str]:
    """Fraction of latents with no fire in the last min(10M, tokens_trained) tokens, and which window."""
    window = min(DEAD_WINDOW_TOKENS, tokens_trained)
    frac = float((tracker.tokens_since_fired >= max(window, 1)).float().mean())
    if tokens_trained >= DEAD_WINDOW_TOKENS:
        return frac, f"no fire in the last {DEAD_WINDOW_TOKENS} training tokens"
    return frac, f"no fire over the whole run ({tokens_trained} training tokens < {DEAD_WINDOW_TOKENS})"


def train(
    *,
    store_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    sae_cfg: SAEConfig,
    trainer_cfg: TrainerConfig,
    device: str | torch.device = "cpu",
    seed: int = 0,
    hook_name: str | None = None,
    model_name: str | None = None,
    wandb_cfg: dict | None = None,
    progress: bool = True,
) -> dict:
    """Train a TopK SAE on an activation store; resume from `out_dir/checkpoints` if present.

    Args:
      store_path: activation store (zarr v3, ARCHITECTURE.md CONTRACT). Batches come normalised by
        the store with `sae_cfg.normalize`.
      out_dir: run directory: `train_log.jsonl`, `checkpoints/step_XXXXXXXX/` (DCP), `wandb/`,
        `sae/` (export: cfg.json, sae_weights.safetensors, training_state.json).
      sae_cfg, trainer_cfg: see SAEConfig / TrainerConfig. device: "cpu" | "cuda" | torch.device.
      seed: init and data-order seed. hook_name / model_name: for cfg.json (default: the store's
        `hook` / `model` attributes). wandb_cfg: {project, mode, group, name, enabled}.
      progress: show a tqdm bar (tokens, loss, fvu, L0, dead %, tokens/s).
    Returns a dict: out_dir, sae_dir (None if stopped early), steps, tokens_trained, final metrics
      (`train/...` keys), dead_fraction, dead_fraction_window, already_finished, stopped_early.
    Raises ValueError "store d_model X != SAE d_in Y" on a width mismatch; FloatingPointError
      naming the step when a batch or the loss is NaN/Inf.
    Resume is exact: the same losses (bit-for-bit on CPU fp32) as an uninterrupted run.
    """
    tcfg = trainer_cfg
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sae_dir = out / "sae"
    n_steps = max(1, tcfg.tokens // tcfg.batch_tokens)
    target_tokens = n_steps * tcfg.batch_tokens
    state_file = sae_dir / "training_state.json"
    if state_file.is_file():
        done = json.loads(state_file.read_text())
        if int(done.get("tokens_trained", -1)) >= target_tokens:
            msg = (f"sae-train: {out} already finished ({done['tokens_trained']} tokens); "
                   "nothing to do (delete the run directory to retrain)")
            print(msg, file=sys.stderr)
            return {**done, "metrics": done.get("final_metrics", {}), "out_dir": str(out),
                    "sae_dir": str(sae_dir),
                    "already_finished": True, "stopped_early": False}

    device = torch.device(device)
    store = _open_store(store_path, tcfg.batch_tokens, seed, tcfg, device, sae_cfg.normalize)
    if int(store.d_model) != int(sae_cfg.d_in):
        _close(store)
        raise ValueError(
            f"store d_model {store.d_model} != SAE d_in {sae_cfg.d_in}: set sae.d_in to the "
            f"store's width ({store.d_model}) or use a store harvested at a hook of width {sae_cfg.d_in}"
        )
    attrs = dict(getattr(store, "attrs", {}) or {})
    hook_name = hook_name or attrs.get("hook")
    model_name = model_name or attrs.get("model")

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sae = TopKSAE(sae_cfg, device=device, generator=gen)
    base_lr = tcfg.lr if tcfg.lr is not None else default_lr(sae_cfg.n_latents)
    opt = make_optimizer(sae, base_lr, tcfg)
    ema = None
    if tcfg.ema:
        ema = copy.deepcopy(sae)
        ema.requires_grad_(False)
    tracker = DeadLatentTracker(sae_cfg.n_latents, sae_cfg.dead_tokens, device=device)
    ckpt_root = out / "checkpoints"
    log_path = out / "train_log.jsonl"

    step, tokens_seen, last_metrics = 0, 0, {}
    ck = latest_checkpoint(ckpt_root)
    _check_run_identity(ckpt_root, sae_cfg, tcfg, seed, resuming=ck is not None)
    if ck is not None:
        ts = load_checkpoint(ck[1], model=sae, optimizer=opt, ema=ema, dead_state=tracker.state_dict())
        step, tokens_seen = int(ts["step"]), int(ts["tokens_seen"])
        last_metrics = ts.get("metrics", {})
        store.load_state_dict(ts["store"])
        _set_rng_state(ts["rng"])
        truncate_jsonl(log_path, step)
        if progress:
            print(f"sae-train: resuming from {ck[1]} (step {step}, {tokens_seen} tokens)", file=sys.stderr)
    else:
        truncate_jsonl(log_path, -1)
        if sae_cfg.b_pre_init != "zeros":
            n_sample = max(1, math.ceil(tcfg.b_pre_sample_tokens / tcfg.batch_tokens))
            sampler = _open_store(store_path, tcfg.batch_tokens, seed, tcfg, device, sae_cfg.normalize)
            it0 = iter(sampler)
            try:
                sample = torch.cat([next(it0).float() for _ in range(n_sample)])
            except NonFiniteError as e:
                raise FloatingPointError(
                    f"non-finite activations in the b_pre sample (the first {n_sample} batches): {e}"
                ) from e
            finally:
                _close(sampler)
            if not torch.isfinite(sample).all():
                raise FloatingPointError("non-finite activations in the b_pre sample (first batches)")
            init_b_pre_(sae, sample, sae_cfg.b_pre_init)
        if ema is not None:
            ema.load_state_dict(sae.state_dict())

    jsonl = JsonlLogger(log_path)
    wb = WandbLogger(out, wandb_cfg, {"sae": asdict(sae_cfg), "trainer": asdict(tcfg), "seed": seed,
                                      "store_path": str(store_path), "hook_name": hook_name,
                                      "model_name": model_name})
    use_autocast = device.type == "cuda" and tcfg.bf16
    stop_at = n_steps if tcfg.max_steps is None else min(n_steps, tcfg.max_steps)

    from tqdm.auto import tqdm

    bar = tqdm(total=n_steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    t_last, tok_last = time.perf_counter(), tokens_seen
    t_start, tok_start = t_last, tokens_seen
    it = iter(store)
    try:
        while step < stop_at:
            try:
                x = next(it)
            except NonFiniteError as e:
                raise FloatingPointError(f"non-finite activations in the batch of step {step}: {e}") from e
            if not torch.isfinite(x).all():
                raise FloatingPointError(
                    f"non-finite activations (NaN/Inf) in the batch of step {step} from {store_path}"
                )
            x = x.to(device, torch.float32, non_blocking=True)
            lr = lr_at_step(step, n_steps, base_lr, tcfg.warmup_steps, tcfg.lr_decay_frac)
            for g in opt.param_groups:
                g["lr"] = lr
            dead = tracker.dead_mask()
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_autocast):
                res = sae.training_step_losses(x, dead)
            if not torch.isfinite(res.loss):
                raise FloatingPointError(
                    f"loss is {float(res.loss)} at step {step} (normalized_mse "
                    f"{float(res.normalized_mse)}, auxk {float(res.auxk_loss)}); lower trainer.lr"
                )
            opt.zero_grad(set_to_none=True)
            res.loss.backward()
            sae.remove_parallel_grads_()
            if tcfg.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), tcfg.grad_clip_norm)
            opt.step()
            sae.normalize_decoder_()
            if ema is not None:
                _ema_update(ema, sae, tcfg.ema_decay)
            tracker.update(res.values, res.indices)
            step += 1
            tokens_seen += x.shape[0]
            bar.update(1)

            if step % tcfg.log_every_steps == 0 or step == n_steps:
                now = time.perf_counter()
                tps = (tokens_seen - tok_last) / max(now - t_last, 1e-9)
                t_last, tok_last = now, tokens_seen
                nmse = float(res.normalized_mse)
                last_metrics = {
                    "train/loss": float(res.loss.detach()),
                    "train/fvu": nmse,
                    "train/normalized_mse": nmse,
                    "train/auxk_loss": float(res.auxk_loss),
                    "train/l0": float((res.values > 0).sum(-1).float().mean()),
                    "train/dead_fraction": tracker.dead_fraction(),
                    "train/lr": lr,
                    "train/tokens_per_s": tps,
                }
                if res.multi_topk_mse is not None:
                    last_metrics["train/multi_topk_mse"] = float(res.multi_topk_mse)
                jsonl.log({"step": step, "tokens": tokens_seen, **last_metrics})
                wb.log({**last_metrics, "tokens": tokens_seen}, step=step)
                bar.set_postfix(tokens=tokens_seen, loss=f"{last_metrics['train/loss']:.4f}",
                                fvu=f"{nmse:.4f}", L0=f"{last_metrics['train/l0']:.1f}",
                                dead=f"{100 * last_metrics['train/dead_fraction']:.1f}%",
                                tok_s=f"{tps:.0f}")

            if tcfg.keep_checkpoints != 0 and (step % tcfg.checkpoint_every_steps == 0 or step == n_steps):
                save_checkpoint(
                    ckpt_root, step, model=sae, optimizer=opt, ema=ema,
                    dead_state=tracker.state_dict(),
                    trainer_state={"step": step, "tokens_seen": tokens_seen,
                                   "store": store.state_dict(), "rng": _rng_state(),
                                   "metrics": last_metrics},
                    keep=tcfg.keep_checkpoints,
                )
    finally:
        bar.close()
        jsonl.close()
        _close(store)

    result = {"out_dir": str(out), "steps": step, "tokens_trained": tokens_seen,
              "metrics": last_metrics, "already_finished": False,
              "tokens_per_s": (tokens_seen - tok_start) / max(time.perf_counter() - t_start, 1e-9)}
    dead_frac, window = _dead_summary(tracker, tokens_seen)
    result.update(dead_fraction=dead_frac, dead_fraction_window=window)
    if step < n_steps:
        wb.finish()
        result.update(sae_dir=None, stopped_early=True)
        return result

    final = ema if ema is not None else sae
    export_sae(
        final, sae_dir, hook_name=hook_name, model_name=model_name,
        normalize=sae_cfg.normalize, scale=getattr(store, "scale", None),
        extra_cfg={"context_size": attrs.get("ctx_len"), "dataset_path": attrs.get("dataset"),
                   "training_tokens": tokens_seen},
    )
    training_state = {
        "tokens_trained": tokens_seen,
        "steps": step,
        "dead_fraction": dead_frac,
        "dead_fraction_window": window,
        "n_latents": sae_cfg.n_latents,
        "k": sae_cfg.k,
        "d_in": sae_cfg.d_in,
        "used_ema": ema is not None,
        "final_metrics": last_metrics,
        "sae_cfg": asdict(sae_cfg),
        "trainer_cfg": asdict(tcfg),
        "seed": seed,
    }
    tmp = state_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(training_state, indent=2))
    os.replace(tmp, state_file)
    wb.summary({"tokens_trained": tokens_seen, "dead_fraction": dead_frac})
    wb.finish()
    result.update(sae_dir=str(sae_dir), stopped_early=False)
    return result
