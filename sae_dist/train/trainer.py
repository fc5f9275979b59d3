"""TopK SAE trainer (the recipe of Gao et al. 2024, "Scaling and evaluating sparse autoencoders",
sections 2 and Appendix A), single-process or over a dp x tp mesh (the same code under torchrun).

One loop, top to bottom: open the activation store (each dp rank reads its rows of every global
batch) -> tied init (mesh-independent, `init_rows`) + b_dec at the geometric median of the first
batches -> steps through an engine (torch Adam or DeepSpeed ZeRO: gradient component parallel to the
W_dec rows removed, W_dec rows renormalised after each step, optional clipping; EMA; bf16 autocast
on CUDA with fp32 master weights) -> AuxK against latents dead for `dead_tokens` tokens (counters
OR-reduced over dp) -> logs on global rank 0 (tqdm, jsonl, wandb; feature-density windows:
`sae_dist.train.density`) -> atomic, reshardable DCP checkpoints with exact resume -> export to
`out_dir/sae/`.
The model is built, then `sae_dist.parallel.tp.parallelize_sae` applies the mesh: with parallel tp > 1
each rank holds one latent shard of a TopK SAE; under data parallelism the ranks share the global
batch's statistics through the model's `comm`, and the engine sums the gradients over dp.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from sae_dist.lock import DirectoryBusyError, DirectoryLock
from sae_dist.parallel.comm import all_reduce_
from sae_dist.parallel.mesh import ParallelContext, init_parallel
from sae_dist.parallel.state import build_state, global_view
from sae_dist.parallel.tp import parallelize_sae
from sae_dist.preempt import Preemption
from sae_dist.sae.base import DeadLatentTracker, FeatureDensityWindow, SparseAutoencoder, TrainOutput
from sae_dist.sae.config import SAEConfig, resolve_dead_tokens
from sae_dist.sae.export import export_sae
from sae_dist.sae.init import init_b_dec_, tied_init_rows_
from sae_dist.sae.registry import architecture_class, build_sae
from sae_dist.store.errors import NonFiniteError
from sae_dist.store.layout import RENAMED_ATTRS
from sae_dist.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from sae_dist.train.config import TrainerConfig
from sae_dist.train.density import end_window, keep_on_first_dp_rank_, total_over_dp_
from sae_dist.train.engine import Engine, TorchEngine, budget_factor, default_lr, lr_at_step, make_optimizer
from sae_dist.train.heldout import evals_due
from sae_dist.train.logging import (
    FEATURE_DENSITY_PLOT,
    JsonlLogger,
    WandbLogger,
    saelens_eval_metrics,
    saelens_metrics,
    truncate_jsonl,
)

__all__ = ["TrainerConfig", "train", "make_optimizer"]


def _rng_state() -> dict:
    """The RNG states of this process: torch's CPU generator, Python's, NumPy's and, with CUDA, the current
    device's generator only (the one this rank uses: a job resumed on fewer visible GPUs restores it)."""
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict) -> None:
    """Restore `_rng_state`'s states; the CUDA one into the current device. A checkpoint of an older version
    holds one CUDA state per visible device: the current device's is restored, if it was saved."""
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    cuda = st.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, (list, tuple)):
        i = torch.cuda.current_device()
        cuda = cuda[i] if i < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def _open_store(data, batch_tokens, seed, tcfg: TrainerConfig, device, normalize,
                dp_rank: int = 0, dp_size: int = 1, ctx: ParallelContext | None = None):
    """The batch source of `data`: an ActivationStore over the store path, or `data(...)` for a source
    factory (e.g. a `functools.partial` of `sae_dist.harvest.stream.LMStream`) with the same keywords and
    `max_batches` (the run's steps: it computes nothing past them). Under tp > 1 in `ctx` both get the tp
    group as `share_group` with its tp rank 0 as `share_src`: that rank reads (or computes) the batches the
    group shares and broadcasts them, so a store is read once per dp rank, not once per GPU."""
    kw = dict(batch_tokens=batch_tokens, dp_rank=dp_rank, dp_size=dp_size, seed=seed, device=device,
              normalize=normalize)
    if ctx is not None and ctx.tp > 1:
        kw.update(share_group=ctx.tp_group, share_src=ctx.group_root + ctx.dp_rank * ctx.tp)
    if callable(data):
        return data(**kw, max_batches=max(1, tcfg.tokens // tcfg.batch_tokens))
    from sae_dist.store import ActivationStore

    return ActivationStore(data, shuffle=True, shuffle_shards=tcfg.shuffle_shards, prefetch=tcfg.prefetch, **kw)


def _close(obj) -> None:
    close = getattr(obj, "close", None)
    if callable(close):
        close()


@torch.no_grad()
def _ema_update(ema: SparseAutoencoder, sae: SparseAutoencoder, decay: float) -> None:
    e = [p for p in ema.parameters()]
    s = [p.detach() for p in sae.parameters()]
    torch._foreach_lerp_(e, s, 1.0 - decay)
    for eb, sb in zip(ema.buffers(), sae.buffers(), strict=True):  # running statistics (e.g. BatchTopK's threshold)
        eb.copy_(sb)
    ema.normalize_decoder_()


#: Options a checkpoint cannot be resumed under once changed: they fix parameter shapes, the loss or
#: the data order. Kept in checkpoints/run_identity.json and compared before any checkpoint is loaded.
_IDENTITY_KEYS = ("d_in", "d_sae", "k", "k_aux", "multi_topk", "normalize", "architecture", "options")

#: TrainerConfig fields that shape a finished run's result: a rerun of a finished run with other values
#: is refused (`_check_finished_run`). `tokens` is checked apart (a larger value continues training).
#: A mid-run resume accepts changes to them (e.g. a lower lr after a divergence); the rest of the
#: identity (`_run_identity`) is checked in both cases.
_RESULT_TRAINER_KEYS = ("lr", "adam_betas", "adam_eps", "warmup_steps", "lr_decay_frac", "ema", "ema_decay",
                        "grad_clip_norm", "bf16", "shuffle_shards", "b_dec_sample_tokens")


def _store_fingerprint(store, store_path, attrs: dict) -> dict:
    """What identifies a run's training data: the store's absolute path, width, rows, harvest origin
    and norm statistics (JSON-ready); attrs: the store's attributes. A source with its own `fingerprint()`
    (the LM stream) says itself."""
    if hasattr(store, "fingerprint"):
        return store.fingerprint()
    return {"path": str(Path(store_path).resolve()), "d_in": int(store.d_in),
            "n_tokens": getattr(store, "n_tokens", None), "model": attrs.get("model"),
            "hook_name": attrs.get("hook_name"), "norm_stats": attrs.get("norm_stats")}


def _run_identity(sae_cfg: SAEConfig, tcfg: TrainerConfig, seed: int, store_fp: dict) -> dict:
    """The options a resumed or rerun run must share with its checkpoints and export, as stored in
    `checkpoints/run_identity.json` (JSON round trip: tuples become lists)."""
    ident = {**{k: getattr(sae_cfg, k) for k in _IDENTITY_KEYS}, "batch_tokens": tcfg.batch_tokens,
             "seed": seed, "store": store_fp}
    return json.loads(json.dumps(ident))


def _renamed(d: dict, renames: dict) -> dict:
    """`d` with the keys of an earlier release renamed (`renames`: old -> new) where the new key is absent."""
    return {(renames[k] if k in renames and renames[k] not in d else k): v for k, v in d.items()}


def _differences(old: dict, new: dict, keys) -> list[str]:
    return [f"{k}: recorded {old.get(k)!r} != now {new[k]!r}" for k in keys if old.get(k) != new[k]]


def _check_run_identity(ckpt_root: Path, ident: dict, existing: bool, ctx: ParallelContext) -> None:
    """Record (new run, global rank 0) or verify (resume or rerun of a finished run, every rank) the
    run identity (`_run_identity`). The mesh (tp, dp) may change between runs: checkpoints reshard.

    Raises ValueError naming each changed option with its recorded and its new value.
    """
    path = ckpt_root / "run_identity.json"
    if existing and path.is_file():
        old = _renamed(json.loads(path.read_text()), {"n_latents": "d_sae"})
        old.setdefault("architecture", "topk")  # identities written before architectures existed
        old.setdefault("options", {})
        old.setdefault("store", ident["store"])  # identities written before the store was recorded
        if isinstance(old["store"], dict):  # a store recorded before a field existed, or renamed
            old["store"] = {**ident["store"], **_renamed(old["store"], RENAMED_ATTRS)}
        changed = _differences(old, ident, ident)
        if changed:
            raise ValueError(
                f"run directory {ckpt_root.parent} was trained with a different configuration or store ("
                + "; ".join(changed) + "). Use a new run_dir, or restore the recorded values."
            )
        return
    if ctx.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ident, indent=2))


def _check_finished_run(out: Path, done: dict, tcfg: TrainerConfig, target_tokens: int) -> None:
    """A finished run (sae/training_state.json) rerun with `tcfg`: ValueError naming every result-shaping
    trainer option that differs from the finished run's, and a token budget below what it trained."""
    old = _renamed(json.loads(json.dumps(done.get("trainer_cfg") or {})),
                   {"b_pre_sample_tokens": "b_dec_sample_tokens"})
    new = json.loads(json.dumps(asdict(tcfg)))
    changed = _differences(old, new, [k for k in _RESULT_TRAINER_KEYS if k in old])
    if int(done["tokens_trained"]) > target_tokens:
        changed.append(f"trainer.tokens: the run trained {done['tokens_trained']} tokens, now "
                       f"{tcfg.tokens} asks for {target_tokens}")
    if changed:
        raise ValueError(
            f"run directory {out} holds a finished run with other trainer options ("
            + "; ".join(changed) + "). Use a new run_dir, or restore the recorded values (a larger "
            "trainer.tokens continues the run)."
        )


def _lock_run_dir(out: Path, ctx: ParallelContext) -> DirectoryLock | None:
    """Global rank 0 takes the run directory's lock for the whole job; every rank raises
    DirectoryBusyError (naming the holder) when another process holds it."""
    lock, err = None, ""
    if ctx.is_main:
        lock = DirectoryLock(out, f"sae-train (world size {ctx.world_size})")
        try:
            lock.acquire()
        except DirectoryBusyError as e:
            err = str(e)
    err = _from_group_root(err, ctx)
    if err:
        raise DirectoryBusyError(err)
    return lock


def _from_group_root(obj, ctx: ParallelContext):
    """The group root's `obj` (any picklable object) on every rank of the context's group; `obj` itself in a
    single-process context. Collective over the group."""
    if not ctx.distributed:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=ctx.group_root, group=ctx.world_group)
    return box[0]


#: The eval.json contract's dead-latent window: a latent is dead when it did not fire in the last 10M
#: training tokens, or over the whole run when the run is shorter (docs/evaluation.md#evaljson-keys).
#: Independent of `SAEConfig.dead_tokens`, which only sets the AuxK threshold.
DEAD_WINDOW_TOKENS = 10_000_000


def _dead_summary(tracker: DeadLatentTracker, tokens_trained: int,
                  ctx: ParallelContext) -> tuple[float, str]:
    """Fraction of ALL latents (summed over tp shards) with no fire in the last min(10M,
    tokens_trained) tokens, and which window."""
    window = min(DEAD_WINDOW_TOKENS, tokens_trained)
    n_dead = all_reduce_((tracker.tokens_since_fired >= max(window, 1)).sum(), ctx.tp_group)
    frac = float(n_dead) / (tracker.d_sae * ctx.tp)
    if tokens_trained >= DEAD_WINDOW_TOKENS:
        return frac, f"no fire in the last {DEAD_WINDOW_TOKENS} training tokens"
    return frac, f"no fire over the whole run ({tokens_trained} training tokens < {DEAD_WINDOW_TOKENS})"


def _build_sae(sae_cfg: SAEConfig, ctx: ParallelContext, seed: int):
    """The SAE of `sae_cfg.architecture` (`sae_dist.sae.registry`) with the mesh applied
    (`parallelize_sae`: this rank's latent shard under tp > 1, built on the meta device first) and the
    mesh-independent tied init (`tied_init_rows_`): every mesh starts from the same global weights.
    Raises ValueError naming the architecture for tp > 1 on one that does not shard."""
    sae = build_sae(sae_cfg, device="meta" if ctx.tp > 1 else ctx.device)
    parallelize_sae(sae, ctx)
    tied_init_rows_(sae, seed, sae.latent_start)
    return sae


def _base_lr(tcfg: TrainerConfig, d_sae: int, n_steps: int, announce: bool) -> float:
    """`trainer.lr`, or the default rule for this width and run length (printed once when `announce`)."""
    if tcfg.lr is not None:
        return tcfg.lr
    lr = default_lr(d_sae, n_steps)
    if announce:
        print(f"sae-train: lr {lr:.3g} (default: the paper's 2e-4 / sqrt(n / 2^14) x {budget_factor(n_steps):.2f} "
              f"for a {n_steps}-step run; set trainer.lr to override)", file=sys.stderr)
    return lr


def _make_engine(sae, lr: float, tcfg: TrainerConfig, ctx: ParallelContext) -> Engine:
    """The `trainer.engine` (torch Adam or DeepSpeed ZeRO) over this rank's parameters of `sae`."""
    if tcfg.engine == "torch":
        return TorchEngine(sae, lr, tcfg)
    from sae_dist.train.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(sae, lr, tcfg, ctx, zero_stage=tcfg.zero_stage,
                           offload_optimizer=tcfg.offload_optimizer)


@torch.no_grad()
def _global_metrics(res, ctx: ParallelContext, tracker: DeadLatentTracker, lr: float, tps: float,
                    dp_mean: bool = False) -> dict:
    """Logged metrics of a step over the global batch (loss terms summed over dp for a sharded
    model, averaged over dp when `dp_mean` (whole-SAE replicas); L0 = non-zero latents per token
    summed over tp, averaged over all tokens)."""
    terms = [res.loss.detach().float(), res.fvu.float(), res.auxk_loss.float()]
    if res.multi_topk_fvu is not None:
        terms.append(res.multi_topk_fvu.float())
    extra = sorted(res.terms)
    terms += [res.terms[n].float() for n in extra]
    vec = torch.stack(terms)
    l0_sum = res.l0_sum if res.l0_sum is not None else (res.values > 0).sum()
    l0_sum = all_reduce_(l0_sum.to(torch.float64), ctx.tp_group)
    all_reduce_(vec, ctx.dp_group)  # sharded models return per-dp-rank shares of the loss
    if dp_mean:
        vec /= ctx.dp  # whole-SAE replicas: each rank's loss is over its own rows, so average
    l0_sum = all_reduce_(l0_sum, ctx.dp_group)
    n_tokens = res.x_hat.shape[0] * ctx.dp
    n_dead = all_reduce_(tracker.dead_mask().sum(), ctx.tp_group)
    m = {
        "train/loss": float(vec[0]),
        "train/fvu": float(vec[1]),
        "train/auxk_loss": float(vec[2]),
        "train/l0": float(l0_sum) / n_tokens,
        "train/dead_fraction": float(n_dead) / (tracker.d_sae * ctx.tp),
        "train/lr": lr,
        "train/tokens_per_s": tps,
    }
    if res.multi_topk_fvu is not None:
        m["train/multi_topk_fvu"] = float(vec[3])
    for i, n in enumerate(extra):
        m[f"train/{n}"] = float(vec[len(terms) - len(extra) + i])
    return m


def _init_b_dec(run: "_Run", data, seed: int) -> None:
    """b_dec at `sae_cfg.b_dec_init` of the first `b_dec_sample_tokens` tokens of the data order: the first
    global batches of a store (every rank gets the same ones, read once per tp group), or the first rows of a
    source with `sample_rows` (the LM stream's first window; rank 0's are broadcast). Raises FloatingPointError
    when the sample holds NaN/Inf."""
    sae_cfg, tcfg, ctx = run.sae_cfg, run.tcfg, run.ctx
    n_sample = max(1, math.ceil(tcfg.b_dec_sample_tokens / tcfg.batch_tokens))
    if hasattr(run.store, "sample_rows"):
        sample = run.store.sample_rows(n_sample * tcfg.batch_tokens)
    else:
        sampler = _open_store(data, tcfg.batch_tokens, seed, tcfg, ctx.device, sae_cfg.normalize, ctx=ctx)
        it0 = iter(sampler)
        try:
            sample = torch.cat([next(it0).float() for _ in range(n_sample)])
        except NonFiniteError as e:
            raise FloatingPointError(
                f"non-finite activations in the b_dec sample (the first {n_sample} batches): {e}"
            ) from e
        finally:
            _close(sampler)
    if not torch.isfinite(sample).all():
        raise FloatingPointError("non-finite activations in the b_dec sample (first batches)")
    init_b_dec_(run.sae, sample, sae_cfg.b_dec_init)
    if ctx.distributed:  # guard against any float difference between ranks
        torch.distributed.broadcast(run.sae.b_dec.data, src=ctx.group_root, group=ctx.world_group)


def _export_final(final, ctx: ParallelContext, sae_dir: Path, sae_cfg: SAEConfig, store, attrs: dict, hook_name,
                  model_name, tokens_seen: int) -> None:
    """Export the trained SAE to `sae_dir` (docs/formats.md): gathered over tp for a sharded SAE; by
    global rank 0 alone for a replicated one (concurrent writers would race on temporary names).
    attrs: the store's attributes."""
    export_kw = dict(hook_name=hook_name, model_name=model_name,
                     normalize=sae_cfg.normalize, scale=getattr(store, "scale", None),
                     extra_cfg={"context_size": attrs.get("ctx_len"), "dataset_path": attrs.get("dataset"),
                                "training_tokens": tokens_seen})
    if final.shardable and ctx.distributed:  # collective: every rank writes its latents
        from sae_dist.parallel.export import export_sae_sharded

        export_sae_sharded(final, ctx, sae_dir, **export_kw)
    elif ctx.is_main:
        export_sae(final, sae_dir, **export_kw)


def _show_progress(bar, m: dict, tokens_seen: int, tps: float) -> None:
    bar.set_postfix(tokens=tokens_seen, loss=f"{m['train/loss']:.4f}", fvu=f"{m['train/fvu']:.4f}",
                    L0=f"{m['train/l0']:.1f}", dead=f"{100 * m['train/dead_fraction']:.1f}%", tok_s=f"{tps:.0f}")


def _warn_if_auxk_cannot_fire(sae_cfg: SAEConfig, dead_tokens: int, target_tokens: int, main: bool) -> None:
    """A warning when no latent can be counted dead before the run ends, so AuxK (sec. 2.4.1) never runs."""
    from sae_dist.sae.topk import TopKSAE

    uses_auxk = issubclass(architecture_class(sae_cfg.architecture), TopKSAE)  # the TopK family
    if main and uses_auxk and sae_cfg.auxk_coef > 0 and dead_tokens >= target_tokens:
        print(f"sae-train: warning: sae.dead_tokens={dead_tokens} >= the run's {target_tokens} tokens: "
              "no latent can be counted dead, so the AuxK loss never runs. Lower sae.dead_tokens (null: a tenth "
              "of the run, at most the paper's 10M) or set sae.auxk_coef=0 to say so.", file=sys.stderr)


def train(
    *,
    store_path: str | os.PathLike | None = None,
    out_dir: str | os.PathLike,
    sae_cfg: SAEConfig,
    trainer_cfg: TrainerConfig,
    device: str | torch.device = "cpu",
    seed: int = 0,
    hook_name: str | None = None,
    model_name: str | None = None,
    wandb_cfg: dict | None = None,
    progress: bool = True,
    tp: int = 1,
    source=None,
    heldout=None,
) -> dict:
    """Train an SAE (`sae_cfg.architecture`, any of `sae_dist.sae.registry.ARCHITECTURES`) on an
    activation store or straight from the LM; resume from `out_dir/checkpoints` if present.

    Args:
      store_path: activation store (zarr v3, docs/formats.md#activation-store). Batches come normalised by
        the store with `sae_cfg.normalize`.
      source: instead of store_path, a batch-source factory called with the reader's keywords (batch_tokens,
        dp_rank, dp_size, seed, device, normalize), e.g. `functools.partial(LMStream, model=..., ...)`
        (`sae_dist.harvest.stream`: LM activations computed on the fly, no store).
      out_dir: run directory: `train_log.jsonl`, `checkpoints/step_XXXXXXXX/` (DCP), `wandb/`,
        `sae/` (export: cfg.json, sae_weights.safetensors, training_state.json).
      sae_cfg, trainer_cfg: see SAEConfig / TrainerConfig. device: "cpu" | "cuda" | torch.device.
      seed: init and data-order seed. hook_name / model_name: for cfg.json (default: the store's
        `hook` / `model` attributes). wandb_cfg: {project, mode, group, name, enabled}.
      progress: show a tqdm bar (tokens, loss, fvu, L0, dead %, tokens/s).
      tp: tensor-parallel degree (latent shards). Under torchrun (WORLD_SIZE > 1) the process group
        and the dp x tp mesh are initialised here (`sae_dist.parallel.mesh.init_parallel`); dp =
        world size / tp, each dp rank reads its rows of every global batch of batch_tokens.
      heldout: a `sae_dist.train.heldout.HeldoutEval` (the LM and held-out contexts), or a loader: a function of
        the number of contexts returning one or None, called on dp replica 0 once the run directory is locked and
        only when an evaluation step is ahead (`_open_heldout`; sae-train passes `sae_dist.cli.heldout_eval`'s): every
        `trainer.eval_every_steps` steps dp replica 0 evaluates the SAE spliced into the LM on them and global
        rank 0 logs eval/... records. Under tp > 1 give it on every tp rank of dp replica 0 (they splice the
        latent shards together; if one lacks it, none runs it); other ranks ignore it. None: no held-out
        evaluation.
    Returns a dict: out_dir, sae_dir (None if stopped early), steps, tokens_trained, final metrics
      (`train/...` keys), dead_fraction, dead_fraction_window, already_finished, stopped_early.
    Raises ValueError "store d_in X != SAE d_in Y" on a width mismatch; FloatingPointError
      naming the step when a batch or the loss is NaN/Inf.
    Resume is exact: the same losses (bit-for-bit on CPU fp32) as an uninterrupted run.
    """
    return train_grid(points=[GridPoint(out_dir, sae_cfg, trainer_cfg, wandb_cfg)], store_path=store_path,
                      source=source, device=device, seed=seed, hook_name=hook_name, model_name=model_name,
                      progress=progress, tp=tp, heldout=heldout)[0]


@dataclass
class GridPoint:
    """One SAE of a shared sweep (`train_grid`): its run directory, options and wandb settings."""

    out_dir: str | os.PathLike
    sae_cfg: SAEConfig
    trainer_cfg: TrainerConfig
    wandb_cfg: dict | None = None


#: Options every point of a shared sweep shares: they fix the one batch stream (its length, batch, order
#: and normalisation) or the process (deterministic mode).
GRID_SHARED_KEYS = ("trainer.tokens", "trainer.batch_tokens", "trainer.shuffle_shards", "trainer.prefetch",
                    "trainer.b_dec_sample_tokens", "trainer.max_steps", "trainer.deterministic", "sae.d_in",
                    "sae.normalize")


def _check_grid(points: list[GridPoint]) -> list[Path]:
    """The points' run directories (created); ValueError naming the option when two points differ in a
    `GRID_SHARED_KEYS` option or share a run directory, or when a run directory is a file."""
    if not points:
        raise ValueError("train_grid needs at least one point")
    for i, p in enumerate(points[1:], 1):
        for key in GRID_SHARED_KEYS:
            node, name = key.split(".")
            a, b = (getattr(q.sae_cfg if node == "sae" else q.trainer_cfg, name) for q in (points[0], p))
            if a != b:
                raise ValueError(f"grid point {i} has {key}={b!r} but point 0 has {a!r}: the points of a shared "
                                 "sweep train on one batch stream; give them the same value, or run them as "
                                 "separate runs (a Hydra multirun, -m)")
    outs = [Path(p.out_dir) for p in points]
    if len({o.resolve() for o in outs}) != len(outs):
        raise ValueError(f"grid points share a run directory ({[str(o) for o in outs]}): give each its own")
    for out in outs:
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"run_dir {out} is a file, not a directory: choose another run_dir")
        out.mkdir(parents=True, exist_ok=True)
    return outs


def train_grid(*, points: list[GridPoint], store_path: str | os.PathLike | None = None, source=None,
               device: str | torch.device = "cpu", seed: int = 0, hook_name: str | None = None,
               model_name: str | None = None, progress: bool = True, tp: int = 1, groups: int = 1,
               heldout=None) -> list[dict]:
    """Train several SAEs on ONE stream of batches (a shared sweep): each batch is read from the store, or
    computed by the LM, once and stepped by every point. Each point has its own run directory, checkpoints,
    log, wandb run, RNG stream and export, and ends exactly as `train` with the same arguments would (the
    same weights: the points' RNG states are swapped in around their steps). Points differ in their SAE
    (architecture, d_sae, k, ...) and optimisation options; `GRID_SHARED_KEYS` must agree. A resumed grid
    restarts the stream at the earliest checkpoint; points ahead of it wait for their step.

    Args: points (at least one); store_path / source, device, seed, hook_name, model_name, progress, tp, heldout
      as `train`'s (one held-out evaluation for every point, each at its own trainer.eval_every_steps); groups:
      under a launcher, split the job into this many groups of consecutive ranks (`init_parallel`), group g
      training points g, g + groups, ... on its own dp x tp mesh with its own batch stream (1: every point on
      the whole mesh, one stream).
    Returns one `train` result per point of this process's group, in order. Raises ValueError
    (`_check_grid`; also for the DeepSpeed engine with groups > 1) and what `train` raises.
    """
    if (store_path is None) == (source is None):
        raise ValueError("give exactly one of store_path (an activation store) or source (e.g. an LM stream)")
    outs = _check_grid(points)
    if groups > 1 and any(p.trainer_cfg.engine != "torch" for p in points):
        raise ValueError(f"parallel.grid_groups={groups} runs each group on its own mesh, which "
                         "trainer.engine=deepspeed does not support: use trainer.engine=torch")
    ctx = init_parallel(tp, torch.device(device), groups=groups)
    points, outs = points[ctx.grid_index :: ctx.grid_groups], outs[ctx.grid_index :: ctx.grid_groups]
    if not points:
        return []
    with contextlib.ExitStack() as locks:
        for out in outs:
            lock = _lock_run_dir(out, ctx)
            if lock is not None:
                locks.callback(lock.release)
        with _deterministic_mode(points[0].trainer_cfg.deterministic, ctx.device):
            return _train_locked(source if source is not None else store_path, outs, points, ctx, seed,
                                 (hook_name, model_name), progress, heldout)


def _agreed_heldout(heldout, ctx: ParallelContext):
    """`heldout` as `train_grid` uses it: under tp > 1 the tp ranks of dp replica 0 splice the SAE's shards together
    (collectives over their tp group), so unless every one of them has a held-out evaluation none runs it (a
    notice on the group's first rank). Collective over that tp group; other ranks return `heldout` unchanged."""
    if ctx.tp == 1 or ctx.dp_rank != 0:
        return heldout
    have = torch.tensor([heldout is not None], dtype=torch.int32, device=ctx.device)
    if int(all_reduce_(have, ctx.tp_group, op=torch.distributed.ReduceOp.MIN)) == 1:
        return heldout
    if heldout is not None and ctx.is_main:
        print("sae-train: held-out evaluation off (trainer.eval_every_steps): a tensor-parallel rank of dp replica 0 "
              "has none (its LM or text did not load; see its notice), and every tp rank runs it", file=sys.stderr)
    return None


@contextlib.contextmanager
def _deterministic_mode(enabled: bool, device: torch.device):
    """`TrainerConfig.deterministic`: deterministic torch algorithms inside the block, the previous
    setting restored after it. cuBLAS needs CUBLAS_WORKSPACE_CONFIG for reproducible GEMMs (PyTorch's
    reproducibility notes); it is set here, before the run's first CUDA matmul, unless the user set it."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _open_training_store(data, sae_cfg: SAEConfig, tcfg: TrainerConfig, seed: int, ctx: ParallelContext):
    """This rank's batch source (`_open_store`); ValueError (source closed) when its width is not sae_cfg.d_in."""
    store = _open_store(data, tcfg.batch_tokens, seed, tcfg, ctx.device, sae_cfg.normalize,
                        dp_rank=ctx.dp_rank, dp_size=ctx.dp, ctx=ctx)
    if int(store.d_in) != int(sae_cfg.d_in):
        _close(store)
        raise ValueError(
            f"store d_in {store.d_in} != SAE d_in {sae_cfg.d_in}: set sae.d_in to the "
            f"store's width ({store.d_in}) or use a store harvested at a hook of width {sae_cfg.d_in}"
        )
    return store


@dataclass
class _Run:
    """One training run between steps: what `_setup_run` builds and the loop advances."""

    sae: SparseAutoencoder
    engine: Engine
    ema: SparseAutoencoder | None
    tracker: DeadLatentTracker
    store: object
    ctx: ParallelContext
    sae_cfg: SAEConfig
    tcfg: TrainerConfig
    out: Path
    n_steps: int
    base_lr: float
    dead_tokens: int
    step: int = 0
    tokens_seen: int = 0
    last_metrics: dict = field(default_factory=dict)
    auxk_from: int | None = None
    rng: dict | None = None  # this run's RNG states between its steps (`_rng_state`)
    store_state: dict | None = None  # the data position of the checkpoint it resumed from
    wb: object = None  # WandbLogger
    log: tuple | None = None  # (progress bar, jsonl logger, [time, tokens] of the last log) during the loop
    density: FeatureDensityWindow | None = None  # the feature-density window (trainer.feature_density_every_steps)

    @property
    def replicas(self) -> bool:
        """Whole-SAE replicas over dp (an architecture that does not shard): per-rank losses, averaged."""
        return self.sae.comm.dp > 1 and not self.sae.shardable

    @property
    def stop_at(self) -> int:
        """The step the loop stops this run at: the run's end or `trainer.max_steps`."""
        return self.n_steps if self.tcfg.max_steps is None else min(self.n_steps, self.tcfg.max_steps)

    def state(self, opt_state=None) -> dict:
        """The checkpointed state (model, Adam, EMA, dead-latent counters, the feature-density window's
        counts) under global shapes."""
        opt_state = self.engine.optimizer_state() if opt_state is None else opt_state
        state = build_state(self.sae, opt_state, self.ema, self.tracker.state_dict(), self.ctx)
        if self.density is not None:
            state["density"] = {"fire_counts": global_view(self.density.fire_counts, 0, self.ctx)}
        return state

    def checkpoint(self) -> None:
        trainer_state = {"step": self.step, "tokens_seen": self.tokens_seen, "store": self.store.state_dict(),
                         "rng": self.rng, "metrics": self.last_metrics}
        if self.density is not None:  # the window's counts, replicated over dp while saved
            total_over_dp_(self.density, self.ctx)
            trainer_state["feature_density_tokens"] = self.density.n_tokens
        save_checkpoint(self.out / "checkpoints", self.step, state=self.state(), keep=self.tcfg.keep_checkpoints,
                        ctx=self.ctx, trainer_state=trainer_state)
        if self.density is not None:
            keep_on_first_dp_rank_(self.density, self.ctx)


def _train_locked(data, outs: list[Path], points: list[GridPoint], ctx: ParallelContext, seed: int, names: tuple,
                  progress: bool, heldout=None) -> list[dict]:
    """`train_grid` once every run directory's lock is held: open the batch source, check and set up each
    point (finished points are reported and skipped), position the source, step (with the held-out evaluation
    `heldout` or None), finalise."""
    store = _open_training_store(data, points[0].sae_cfg, points[0].trainer_cfg, seed, ctx)
    try:
        attrs = dict(getattr(store, "attrs", {}) or {})
        names = (names[0] or attrs.get("hook_name"), names[1] or attrs.get("model"))
        results: list[dict | None] = [None] * len(points)
        runs: list[tuple[int, _Run]] = []
        for i, (p, out) in enumerate(zip(points, outs, strict=True)):
            results[i], run = _prepare_point(store, data, attrs, out, p, ctx, seed, names, progress)
            if run is not None:
                runs.append((i, run))
        if not runs:
            return results
        heldout = _open_heldout(heldout, [r for _, r in runs], ctx)  # loaded now: the runs are locked, not done
        resumed = [r for _, r in runs if r.store_state is not None]
        if len(resumed) == len(runs):  # every point resumed: the stream restarts at the earliest checkpoint
            store.load_state_dict(min(resumed, key=lambda r: r.step).store_state)
        t0, tok0 = time.perf_counter(), [r.tokens_seen for _, r in runs]
        preempted = _train_loop([r for _, r in runs], data, progress, heldout)
        wall = max(time.perf_counter() - t0, 1e-9)
        for (i, run), t in zip(runs, tok0, strict=True):
            results[i] = _finish_point(run, data, attrs, names, seed, preempted, (run.tokens_seen - t) / wall)
        return results
    finally:
        _close(store)


def _prepare_point(store, data, attrs: dict, out: Path, p: GridPoint, ctx: ParallelContext, seed: int, names: tuple,
                   progress: bool) -> tuple[dict | None, _Run | None]:
    """(the result of a point finished before, None) or (None, the point's run: built, resumed or initialised,
    its wandb run open and its RNG states kept in `run.rng`)."""
    sae_cfg, tcfg = p.sae_cfg, p.trainer_cfg
    n_steps = max(1, tcfg.tokens // tcfg.batch_tokens)
    finished, ck = _check_inputs(store, data, attrs, out, sae_cfg, tcfg, seed, n_steps, ctx)
    if finished is not None:
        return finished, None
    run = _setup_run(store, out, sae_cfg, tcfg, ctx, seed, n_steps)
    _resume_or_init(run, ck, data, seed, progress)
    run.rng = _rng_state()
    wandb_cfg = p.wandb_cfg if ctx.is_main else {**(p.wandb_cfg or {}), "enabled": False}
    run.wb = WandbLogger(out, wandb_cfg, {"sae": asdict(sae_cfg), "trainer": asdict(tcfg), "seed": seed,
                                          "store_path": str(data) if not callable(data) else "source=lm",
                                          "hook_name": names[0], "model_name": names[1],
                                          "parallel": {"tp": ctx.tp, "dp": ctx.dp}})
    _warn_if_auxk_cannot_fire(sae_cfg, run.dead_tokens, n_steps * tcfg.batch_tokens, ctx.is_main)
    return None, run


def _finish_point(run: _Run, data, attrs: dict, names: tuple, seed: int, preempted: bool, tps: float) -> dict:
    """A run's result after the loop (`train`'s return value); exports it when it reached its last step."""
    ctx = run.ctx
    result = {"out_dir": str(run.out), "steps": run.step, "tokens_trained": run.tokens_seen,
              "metrics": run.last_metrics, "already_finished": False, "preempted": preempted, "tokens_per_s": tps,
              "parallel": {"tp": ctx.tp, "dp": ctx.dp, "world_size": ctx.world_size}}
    dead_frac, window = _dead_summary(run.tracker, run.tokens_seen, ctx)
    result.update(dead_fraction=dead_frac, dead_fraction_window=window)
    if run.step < run.n_steps:
        run.wb.finish()
        return {**result, "sae_dir": None, "stopped_early": True}
    _finalize(run, data, attrs, names[0], names[1], seed, run.wb, dead_frac, window)
    return {**result, "sae_dir": str(run.out / "sae"), "stopped_early": False}


def _check_inputs(store, store_path, attrs: dict, out: Path, sae_cfg: SAEConfig, tcfg: TrainerConfig, seed: int,
                  n_steps: int, ctx: ParallelContext):
    """Record or verify the run identity (`_check_run_identity`); for a finished run also its trainer
    options (`_check_finished_run`). Returns (the result of an already finished run, or None; the latest
    checkpoint or None). Raises ValueError naming what changed."""
    target_tokens = n_steps * tcfg.batch_tokens
    sae_dir = out / "sae"
    state_file = sae_dir / "training_state.json"
    # The group root reads the run directory and every rank takes its view: on a shared filesystem with
    # attribute caching a node may list an older state, and ranks resuming from different checkpoints (or
    # one of them afresh) would hang in mismatched collectives.
    view = None
    if ctx.is_main:
        view = (json.loads(state_file.read_text()) if state_file.is_file() else None,
                latest_checkpoint(out / "checkpoints"))
    done, ck = _from_group_root(view, ctx)
    ident = _run_identity(sae_cfg, tcfg, seed, _store_fingerprint(store, store_path, attrs))
    _check_run_identity(out / "checkpoints", ident, existing=ck is not None or done is not None, ctx=ctx)
    if done is None or int(done.get("tokens_trained", -1)) < target_tokens:
        return None, ck
    _check_finished_run(out, done, tcfg, target_tokens)
    if ctx.is_main:
        print(f"sae-train: {out} already finished ({done['tokens_trained']} tokens, same store and "
              "configuration); nothing to do (use a new run_dir to retrain)", file=sys.stderr)
    return {**done, "metrics": done.get("final_metrics", {}), "out_dir": str(out), "sae_dir": str(sae_dir),
            "already_finished": True, "stopped_early": False, "preempted": False}, ck


def _setup_run(store, out: Path, sae_cfg: SAEConfig, tcfg: TrainerConfig, ctx: ParallelContext, seed: int,
               n_steps: int) -> _Run:
    """Seed the RNGs, build the SAE (mesh applied), its engine, the EMA copy and the dead-latent tracker."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    sae = _build_sae(sae_cfg, ctx, seed)
    base_lr = _base_lr(tcfg, sae_cfg.d_sae, n_steps, announce=ctx.is_main)
    engine = _make_engine(sae, base_lr, tcfg, ctx)
    ema = None
    if tcfg.ema:
        ema = _build_sae(sae_cfg, ctx, seed)
        ema.requires_grad_(False)
    dead_tokens = resolve_dead_tokens(sae_cfg.dead_tokens, n_steps * tcfg.batch_tokens)
    tracker = DeadLatentTracker(sae.W_dec.shape[0], dead_tokens, device=ctx.device)
    density = FeatureDensityWindow(tracker.d_sae, ctx.device) if tcfg.feature_density_every_steps else None
    return _Run(sae, engine, ema, tracker, store, ctx, sae_cfg, tcfg, out, n_steps, base_lr, dead_tokens,
                density=density)


def _resume_or_init(run: _Run, ck, data, seed: int, progress: bool) -> None:
    """Resume from checkpoint `ck` (weights, Adam, EMA, counters, RNG, the log cut back to its step; its data
    position kept in `run.store_state`) or start afresh (b_dec from the data, empty log). ValueError for a
    checkpoint past the run."""
    log_path = run.out / "train_log.jsonl"
    main = run.ctx.is_main
    if ck is None:
        if main:
            truncate_jsonl(log_path, -1)
        if run.sae_cfg.b_dec_init != "zeros":
            _init_b_dec(run, data, seed)
        if run.ema is not None:
            run.ema.load_state_dict(run.sae.state_dict())
        return
    opt_state = run.engine.optimizer_state()  # live: tensors, or DeepSpeed's ZeRO pieces (RankPart)
    ts = load_checkpoint(ck[1], state=run.state(opt_state), ctx=run.ctx, optional=("density",))
    run.engine.load_optimizer_state(opt_state)
    run.step, run.tokens_seen = int(ts["step"]), int(ts["tokens_seen"])
    if run.step > run.n_steps:
        raise ValueError(f"the checkpoint {ck[1]} is at step {run.step}, past this run's {run.n_steps} steps "
                         f"(trainer.tokens={run.tcfg.tokens}): raise trainer.tokens or use a new run_dir")
    run.last_metrics = ts.get("metrics", {})
    run.store_state = ts["store"]
    if run.density is not None:  # a checkpoint without the window (sae_dist.train.density) restarts it
        run.density.n_tokens = int(ts.get("feature_density_tokens", 0))
        keep_on_first_dp_rank_(run.density, run.ctx)
    _set_rng_state(ts["rng"])
    if main:
        truncate_jsonl(log_path, run.step)
    if progress and main:
        print(f"sae-train: resuming from {ck[1]} (step {run.step}, {run.tokens_seen} tokens)", file=sys.stderr)


def _next_batch(it, run: _Run, store_path) -> torch.Tensor:
    """The next batch on the run's device, float32 [B / dp, d_in]; FloatingPointError naming the step on
    NaN/Inf."""
    try:
        x = next(it)
    except NonFiniteError as e:
        raise FloatingPointError(f"non-finite activations in the batch of step {run.step}: {e}") from e
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"non-finite activations (NaN/Inf) in the batch of step {run.step} from {store_path}")
    return x.to(run.ctx.device, torch.float32, non_blocking=True)


def _train_step(run: _Run, x: torch.Tensor) -> tuple[TrainOutput, float]:
    """One optimisation step on batch x (Gao et al. 2024, sections 2 and A): lr, losses (bf16 autocast on
    CUDA), the engine's step, EMA, dead-latent counters. Every collective goes through `sae.comm`
    (identities on one process). Returns (the step's losses, its lr).
    FloatingPointError when the loss summed over dp is not finite (every rank agrees to stop)."""
    sae, comm, tcfg = run.sae, run.sae.comm, run.tcfg
    lr = lr_at_step(run.step, run.n_steps, run.base_lr, tcfg.warmup_steps, tcfg.lr_decay_frac)
    run.engine.set_lr(lr)
    sae.set_progress(run.step, run.n_steps)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda and tcfg.bf16):
        res = sae.training_step_losses(x, run.tracker.dead_mask())
    loss_all = comm.sum_over_dp_(res.loss.detach().float().clone())  # tp ranks are identical
    if run.replicas:
        loss_all /= comm.dp
    if not torch.isfinite(loss_all):
        raise FloatingPointError(f"loss is {float(loss_all)} at step {run.step} (fvu "
                                 f"{float(res.fvu)}, auxk {float(res.auxk_loss)}); lower trainer.lr")
    run.engine.step(res.loss / comm.dp if run.replicas else res.loss)
    if run.ema is not None:
        _ema_update(run.ema, sae, tcfg.ema_decay)
    counts = res.latent_fire_counts(run.tracker.d_sae)  # this rank's rows
    fired = comm.max_over_dp_((counts > 0).to(torch.uint8)).bool()  # fired anywhere in the global batch
    n_tokens = tcfg.batch_tokens if comm.dp > 1 else x.shape[0]  # the global batch
    run.tracker.update_fired(fired, n_tokens)
    if run.density is not None:
        run.density.add_(counts, n_tokens)
    run.step += 1
    run.tokens_seen += n_tokens
    return res, lr


def _train_loop(runs: list[_Run], store_path, progress: bool, heldout=None) -> bool:
    """Steps every run to its end, `trainer.max_steps` or an agreed SIGTERM, with logs, the held-out evaluation
    (`_evaluate_heldout`, when given) and checkpoints: one batch per global step, stepped by each run at that
    step (a resumed run ahead of the others waits). Closes the logs and engines. Returns whether it stopped on
    SIGTERM."""
    ctx, store = runs[0].ctx, runs[0].store
    step, preempted, it = min(r.step for r in runs), False, iter(store)
    _open_logs(runs, progress)
    with Preemption("sae-train") as preempt:
        try:
            while not preempted and any(r.step < r.stop_at for r in runs):
                now = [r for r in runs if r.step == step and r.step < r.stop_at]
                x = _next_batch(it, now[0] if now else runs[0], store_path)
                for run in now:
                    _set_rng_state(run.rng)
                    res, lr = _train_step(run, x)
                    run.rng = _rng_state()
                    _after_step(run, res, lr)
                    if heldout is not None:
                        _evaluate_heldout(heldout, run, runs)
                step += 1
                preempted = preempt.agreed(ctx.device, ctx.world_group) and any(r.step < r.n_steps for r in runs)
                for run in now:
                    due = run.step % run.tcfg.checkpoint_every_steps == 0 or run.step == run.n_steps
                    if run.tcfg.keep_checkpoints != 0 and (due or (preempted and run.step < run.n_steps)):
                        run.checkpoint()
        finally:
            for run in runs:
                run.log[0].close()
                if run.log[1] is not None:
                    run.log[1].close()
                run.engine.close()
            _close(store)
    if preempted and ctx.is_main:
        print(f"sae-train: stopped on SIGTERM after step {step} (checkpoint written); rerun the same "
              f"command to resume", file=sys.stderr)
    return preempted


def _evaluate_heldout(heldout, run: _Run, runs: list[_Run]) -> None:
    """At a multiple of `run`'s trainer.eval_every_steps, on dp replica 0 (every tp rank of it): the held-out
    evaluation (`HeldoutEval.measure`) of the SAE the run would export (the EMA when on) on its
    trainer.eval_contexts contexts, logged by global rank 0 to train_log.jsonl (eval/<key>, after the step's
    record) and wandb (`saelens_eval_metrics`); its wall time is left out of every run's next tokens_per_s."""
    every = run.tcfg.eval_every_steps
    if every <= 0 or run.step % every or run.ctx.dp_rank != 0:
        return
    t0 = time.perf_counter()
    m = heldout.measure(run.ema if run.ema is not None else run.sae, normalize=run.sae_cfg.normalize,
                        scale=getattr(run.store, "scale", None), n_contexts=run.tcfg.eval_contexts)
    if run.ctx.is_main:
        run.log[1].log({"step": run.step, "tokens": run.tokens_seen, **{f"eval/{k}": v for k, v in m.items()}})
        run.wb.log(saelens_eval_metrics(m), step=run.step)
    for r in runs:
        r.log[2][0] += time.perf_counter() - t0


def _open_heldout(heldout, runs: list[_Run], ctx: ParallelContext):
    """The held-out evaluation the loop uses: `heldout` itself, or when it is a loader (a function of the number of
    contexts) what it returns, called only on dp replica 0 and only when a run has an evaluation step ahead
    (`evals_due`; so a finished, resumed-past-it or evaluation-free run loads no LM); then agreed over tp
    (`_agreed_heldout`). A loader that raises turns the evaluation off with a notice rather than failing one rank
    (the others would wait for it until the collective timeout)."""
    if callable(heldout):
        due = [r for r in runs if evals_due(r.tcfg.eval_every_steps, r.step, r.stop_at)]
        try:
            heldout = heldout(max(r.tcfg.eval_contexts for r in due)) if due and ctx.dp_rank == 0 else None
        except Exception as e:  # noqa: BLE001 (any failure to load: train without the evaluation)
            print(f"sae-train: held-out evaluation off (trainer.eval_every_steps): {type(e).__name__}: {e}",
                  file=sys.stderr)
            heldout = None
    return _agreed_heldout(heldout, ctx)


def _open_logs(runs: list[_Run], progress: bool) -> None:
    """Each run's progress bar (one line per run, named after its directory in a grid), jsonl log (global
    rank 0) and log clock, in `run.log`."""
    from tqdm.auto import tqdm

    main = runs[0].ctx.is_main
    for i, run in enumerate(runs):
        bar = tqdm(total=run.n_steps, initial=run.step, disable=not (progress and main), unit="step",
                   dynamic_ncols=True, position=i, desc=run.out.name if len(runs) > 1 else None)
        jsonl = JsonlLogger(run.out / "train_log.jsonl") if main else None
        run.log = (bar, jsonl, [time.perf_counter(), run.tokens_seen])


def _after_step(run: _Run, res: TrainOutput, lr: float) -> None:
    """The progress bar, and every `log_every_steps` and at the end of a feature-density window the global
    metrics (collective) to the logs."""
    run.log[0].update(1)
    density_due = run.density is not None and run.step % run.tcfg.feature_density_every_steps == 0
    if density_due or run.step % run.tcfg.log_every_steps == 0 or run.step == run.n_steps:
        _log_step(run, res, lr, run.log[2], run.log[0], run.log[1], run.wb,
                  end_window(run.density, run.ctx, run.out, run.step) if density_due else None)


def _log_step(run: _Run, res: TrainOutput, lr: float, clock: list, bar, jsonl, wb, density=None) -> None:
    """The global metrics of this step (`_global_metrics`, collective) to jsonl, wandb and the progress
    bar on rank 0, with a feature-density window's (`end_window`: summaries, histogram) when given;
    announces AuxK's first activation. clock: [time, tokens] of the last log, updated."""
    now = time.perf_counter()
    tps = (run.tokens_seen - clock[1]) / max(now - clock[0], 1e-9)
    clock[:] = [now, run.tokens_seen]
    m = run.last_metrics = _global_metrics(res, run.ctx, run.tracker, lr, tps, dp_mean=run.replicas)
    if not run.ctx.is_main:
        return
    rec = m if density is None else {**m, **density[0]}
    jsonl.log({"step": run.step, "tokens": run.tokens_seen, **rec})
    wb.log(saelens_metrics(rec, run.tokens_seen, run.sae_cfg.d_sae), step=run.step,
           histograms=None if density is None else {FEATURE_DENSITY_PLOT: density[1]})
    _show_progress(bar, m, run.tokens_seen, tps)
    if run.auxk_from is None and m["train/auxk_loss"] > 0:
        run.auxk_from = run.step
        bar.write(f"sae-train: AuxK active from step {run.step} ({run.tokens_seen} tokens): "
                  f"{100 * m['train/dead_fraction']:.2f}% of the latents have not fired in {run.dead_tokens} "
                  "tokens (sae.dead_tokens)", file=sys.stderr)


def _finalize(run: _Run, store_path, attrs: dict, hook_name, model_name, seed: int, wb, dead_frac: float,
              window: str) -> None:
    """Export the SAE (the EMA when on) to out/sae and write sae/training_state.json (rank 0, atomically)."""
    ctx, sae_cfg = run.ctx, run.sae_cfg
    final = run.ema if run.ema is not None else run.sae
    _export_final(final, ctx, run.out / "sae", sae_cfg, run.store, attrs, hook_name, model_name, run.tokens_seen)
    training_state = {
        "tokens_trained": run.tokens_seen, "steps": run.step, "dead_fraction": dead_frac,
        "dead_fraction_window": window, "d_sae": sae_cfg.d_sae, "k": sae_cfg.k, "d_in": sae_cfg.d_in,
        "used_ema": run.ema is not None, "auxk_active_from_step": run.auxk_from, "dead_tokens": run.dead_tokens,
        "final_metrics": run.last_metrics, "sae_cfg": asdict(sae_cfg), "trainer_cfg": asdict(run.tcfg),
        "seed": seed, "parallel": {"tp": ctx.tp, "dp": ctx.dp},
    }
    if ctx.is_main:
        state_file = run.out / "sae" / "training_state.json"
        tmp = state_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(training_state, indent=2))
        os.replace(tmp, state_file)
        wb.summary({"tokens_trained": run.tokens_seen, "dead_fraction": dead_frac})
        wb.log_sae(run.out / "sae", f"sae-{run.out.name}")
    wb.finish()
    ctx.barrier()
