"""The harvester: LM activations at one hook for a deterministic stream of packed sequences -> zarr store.

Design (deterministic and resumable; the store layout is docs/formats.md#activation-store):

* The packed train-sequence stream (`text.packed_sequences`) is a deterministic function of the
  documents, the tokenizer, `ctx_len` and `eval_fraction`. Sequence i (0-based) is stored at token
  rows [i*(ctx_len-1), (i+1)*(ctx_len-1)): its positions 1..ctx_len-1 (position 0, BOS, the
  attention sink, is never stored; Gao et al. 2024, App. A).
* n_seqs = ceil(tokens / (ctx_len-1)). Shard s holds sequences [s*seqs_per_shard, (s+1)*seqs_per_shard),
  i.e. exactly one zarr shard file of shard_tokens = seqs_per_shard*(ctx_len-1) rows (inner chunks of
  chunk_tokens = seqs_per_chunk*(ctx_len-1) rows). A shard is the unit of work and of resume.
* Worker `rank` of `world_size` computes the shards with s % world_size == rank. It walks the whole
  stream but only tokenises the sequences of other workers' shards (no LM forward for them).
* On start the worker reads the `_progress/` markers (`store.done_shards`) and skips finished shards.
  Each finished shard is written with ONE `write_block` and then marked with `mark_shard_done`
  (info: n_seqs, n_tokens, partial norm stats, end_of_data). A worker killed at any moment leaves at
  most one half-written shard without a marker, which the rerun rewrites entirely.
* If the corpus ends before n_seqs sequences, the shard holding the end is partial (its marker says
  so) and later shards are marked empty; finalisation trims the arrays to the data actually written.
* When every shard has a marker the store is finalised (`store.finalize_store`: trim, merged
  attributes, `harvest.complete = true`). With world_size > 1 the workers meet at a
  torch.distributed barrier (gloo; initialised from the torchrun env RANK/WORLD_SIZE/MASTER_ADDR/
  MASTER_PORT if no process group exists) and rank 0 finalises. Finalising is idempotent, and
  rerunning a complete harvest is a fast no-op.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from typing import Iterable

import numpy as np
import torch

from sae_dist.lock import DirectoryLock
from sae_dist.preempt import Preemption

from .hooks import resolve_hook, run_to_hook
from .text import packed_sequences

__all__ = ["harvest", "HarvestError", "STORE_DTYPES"]

STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class HarvestError(RuntimeError):
    """The harvest cannot proceed (non-finite activations, inconsistent arguments, ...)."""


def _log(msg: str, rank: int) -> None:
    print(f"[sae-harvest rank {rank}] {msg}", flush=True)


def _model_name(model) -> str:
    name = getattr(model, "sae_dist_name", None)
    if name:
        return str(name)
    return str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)


def _d_model(model) -> int:
    """Residual-stream width: config hidden_size (n_embd / d_model), else the embedding width."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for key in ("hidden_size", "n_embd", "d_model"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return int(model.get_input_embeddings().embedding_dim)


def _input_device(model) -> torch.device:
    emb = model.get_input_embeddings()
    return emb.weight.device


def _read_complete(store_path: str) -> dict | None:
    """The store's `harvest` attribute if the store exists and is complete, else None."""
    from sae_dist.store import open_store
    from sae_dist.store.errors import StoreError

    if not os.path.exists(store_path):
        return None
    try:
        group = open_store(store_path, mode="r")
    except (StoreError, FileNotFoundError, ValueError, KeyError):
        return None
    attrs = dict(group.attrs)
    h = attrs.get("harvest") or {}
    return attrs if h.get("complete") else None


def harvest_lock_file(store_path, rank: int) -> str:
    """Harvest worker `rank`'s lock file on `store_path`: beside the store, since the store directory
    itself appears by an atomic rename (`create_store`). sae_dist.lock explains the lock."""
    path = os.path.abspath(os.fspath(store_path))
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.harvest-worker{rank}.lock")


def _maybe_dist(world_size: int, rank: int, timeout_s: float):
    """Return (torch.distributed module or None, whether we created the process group)."""
    if world_size <= 1:
        return None, False
    import torch.distributed as dist

    if not dist.is_available():
        return None, False
    if dist.is_initialized():
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise HarvestError(
                f"harvest(rank={rank}, world_size={world_size}) disagrees with the process group "
                f"(rank {dist.get_rank()} of {dist.get_world_size()}); pass the torchrun values"
            )
        return dist, False
    env_ws = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if env_ws == world_size and "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        dist.init_process_group(
            backend="gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        return dist, True
    return None, False


def harvest(
    *,
    model,
    tokenizer,
    hook: str,
    docs: Iterable[str],
    store_path: str,
    tokens: int,
    ctx_len: int = 64,
    batch_size: int = 32,
    dtype: str = "float16",
    seqs_per_chunk: int = 64,
    seqs_per_shard: int = 1024,
    rank: int | None = None,
    world_size: int | None = None,
    eval_fraction: float = 0.05,
    attrs: dict | None = None,
    progress: bool = True,
    finalize: bool = True,
    barrier_timeout_s: float = 48 * 3600.0,
) -> dict:
    """Harvest LM activations at `hook` into a zarr v3 activation store (resumable, multi-worker).

    Args:
        model: HF causal LM in eval mode (e.g. from `load_lm`); run in its own dtype under
            `torch.inference_mode`, stopped right after the hooked module (`run_to_hook`).
        tokenizer: its tokenizer.
        hook: hook name, e.g. "blocks.19.hook_resid_post" (see `hooks.valid_hook_names`).
        docs: iterable of documents (strings) in a deterministic order (e.g. `iter_documents(...)`).
            Every worker and every rerun must see the same documents in the same order.
        store_path: directory of the zarr store (created if missing, resumed if partial).
        tokens: activation rows to store; rounded up to whole sequences:
            n_seqs = ceil(tokens / (ctx_len - 1)), n_tokens = n_seqs * (ctx_len - 1).
        ctx_len: tokens per sequence including BOS (paper: 64).
        batch_size: sequences per LM forward.
        dtype: storage dtype of `activations`: "float16", "bfloat16" or "float32".
        seqs_per_chunk: zarr chunk = seqs_per_chunk * (ctx_len - 1) rows.
        seqs_per_shard: zarr shard file = seqs_per_shard * (ctx_len - 1) rows (multiple of
            seqs_per_chunk); the unit of work and of resume.
        rank, world_size: this worker and the number of workers; None (default) reads the torchrun
            env RANK / WORLD_SIZE (0 / 1 when unset).
        eval_fraction: documents with `is_eval_document(text, eval_fraction)` are held out.
        attrs: extra group attributes (e.g. {"dataset": "stdlib", "model": "SmolLM2-135M-Instruct"});
            they override the defaults (`model` defaults to `model.sae_dist_name` or the config name).
        progress: show a tqdm bar in tokens (tokens/s) for this worker's shards (position = rank).
        finalize: finalise the store once every shard is done (default). With world_size > 1 the
            workers first meet at a torch.distributed barrier (an existing process group, else a gloo
            group made from the torchrun env RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT) and rank 0
            finalises. Without a process group or torchrun env (workers run one after another), the
            worker that finds every shard marked finalises. False leaves finalisation to a later call.
        barrier_timeout_s: timeout of the gloo process group this function creates (if it does).

    Store arrays: `activations` [n_tokens, d_model] (dtype), `token_ids` int32, `seq_index` int64
    (global sequence index i), `position` int32 (1..ctx_len-1). Group attributes: d_model,
    n_tokens, model, hook, layer, ctx_len, dataset, dtype, norm_stats (merged over shards: mean_norm,
    mean_sq_norm, n), harvest (progress; complete), plus `attrs`.

    Returns:
        dict: store_path, tokens_written (this call), wall_s, tokens_per_s, shards_written,
        shards_total, complete (bool), already_complete (bool), n_tokens (final, when complete).

    Raises:
        HarvestError: non-finite activations (names the sequence range), inconsistent arguments.
        ValueError: bad hook name / dtype / sizes. StoreError: an existing store does not match.
    """
    from sae_dist.store import (
        create_store,
        done_shards,
        finalize_store,
        mark_shard_done,
        merge_norm_stats,
        norm_stats_partial,
        write_block,
    )
    from sae_dist.store.layout import to_numpy

    t0 = time.perf_counter()
    store_path = os.fspath(store_path)
    if rank is None:
        rank = int(os.environ.get("RANK", "0") or 0)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if dtype not in STORE_DTYPES:
        raise ValueError(f"unknown store dtype {dtype!r}; use one of {sorted(STORE_DTYPES)}")
    for name, v in (("tokens", tokens), ("batch_size", batch_size), ("seqs_per_chunk", seqs_per_chunk),
                    ("seqs_per_shard", seqs_per_shard), ("world_size", world_size)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v!r}")
    if int(ctx_len) < 2:
        raise ValueError(f"ctx_len must be >= 2, got {ctx_len!r}")
    if seqs_per_shard % seqs_per_chunk:
        raise ValueError(
            f"seqs_per_shard ({seqs_per_shard}) must be a multiple of seqs_per_chunk ({seqs_per_chunk})"
            " (a zarr shard holds whole chunks)"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")

    spec = resolve_hook(model, hook)
    body = int(ctx_len) - 1
    n_seqs = math.ceil(int(tokens) / body)
    n_tokens = n_seqs * body
    n_shards = math.ceil(n_seqs / seqs_per_shard)
    chunk_tokens = seqs_per_chunk * body
    shard_tokens = seqs_per_shard * body
    d_model = _d_model(model)
    store_dtype = STORE_DTYPES[dtype]
    device = _input_device(model)

    base_attrs = {
        "model": _model_name(model),
        "dataset": "unknown",
        **(attrs or {}),
        "d_model": d_model,
        "hook": spec.name,
        "layer": spec.layer,
        "ctx_len": int(ctx_len),
        "dtype": dtype,
        "eval_fraction": float(eval_fraction),
    }
    harvest_info = {
        "complete": False,
        "tokens_requested": int(tokens),
        "n_seqs_planned": n_seqs,
        "n_shards": n_shards,
        "seqs_per_shard": int(seqs_per_shard),
        "seqs_per_chunk": int(seqs_per_chunk),
        "chunk_tokens": chunk_tokens,
        "shard_tokens": shard_tokens,
    }

    summary = {
        "store_path": store_path,
        "tokens_written": 0,
        "wall_s": 0.0,
        "tokens_per_s": 0.0,
        "shards_written": 0,
        "shards_total": n_shards,
        "complete": False,
        "already_complete": False,
        "n_tokens": None,
        "preempted": False,
    }

    existing = _read_complete(store_path)
    if existing is not None:
        keys = ["hook", "ctx_len", "d_model", "model", "dtype"] + (["dataset"] if "dataset" in (attrs or {}) else [])
        for key in keys:
            if key in existing and existing[key] != base_attrs[key]:
                from sae_dist.store.errors import StoreError

                raise StoreError(
                    f"store {store_path!r} is a complete harvest with {key}={existing[key]!r}, but "
                    f"this run asks for {key}={base_attrs[key]!r}; use another store.path or delete it"
                )
        if rank == 0:
            _log(f"store {store_path} is already complete ({existing.get('n_tokens')} tokens); nothing to do", rank)
        summary.update(complete=True, already_complete=True, n_tokens=existing.get("n_tokens"),
                       wall_s=time.perf_counter() - t0)
        return summary

    lock = DirectoryLock(store_path, f"sae-harvest worker {rank} of {world_size}",
                         lock_file=harvest_lock_file(store_path, rank))
    lock.acquire()  # DirectoryBusyError naming the holder when another process harvests these shards
    try:
        group = create_store(
            store_path,
            n_tokens=n_tokens,
            d_model=d_model,
            dtype=dtype,
            chunk_tokens=chunk_tokens,
            shard_tokens=shard_tokens,
            attrs={**base_attrs, "harvest": harvest_info},
        )
        done = done_shards(store_path)
        todo = [s for s in range(n_shards) if s % world_size == rank and s not in done]
        if done and rank == 0:
            _log(f"resuming: {len(done)}/{n_shards} shards already done", rank)

        written, preempted = 0, False
        if todo:
            with Preemption("sae-harvest") as preempt:
                written, preempted = _harvest_shards(
                    model=model, tokenizer=tokenizer, spec=spec, docs=docs, group=group, store_path=store_path,
                    todo=todo, n_seqs=n_seqs, body=body, ctx_len=int(ctx_len), batch_size=int(batch_size),
                    seqs_per_shard=int(seqs_per_shard), d_model=d_model, store_dtype=store_dtype,
                    device=device, eval_fraction=eval_fraction, progress=progress, rank=rank,
                    write_block=write_block, mark_shard_done=mark_shard_done,
                    norm_stats_partial=norm_stats_partial, to_numpy=to_numpy,
                    should_stop=lambda: preempt.requested,
                )
        now_done = done_shards(store_path)
        summary["shards_written"] = sum(1 for s in todo if s in now_done)
        summary["tokens_written"] = written
        summary["preempted"] = preempted
        if preempted:
            _log(f"stopped on SIGTERM after {written} tokens (every written shard is kept); rerun the same "
                 "command to resume", rank)

        if finalize and not preempted:
            dist, created = _maybe_dist(world_size, rank, barrier_timeout_s)
            try:
                if dist is not None:
                    dist.barrier()
                done = done_shards(store_path)
                all_done = all(s in done for s in range(n_shards))
                if all_done and (rank == 0 or dist is None):
                    final_n = _final_n_tokens(done, n_shards, seqs_per_shard, body, store_path)
                    if final_n == 0:
                        raise HarvestError(
                            f"the corpus gave no train sequence of ctx_len={ctx_len} tokens (documents "
                            f"shorter than {ctx_len - 1} tokens are dropped, and eval_fraction="
                            f"{eval_fraction} are held out); use more data or a shorter ctx_len"
                        )
                    stats = merge_norm_stats([done[s]["norm_stats"] for s in range(n_shards)
                                              if done[s].get("n_tokens", 0) > 0])
                    end_of_data = any(done[s].get("end_of_data") for s in range(n_shards))
                    final_attrs = {
                        **base_attrs,
                        "n_tokens": final_n,
                        "norm_stats": stats,
                        "harvest": {**harvest_info, "complete": True, "n_tokens": final_n,
                                    "end_of_data": bool(end_of_data)},
                    }
                    finalize_store(store_path, final_n, final_attrs)
                    if end_of_data:
                        _log(f"the corpus ended after {final_n} tokens (asked for {n_tokens}); store trimmed", rank)
                    _log(f"store {store_path} complete: {final_n} tokens x {d_model}", rank)
                if dist is not None:
                    dist.barrier()  # nobody returns (and reads the store) before rank 0 has finalised
                if all_done:
                    summary["complete"] = True
                    summary["n_tokens"] = _final_n_tokens(done, n_shards, seqs_per_shard, body, store_path)
            finally:
                if created:
                    dist.destroy_process_group()

    finally:
        lock.release()

    wall = time.perf_counter() - t0
    summary["wall_s"] = wall
    summary["tokens_per_s"] = written / wall if wall > 0 else 0.0
    return summary


def _final_n_tokens(done: dict, n_shards: int, seqs_per_shard: int, body: int, store_path: str) -> int:
    """Rows actually written: full shards, then at most one partial shard, then only empty shards."""
    total = 0
    short_seen = None
    for s in range(n_shards):
        n = int(done[s].get("n_seqs", 0))
        if short_seen is not None and n > 0:
            raise HarvestError(
                f"store {store_path!r}: shard {s} has {n} sequences although shard {short_seen} was "
                "short (the corpus ended there); the workers saw different corpora. Delete the store "
                "and harvest again with identical data on every worker."
            )
        total += n
        expected_full = seqs_per_shard if s < n_shards - 1 else None
        if expected_full is not None and n < expected_full and short_seen is None:
            short_seen = s
    return total * body


def _harvest_shards(
    *, model, tokenizer, spec, docs, group, store_path, todo, n_seqs, body, ctx_len, batch_size,
    seqs_per_shard, d_model, store_dtype, device, eval_fraction, progress, rank,
    write_block, mark_shard_done, norm_stats_partial, to_numpy, should_stop=None,
) -> tuple[int, bool]:
    """Walk the sequence stream, run the LM on this worker's unfinished shards and write them.
    Returns (tokens written, stopped): `should_stop()` is asked after every written shard, and True
    ends the walk there (preemption)."""
    from tqdm.auto import tqdm

    todo_set = set(todo)
    last_needed = max(todo)
    total_tokens = sum(
        (min(n_seqs, (s + 1) * seqs_per_shard) - s * seqs_per_shard) * body for s in todo
    )
    bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, disable=not progress,
               position=rank, desc=f"harvest r{rank}", dynamic_ncols=True, leave=rank == 0)
    written = 0

    cur_shard: int | None = None
    seq_ids: list[list[int]] = []  # sequences of the current shard (token ids incl. BOS)
    acts_parts: list[torch.Tensor] = []
    pending: list[list[int]] = []  # sequences not yet run through the LM
    pending_start = 0  # global index of pending[0]

    def flush_pending():
        nonlocal pending
        if not pending:
            return
        ids = torch.tensor(pending, dtype=torch.long, device=device)
        with torch.inference_mode():
            a = run_to_hook(model, spec, ids)[:, 1:, :].to(store_dtype)
        if not bool(torch.isfinite(a).all()):
            bad = (~torch.isfinite(a)).flatten(1).any(1).nonzero().flatten().tolist()
            raise HarvestError(
                f"non-finite activations at hook {spec.name!r} for sequences "
                f"[{pending_start}, {pending_start + len(pending)}) (bad: "
                f"{[pending_start + b for b in bad[:8]]}) in dtype {store_dtype}; try dtype='float32'"
                " or check the model"
            )
        if a.shape[-1] != d_model:
            raise HarvestError(
                f"hook {spec.name!r} gives activations of width {a.shape[-1]}, but the model config "
                f"says d_model={d_model}; this hook point is not supported for {type(model).__name__}"
            )
        acts_parts.append(a.reshape(-1, d_model).cpu())
        pending = []

    def write_shard(s: int, end_of_data: bool):
        nonlocal written, seq_ids, acts_parts, pending_start
        flush_pending()
        n = len(seq_ids)
        start_seq = s * seqs_per_shard
        if n:
            acts = torch.cat(acts_parts, 0)
            tok = np.asarray(seq_ids, dtype=np.int32)[:, 1:].reshape(-1)
            sidx = np.repeat(np.arange(start_seq, start_seq + n, dtype=np.int64), body)
            pos = np.tile(np.arange(1, body + 1, dtype=np.int32), n)
            acts_np = to_numpy(acts)
            write_block(group, start_seq * body, acts_np, token_ids=tok, seq_index=sidx, position=pos)
            stats = norm_stats_partial(acts_np)
        else:
            stats = None
        info = {"n_seqs": n, "n_tokens": n * body, "first_seq": start_seq,
                "end_of_data": bool(end_of_data), "norm_stats": stats, "rank": rank}
        mark_shard_done(store_path, s, info)
        written += n * body
        seq_ids, acts_parts = [], []

    stream = packed_sequences(docs, tokenizer, ctx_len, eval_fraction=eval_fraction, split="train")
    i = -1
    ended, stopped = True, False
    try:
        for i, seq in enumerate(stream):
            if i >= n_seqs:
                ended = False
                break
            s = i // seqs_per_shard
            if s > last_needed:
                ended = False
                break
            if s not in todo_set:
                continue
            if cur_shard != s:
                if cur_shard is not None:
                    write_shard(cur_shard, end_of_data=False)
                cur_shard = s
            if not pending:
                pending_start = i
            seq_ids.append(seq)
            pending.append(seq)
            if len(pending) >= batch_size:
                flush_pending()
                bar.update(batch_size * body)
            if (i + 1) % seqs_per_shard == 0 or i + 1 == n_seqs:
                left = len(pending)
                write_shard(s, end_of_data=False)
                bar.update(left * body)
                cur_shard = None
                if should_stop is not None and should_stop():
                    ended, stopped = False, True
                    break
        else:
            ended = True
        n_avail = i + 1 if ended else None  # sequences in the corpus (when it ended early)
        if ended and n_avail is not None and n_avail < n_seqs:
            # The corpus ran out: finish the shard it ended in and mark this worker's later shards empty.
            end_shard = n_avail // seqs_per_shard
            for s in sorted(todo_set):
                if s < end_shard:
                    continue  # already written above
                if s == end_shard and cur_shard == s:
                    left = len(pending)
                    write_shard(s, end_of_data=True)
                    bar.update(left * body)
                    cur_shard = None
                else:
                    seq_ids, acts_parts = [], []
                    write_shard(s, end_of_data=True)
    finally:
        bar.close()
    return written, stopped
