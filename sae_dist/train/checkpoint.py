"""Training checkpoints with torch.distributed.checkpoint (DCP).

Layout: `out_dir/checkpoints/step_00000100/` (DCP files). A checkpoint holds:
  model      SAE parameters (FQN keys from `get_model_state_dict`)
  optim      optimizer state (`get_optimizer_state_dict`, FQN-keyed so it reshards)
  ema        EMA parameters (when EMA is on)
  dead       dead-latent counters (tokens_since_fired, ever_fired)
  trainer    a pickled dict: step, tokens_seen, store state_dict, RNG states, last metrics
DCP works without a process group (single process) and, under torchrun, saves/loads shards.
Atomicity: DCP writes into `checkpoints/.tmp_step_XXXXXXXX`, which is renamed to its final name
only after the save returned; a process killed during a save leaves the previous checkpoint as the
latest valid one (temporary directories are ignored and cleaned on the next save).
"""

from __future__ import annotations

import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints",
           "checkpoint_dir_name"]

_STEP_RE = re.compile(r"^step_(\d{8})$")


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(ckpt_root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ckpt_root as (step, path), ascending by step. A directory counts
    only when it has DCP's `.metadata` file (written last by dcp.save)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / ".metadata").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(ckpt_root: str | Path) -> tuple[int, Path] | None:
    cks = list_checkpoints(ckpt_root)
    return cks[-1] if cks else None


def _quiet():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    return ctx


def save_checkpoint(
    ckpt_root: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: torch.nn.Module | None,
    dead_state: dict[str, torch.Tensor],
    trainer_state: dict,
    keep: int | None = None,
) -> Path:
    """Save a checkpoint for `step` atomically and keep only the `keep` newest (None: all).

    trainer_state: any picklable dict (step, tokens_seen, store state, RNG states, metrics).
    Returns the final checkpoint directory.
    """
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp_step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / checkpoint_dir_name(step)
    tmp = root / (".tmp_" + checkpoint_dir_name(step))
    opts = StateDictOptions(full_state_dict=False)
    state = {
        "model": get_model_state_dict(model, options=opts),
        "optim": get_optimizer_state_dict(model, optimizer, options=opts),
        "dead": dict(dead_state),
        "trainer": {"blob": pickle.dumps(trainer_state)},
    }
    if ema is not None:
        state["ema"] = {k: v for k, v in ema.state_dict().items()}
    ctx = _quiet()
    try:
        dcp.save(state, checkpoint_id=str(tmp))
    finally:
        ctx.__exit__(None, None, None)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if keep is not None and keep > 0:
        for _, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: torch.nn.Module | None,
    dead_state: dict[str, torch.Tensor],
) -> dict:
    """Load a checkpoint directory in place into model / optimizer / ema / dead_state tensors and
    return the trainer_state dict. RuntimeError from DCP if the checkpoint does not match (e.g. a
    different n_latents)."""
    opts = StateDictOptions(full_state_dict=False)
    state = {
        "model": get_model_state_dict(model, options=opts),
        "optim": get_optimizer_state_dict(model, optimizer, options=opts),
        "dead": dict(dead_state),
        "trainer": {"blob": b""},
    }
    if ema is not None:
        state["ema"] = {k: v for k, v in ema.state_dict().items()}
    ctx = _quiet()
    try:
        dcp.load(state, checkpoint_id=str(path))
    finally:
        ctx.__exit__(None, None, None)
    set_model_state_dict(model, state["model"], options=opts)
    set_optimizer_state_dict(model, optimizer, state["optim"], options=opts)
    if ema is not None:
        ema.load_state_dict(state["ema"])
    for k, v in dead_state.items():
        if v is not state["dead"][k]:
            v.copy_(state["dead"][k])
    return pickle.loads(state["trainer"]["blob"])
