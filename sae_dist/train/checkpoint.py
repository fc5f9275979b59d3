"""Training checkpoints with torch.distributed.checkpoint (DCP), reshardable across meshes.

Layout: `out_dir/checkpoints/step_00000100/` (DCP files). A checkpoint holds the state dict of
`sae_dist.parallel.state.build_state` (model, optim, ema, dead; every tensor under its GLOBAL shape,
DTensors over the dp x tp mesh in a distributed run, so a checkpoint saved at one mesh resumes at
another) plus `trainer`: a pickled dict (step, tokens_seen, store state_dict, RNG states, metrics).
Atomicity: all ranks write into `checkpoints/.tmp_step_XXXXXXXX`; after every rank returned from
dcp.save (a barrier), global rank 0 renames it to its final name, so a process killed during a save
leaves the previous checkpoint as the latest valid one (temporary directories are ignored and
cleaned on the next save: the trainer saves only while it holds the run directory's lock,
`sae_dist.lock`, so any other temporary directory is a dead process's). The checkpoint directory must
be on a filesystem all ranks share.
"""

from __future__ import annotations

import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints",
           "checkpoint_dir_name", "read_checkpoint_tensors"]

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


def _barrier(ctx) -> None:
    if ctx is not None and ctx.distributed:
        ctx.barrier()


def save_checkpoint(
    ckpt_root: str | Path,
    step: int,
    *,
    state: dict,
    trainer_state: dict,
    keep: int | None = None,
    ctx=None,
) -> Path:
    """Save a checkpoint for `step` atomically and keep only the `keep` newest (None: all).

    state: the tensor state (`sae_dist.parallel.state.build_state`); trainer_state: any picklable
    dict (global rank 0's is kept). ctx: the ParallelContext (None: single process); every rank of a
    distributed run must call this. Returns the final checkpoint directory.
    """
    root = Path(ckpt_root)
    is_main = ctx is None or ctx.is_main
    final = root / checkpoint_dir_name(step)
    tmp = root / (".tmp_" + checkpoint_dir_name(step))
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier(ctx)
    full = dict(state)
    full["trainer"] = {"blob": pickle.dumps(trainer_state)}
    qctx = _quiet()
    try:
        dcp.save(full, checkpoint_id=str(tmp), process_group=None if ctx is None else ctx.world_group)
    finally:
        qctx.__exit__(None, None, None)
    _barrier(ctx)
    if is_main:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep is not None and keep > 0:
            for _, old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier(ctx)
    return final


def load_checkpoint(path: str | Path, *, state: dict, ctx=None, optional: tuple[str, ...] = ()) -> dict:
    """Load a checkpoint directory in place into the tensors of `state` (as built for saving, at
    this run's mesh: DCP reads each rank's shard of the global tensors) and return the trainer_state
    dict. ctx: the ParallelContext (None: single process; its ranks, `ctx.world_group`, load together).
    optional: top-level keys of `state` loaded only when the checkpoint has them (else left as they are).
    RuntimeError from DCP if the checkpoint does not match (e.g. a different d_sae)."""
    full = dict(state)
    if optional:
        saved = {key.split(".")[0] for key in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata}
        for key in set(optional) - saved:
            full.pop(key, None)
    full["trainer"] = {"blob": b""}
    qctx = _quiet()
    try:
        dcp.load(full, checkpoint_id=str(path), process_group=None if ctx is None else ctx.world_group)
    finally:
        qctx.__exit__(None, None, None)
    return pickle.loads(full["trainer"]["blob"])


def read_checkpoint_tensors(path: str | Path, prefix: str = "model") -> dict[str, torch.Tensor]:
    """The tensors under `prefix` of the checkpoint directory `path` (e.g. "model", "ema", "optim",
    "dead") as plain CPU tensors of their GLOBAL shapes, whatever mesh saved them: the weights a
    tp-sharded run holds, gathered, in one process and without a process group.

    Keys are the names below the prefix with DCP's "." separators (e.g. "W_enc", "W_enc.exp_avg").
    Memory: the selected tensors plus DCP's read buffers. ValueError when no tensor has that prefix.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path))
    meta = reader.read_metadata().state_dict_metadata
    head = prefix + "."
    flat = {key: torch.empty(m.size, dtype=m.properties.dtype) for key, m in meta.items()
            if key.startswith(head) and isinstance(m, TensorStorageMetadata)}
    if not flat:
        raise ValueError(f"checkpoint {path} holds no tensor under {prefix!r} (has: "
                         f"{sorted({k.split('.')[0] for k in meta})})")
    qctx = _quiet()
    try:
        dcp.load(flat, storage_reader=reader)
    finally:
        qctx.__exit__(None, None, None)
    return {key[len(head):]: t for key, t in flat.items()}
