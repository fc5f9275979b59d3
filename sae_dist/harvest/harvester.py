"""The harvester: LM activations at one or several hooks for a deterministic stream of packed sequences ->
one zarr store per hook.

Design (deterministic and resumable; the store layout is docs/formats.md#activation-store):

* The packed train-sequence stream (`text.packed_sequences`) is a deterministic function of the
  documents, the tokenizer, `ctx_len` and `eval_fraction`. Sequence i (0-based) is text rows
  [i*(ctx_len-1), (i+1)*(ctx_len-1)): its positions 1..ctx_len-1 (position 0, BOS, the attention sink, is
  never stored; Gao et al. 2024, App. A); text rows are store rows unless shuffled within shards (below).
* n_seqs = ceil(tokens / (ctx_len-1)). Shard s holds sequences [s*seqs_per_shard, (s+1)*seqs_per_shard)
  (with row_order "shuffled_global": the sequences at those positions of a fixed permutation), i.e. exactly
  one zarr shard file of shard_tokens = seqs_per_shard*(ctx_len-1) rows (inner chunks of chunk_tokens =
  seqs_per_chunk*(ctx_len-1) rows). A shard is the unit of work and of resume.
* Worker `rank` of `world_size` computes the shards with s % world_size == rank. It walks the whole
  stream but only tokenises the sequences of other workers' shards (no LM forward for them).
* On start the worker reads the `_progress/` markers (`store.done_shards`) and skips finished shards.
  Each finished shard is written with ONE `write_block` and then marked with `mark_shard_done`
  (info: n_seqs, n_tokens, partial norm stats, end_of_data). A worker killed at any moment leaves at
  most one half-written shard without a marker, which the rerun rewrites entirely.
* The writes run in one background thread, in shard order, while the LM fills the next shard: at most one
  shard is being written at a time, and the LM waits for it only when the next shard is full. A failed
  write is raised by `harvest` (at the next shard or at the end) and its shard keeps no marker; when the LM
  loop fails, the shard being written is finished (and marked) first. Activations reach the host without a
  wait per batch (non_blocking copies, finiteness checked on the device); the copies are waited for, and
  the finiteness flags read, once per shard (`_ShardWriter`).
* If the corpus ends before n_seqs sequences, the shard holding the end is partial (its marker says
  so) and later shards are marked empty; finalisation trims the arrays to the data actually written.
* Store arrays: `activations` [n_tokens, d_in] (the store dtype), `token_ids` int32, `seq_index` int64
  (global sequence index i), `position` int32 (1..ctx_len-1). Group attributes: d_in, n_tokens, model,
  hook_name, layer, ctx_len, dataset, dtype, eval_fraction, norm_stats (merged over shards: mean_norm,
  mean_sq_norm, n), harvest (progress; complete), plus the caller's `attrs`.
* Row order (store attribute ``row_order``; `harvest`'s `row_order`). ``"shuffled_in_shard"`` (the default
  for text): shard s is written in the order of the fixed permutation `shard_row_permutation(s, rows)`, the
  same for every worker, rerun and hook. ``"shuffled_global"`` (the default for pretokenised sequences,
  which allow random access): shard s holds the sequences at positions [s*seqs_per_shard,
  (s+1)*seqs_per_shard) of the fixed permutation `sequence_order(n)` of all n sequences of the harvest, so
  a shard is a uniform sample of the text, and its rows are then shuffled as above. ``"text"``: sequence
  order, unshuffled. `token_ids`, `seq_index` and `position` are permuted with the activations, so each row
  still names its place in the text. With the reader's random inner chunks (`store.reader`) a training
  batch then mixes rows of many documents (docs/internals.md#how-well-a-batch-mixes-documents). These
  defaults (and DEFAULT_SEQS_PER_CHUNK) are a new store's: a harvest given no row_order / seqs_per_chunk
  resumes an existing store with its own (`_resolve_layout`).
* Several hook points (`hook_name` a list) are harvested from ONE forward per batch, stopped after the
  deepest hooked module (`hooks.run_to_hooks`); each hook gets its own store ``store_path/<hook_name>``
  with the same token ids in the same order. A shard counts as done only when every store has its
  marker; a store already complete is left alone.
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
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from sae_dist.lock import DirectoryLock
from sae_dist.preempt import Preemption

from .hooks import resolve_hook, run_to_hooks
from .text import packed_sequences

__all__ = ["harvest", "hook_store_path", "shard_row_permutation", "sequence_order", "resolve_row_order",
           "HarvestError", "STORE_DTYPES", "ROW_ORDERS", "DEFAULT_SEQS_PER_CHUNK", "lm_d_model", "lm_input_device"]

STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: the store attribute row_order: rows in text order, shuffled within each shard (`shard_row_permutation`), or
#: sequences spread over the shards by a global permutation (`sequence_order`) and then shuffled within each shard
ROW_ORDERS = ("text", "shuffled_in_shard", "shuffled_global")
#: a new store's seqs_per_chunk when `harvest` is given none (an existing store keeps its own)
DEFAULT_SEQS_PER_CHUNK = 8
_ROW_SEED = 0x5AE  # seeds every shard's row permutation (with the shard index): one fixed order per store layout
_SEQ_SEED = 0x5AE5  # seeds the global sequence permutation (with the number of sequences)


def shard_row_permutation(shard: int, rows: int) -> np.ndarray:
    """int64 [rows]: the order in which a shuffled harvest writes shard `shard`'s rows (store row shard_start + j
    holds row perm[j] of the shard's sequences laid end to end); a pure function of (shard, rows)."""
    return np.random.default_rng([_ROW_SEED, int(shard)]).permutation(int(rows))


def sequence_order(n_seqs: int) -> np.ndarray:
    """int64 [n_seqs]: with row_order "shuffled_global", shard position p (shard p // seqs_per_shard) holds
    sequence order[p]; a pure function of n_seqs, the sequences the harvest writes."""
    return np.random.default_rng([_SEQ_SEED, int(n_seqs)]).permutation(int(n_seqs))


def resolve_row_order(row_order: str | None, pretokenized: bool) -> str:
    """The row order a harvest writes: `row_order` (one of ROW_ORDERS), or for None "shuffled_global" when the
    sequences are pretokenised (random access) and "shuffled_in_shard" when they are tokenised from text.
    ValueError for an unknown order, or "shuffled_global" without pretokenised sequences."""
    if row_order is None:
        return ROW_ORDERS[2] if pretokenized else ROW_ORDERS[1]
    if row_order not in ROW_ORDERS:
        raise ValueError(f"row_order={row_order!r}: use one of {list(ROW_ORDERS)} (or null for the default)")
    if row_order == "shuffled_global" and not pretokenized:
        raise ValueError("row_order='shuffled_global' reads sequences in a random order, which needs them "
                         "pretokenised: run sae-pretokenize data.pretokenized=DIR, then sae-harvest "
                         "data.pretokenized=DIR (or use harvest.row_order=shuffled_in_shard)")
    return row_order


class HarvestError(RuntimeError):
    """The harvest cannot proceed (non-finite activations, inconsistent arguments, ...)."""


def _log(msg: str, rank: int) -> None:
    print(f"[sae-harvest rank {rank}] {msg}", flush=True)


def _model_name(model) -> str:
    name = getattr(model, "sae_dist_name", None)
    if name:
        return str(name)
    return str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)


def lm_d_model(model) -> int:
    """Residual-stream width: config hidden_size (n_embd / d_model), else the embedding width."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for key in ("hidden_size", "n_embd", "d_model"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return int(model.get_input_embeddings().embedding_dim)


def lm_input_device(model) -> torch.device:
    """The device of the LM's input embedding (where its input ids go)."""
    emb = model.get_input_embeddings()
    return emb.weight.device


def _read_complete(store_path: str) -> dict | None:
    """The store's `harvest` attribute if the store exists and is complete, else None."""
    from sae_dist.store import open_store, read_attrs
    from sae_dist.store.errors import StoreError

    if not os.path.exists(store_path):
        return None
    try:
        group = open_store(store_path, mode="r")
    except (StoreError, FileNotFoundError, ValueError, KeyError):
        return None
    attrs = read_attrs(group)
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
    *, model, tokenizer, hook_name: str | Sequence[str], docs: Iterable[str] | None, store_path: str, tokens: int,
    ctx_len: int = 64, batch_size: int = 32, dtype: str = "float16", seqs_per_chunk: int | None = None,
    seqs_per_shard: int = 1024, rank: int | None = None, world_size: int | None = None, eval_fraction: float = 0.05,
    attrs: dict | None = None, progress: bool = True, finalize: bool = True, barrier_timeout_s: float = 48 * 3600.0,
    sequences=None, row_order: str | None = None,
) -> dict:
    """Harvest LM activations at `hook_name` into zarr v3 activation stores (resumable, multi-worker).

    Args:
        model: HF causal LM in eval mode (e.g. from `load_lm`); run in its own dtype under `torch.inference_mode`,
            stopped right after the (deepest) hooked module (`run_to_hooks`). tokenizer: its tokenizer.
        hook_name: hook name, e.g. "blocks.19.hook_resid_post" (see `hooks.valid_hook_names`), or a list of
            them: all are harvested from one forward per batch, one store each (`store_path` below).
        docs: iterable of documents (strings) in a deterministic order (e.g. `iter_documents(...)`).
            Every worker and every rerun must see the same documents in the same order. Unused (may be None)
            when `sequences` is given.
        store_path: directory of the zarr store (created if missing, resumed if partial); when `hook_name` is
            a list, the directory holding one store per hook, ``hook_store_path(store_path, name)``.
        tokens: activation rows to store; rounded up to whole sequences:
            n_seqs = ceil(tokens / (ctx_len - 1)), n_tokens = n_seqs * (ctx_len - 1).
        ctx_len: tokens per sequence including BOS (paper: 64). batch_size: sequences per LM forward.
        dtype: storage dtype of `activations`: "float16", "bfloat16" or "float32".
        seqs_per_chunk: zarr chunk = seqs_per_chunk * (ctx_len - 1) rows; None: the existing store's (a resumed
            or complete harvest), else DEFAULT_SEQS_PER_CHUNK (8).
        seqs_per_shard: zarr shard file = seqs_per_shard * (ctx_len - 1) rows (multiple of seqs_per_chunk); the
            unit of work and of resume.
        rank, world_size: this worker and the number of workers; None (default) reads the torchrun env RANK /
            WORLD_SIZE (0 / 1 when unset).
        eval_fraction: documents with `is_eval_document(text, eval_fraction)` are held out.
        attrs: extra group attributes (e.g. {"dataset": "stdlib", "model": "SmolLM2-135M-Instruct"}); they
            override the defaults (`model` defaults to `model.sae_dist_name` or the config name).
        progress: show a tqdm bar in tokens (tokens/s) for this worker's shards (position = rank).
        finalize: finalise the store once every shard is done (default). With world_size > 1 the workers first
            meet at a torch.distributed barrier (an existing process group, else a gloo group made from the
            torchrun env RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT) and rank 0 finalises. Without a process group
            or torchrun env (workers run one after another), the worker that finds every shard marked
            finalises. False leaves finalisation to a later call.
        barrier_timeout_s: timeout of the gloo process group this function creates (if it does).
        sequences: the packed sequences already tokenised, random access (`pretokenize.PretokenizedSequences`:
            len() and [i] -> ctx_len token ids), used instead of tokenising `docs`: each worker reads only
            its shards' sequences, and a resumed harvest starts at its first unfinished shard.
        row_order: "shuffled_in_shard" (each shard's rows in the fixed random order `shard_row_permutation`),
            "shuffled_global" (sequences assigned to shards by the permutation `sequence_order`, then
            shuffled within each shard; needs `sequences`), "text" (sequence order), or None: the existing
            store's row order (a resumed or complete harvest; a store written before row_order existed is
            "text"), else for a new store shuffled_global with `sequences` and shuffled_in_shard without.
            A store is resumed only with the row order and chunk size it was started with: a given value
            that contradicts the existing store's is a StoreError naming both.

    The store's arrays and group attributes: module docstring.

    Returns:
        dict: store_path, stores ({hook name: store path}), tokens_written (this call, per store), wall_s,
        tokens_per_s, shards_written, shards_total, complete (bool), already_complete (bool), n_tokens (final,
        when complete), preempted (bool).

    Raises:
        HarvestError: non-finite activations (names the batch's sequences; found when its shard is full),
            inconsistent arguments.
        ValueError: bad hook name / dtype / sizes. StoreError: an existing store does not match.
        Any exception of a shard write (e.g. OSError for a full disk), made in the background writer thread, is
        re-raised here; that shard has no marker and a rerun writes it.
    """
    t0 = time.perf_counter()
    run = _HarvestRun.plan(model=model, tokenizer=tokenizer, hook_name=hook_name, docs=docs, store_path=store_path,
                           tokens=tokens, ctx_len=ctx_len, batch_size=batch_size, dtype=dtype,
                           seqs_per_chunk=seqs_per_chunk, seqs_per_shard=seqs_per_shard, rank=rank,
                           world_size=world_size, eval_fraction=eval_fraction, attrs=attrs, progress=progress,
                           sequences=sequences, row_order=row_order)
    summary = _new_summary(run, store_path)
    existing = {t.name: _read_complete(t.store_path) for t in run.targets}
    for t in run.targets:
        if existing[t.name] is not None:
            _check_same_harvest(t, existing[t.name], attrs)
    if all(v is not None for v in existing.values()):
        return _already_complete(run, existing[run.targets[0].name], summary, t0)
    run = run.without({name for name, v in existing.items() if v is not None})
    written = _harvest_locked(run, summary, finalize, barrier_timeout_s)
    wall = time.perf_counter() - t0
    summary.update(wall_s=wall, tokens_per_s=written / wall if wall > 0 else 0.0)
    return summary


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size), each None read from the torchrun env RANK / WORLD_SIZE (0 / 1 when unset)."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0") or 0)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return rank, world_size


def _check_args(*, tokens, ctx_len, batch_size, dtype, seqs_per_chunk, seqs_per_shard, rank, world_size) -> None:
    """ValueError for a `harvest` argument out of range (unknown dtype, a size < 1, ctx_len < 2, a shard that
    is not whole chunks, rank outside [0, world_size))."""
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


@dataclass(frozen=True)
class _Geometry:
    """Where the sequence stream goes in the store (module docstring); counts in sequences or token rows."""

    ctx_len: int  # tokens per sequence, BOS included
    body: int  # rows stored per sequence: ctx_len - 1 (BOS is not stored)
    n_seqs: int  # sequences planned: ceil(tokens / body)
    n_tokens: int  # rows planned: n_seqs * body
    n_shards: int  # ceil(n_seqs / seqs_per_shard)
    seqs_per_shard: int
    seqs_per_chunk: int
    chunk_tokens: int  # rows per zarr chunk: seqs_per_chunk * body
    shard_tokens: int  # rows per zarr shard file: seqs_per_shard * body

    @classmethod
    def plan(cls, tokens: int, ctx_len: int, seqs_per_chunk: int, seqs_per_shard: int) -> _Geometry:
        """The geometry of a harvest of `tokens` rows (already validated by `_check_args`)."""
        body = int(ctx_len) - 1
        n_seqs = math.ceil(int(tokens) / body)
        return cls(ctx_len=int(ctx_len), body=body, n_seqs=n_seqs, n_tokens=n_seqs * body,
                   n_shards=math.ceil(n_seqs / seqs_per_shard), seqs_per_shard=int(seqs_per_shard),
                   seqs_per_chunk=int(seqs_per_chunk), chunk_tokens=seqs_per_chunk * body,
                   shard_tokens=seqs_per_shard * body)

    def shard_tokens_planned(self, s: int) -> int:
        """Rows shard `s` holds when the corpus does not end early (the last shard may be short)."""
        return (min(self.n_seqs, (s + 1) * self.seqs_per_shard) - s * self.seqs_per_shard) * self.body


def hook_store_path(store_path, hook_name: str) -> str:
    """The store of hook `hook_name` in a multi-hook harvest into directory `store_path`: store_path/hook_name."""
    return os.path.join(os.fspath(store_path), hook_name)


@dataclass(frozen=True)
class _Target:
    """One hook point of a harvest and the store it fills."""

    spec: Any  # the resolved hook (`hooks.HookSpec`)
    store_path: str
    store_attrs: dict  # group attributes written at creation (`harvest` docstring), without "harvest"

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class _HarvestRun:
    """One `harvest` call, validated: its inputs, the store geometry, and its hook points with their stores."""

    model: Any
    tokenizer: Any
    targets: tuple[_Target, ...]  # the hooks, one store each, all filled from one forward per batch
    docs: Iterable[str] | None
    sequences: Any  # random-access packed sequences (`harvest` docstring), or None: tokenise `docs`
    geom: _Geometry
    batch_size: int  # sequences per LM forward
    d_model: int  # residual-stream width (`lm_d_model`)
    dtype: str  # store dtype name, a key of STORE_DTYPES
    device: torch.device  # the model's input device
    eval_fraction: float
    progress: bool
    rank: int
    world_size: int
    harvest_info: dict  # the "harvest" attribute before completion

    @classmethod
    def plan(cls, *, model, tokenizer, hook_name, docs, store_path, tokens, ctx_len, batch_size, dtype,
             seqs_per_chunk, seqs_per_shard, rank, world_size, eval_fraction, attrs, progress,
             sequences=None, row_order=None) -> _HarvestRun:
        """Resolve rank / world_size and the hooks, validate the arguments (ValueError) and plan the stores."""
        rank, world_size = _resolve_rank(rank, world_size)
        resolved = _resolve_targets(model, hook_name, store_path)
        row_order, seqs_per_chunk = _resolve_layout(row_order, seqs_per_chunk, [p for _, p in resolved], ctx_len,
                                                    pretokenized=sequences is not None)
        _check_args(tokens=tokens, ctx_len=ctx_len, batch_size=batch_size, dtype=dtype,
                    seqs_per_chunk=seqs_per_chunk, seqs_per_shard=seqs_per_shard, rank=rank, world_size=world_size)
        geom = _Geometry.plan(tokens, ctx_len, seqs_per_chunk, seqs_per_shard)
        d_model = lm_d_model(model)
        common = {"model": _model_name(model), "dataset": "unknown", **(attrs or {}), "d_in": d_model,
                  "ctx_len": int(ctx_len), "dtype": dtype, "eval_fraction": float(eval_fraction),
                  "row_order": row_order}
        targets = tuple(_Target(spec, path, {**common, "hook_name": spec.name, "layer": spec.layer})
                        for spec, path in resolved)
        harvest_info = {
            "complete": False, "tokens_requested": int(tokens), "n_seqs_planned": geom.n_seqs,
            "n_shards": geom.n_shards, "seqs_per_shard": int(seqs_per_shard), "seqs_per_chunk": int(seqs_per_chunk),
            "chunk_tokens": geom.chunk_tokens, "shard_tokens": geom.shard_tokens,
        }
        if docs is None and sequences is None:
            raise ValueError("harvest needs documents (docs=) or pretokenised sequences (sequences=)")
        return cls(model=model, tokenizer=tokenizer, targets=targets, docs=docs, sequences=sequences, geom=geom,
                   batch_size=int(batch_size), d_model=d_model, dtype=dtype, device=lm_input_device(model),
                   eval_fraction=eval_fraction, progress=progress, rank=rank, world_size=world_size,
                   harvest_info=harvest_info)

    @property
    def row_order(self) -> str:
        """The stores' row_order attribute (module docstring)."""
        return self.targets[0].store_attrs["row_order"]

    def without(self, names: set[str]) -> _HarvestRun:
        """This run less the hooks in `names` (their stores are complete)."""
        return replace(self, targets=tuple(t for t in self.targets if t.name not in names))

    def done_shards(self) -> dict[int, dict]:
        """{shard: marker info} of the shards every store of this run has marked done (the first store's info)."""
        from sae_dist.store import done_shards

        marks = [done_shards(t.store_path) for t in self.targets]
        return {s: info for s, info in marks[0].items() if all(s in m for m in marks[1:])}


def _resolve_targets(model, hook_name, store_path) -> list[tuple[Any, str]]:
    """[(HookSpec, store path)]: one hook name -> the store `store_path`; a list of names -> one store per hook
    under `store_path` (`hook_store_path`). ValueError for an unknown hook, an empty list or a repeated name."""
    store_path = os.fspath(store_path)
    if isinstance(hook_name, str):
        return [(resolve_hook(model, hook_name), store_path)]
    specs = [resolve_hook(model, h) for h in hook_name]
    names = [s.name for s in specs]
    if not specs or len(set(names)) != len(names):
        raise ValueError(f"hook_name lists {names}: give at least one hook point and none twice")
    return [(spec, hook_store_path(store_path, spec.name)) for spec in specs]


def _resolve_layout(row_order: str | None, seqs_per_chunk: int | None, store_paths: list[str], ctx_len: int, *,
                    pretokenized: bool) -> tuple[str, int]:
    """(row_order, seqs_per_chunk) of a harvest into `store_paths`: each None is the first existing store's value
    (`_existing_layout`; so a harvest started by an earlier release, with other defaults, resumes as it began),
    else a new store's default (`resolve_row_order`, DEFAULT_SEQS_PER_CHUNK). ValueError for a bad row order
    (`resolve_row_order`); StoreError, naming both values, when a given value contradicts the existing store's."""
    have = _existing_layout(store_paths, ctx_len)
    order = resolve_row_order(row_order if row_order is not None else have.get("row_order"), pretokenized)
    problems = [f"{key}: store has {have[key]!r}, requested {given!r}"
                for key, given in (("row_order", row_order), ("seqs_per_chunk", seqs_per_chunk))
                if given is not None and key in have and given != have[key]]
    if problems:
        from sae_dist.store.errors import StoreError

        raise StoreError(f"store {have['path']!r} exists with a different layout: {'; '.join(problems)}. Leave "
                         "harvest.row_order / harvest.seqs_per_chunk unset (null) to continue it as it was started, "
                         "or use another store.path")
    chunk = seqs_per_chunk if seqs_per_chunk is not None else have.get("seqs_per_chunk", DEFAULT_SEQS_PER_CHUNK)
    return order, chunk


def _existing_layout(store_paths: list[str], ctx_len: int) -> dict:
    """{"path", "row_order", "seqs_per_chunk"} of the first of `store_paths` holding a store, complete or not (a
    store without the row_order attribute predates it and is in text order; seqs_per_chunk is its chunk rows /
    (ctx_len - 1), left out when that does not divide); {} when none exists or none opens (`create_store` then
    reports what is wrong)."""
    from sae_dist.store import open_store, read_attrs
    from sae_dist.store.errors import StoreError
    from sae_dist.store.layout import chunk_grid

    for path in store_paths:
        if not os.path.exists(path):
            continue
        try:
            group = open_store(path, mode="r")
        except (StoreError, FileNotFoundError, ValueError, KeyError):
            continue
        have = {"path": path, "row_order": read_attrs(group).get("row_order", "text")}
        chunk, body = chunk_grid(group["activations"])[0], int(ctx_len) - 1
        if body > 0 and chunk % body == 0:
            have["seqs_per_chunk"] = chunk // body
        return have
    return {}


def _new_summary(run: _HarvestRun, store_path) -> dict:
    """`harvest`'s return value before any work (nothing written, not complete)."""
    return {
        "store_path": os.fspath(store_path),
        "stores": {t.name: t.store_path for t in run.targets},
        "tokens_written": 0,
        "wall_s": 0.0,
        "tokens_per_s": 0.0,
        "shards_written": 0,
        "shards_total": run.geom.n_shards,
        "complete": False,
        "already_complete": False,
        "n_tokens": None,
        "preempted": False,
    }


def _check_same_harvest(target: _Target, existing: dict, attrs: dict | None) -> None:
    """StoreError when the complete store's attributes `existing` disagree with this target's hook_name, ctx_len,
    d_in, model, dtype, row_order (and dataset, when `attrs` names one)."""
    keys = ["hook_name", "ctx_len", "d_in", "model", "dtype", "row_order"] + (["dataset"] if "dataset" in (attrs or {})
                                                                               else [])
    existing = {"row_order": "text", **existing}  # stores written before row_order existed are in text order
    for key in keys:
        if key in existing and existing[key] != target.store_attrs[key]:
            from sae_dist.store.errors import StoreError

            raise StoreError(
                f"store {target.store_path!r} is a complete harvest with {key}={existing[key]!r}, but "
                f"this run asks for {key}={target.store_attrs[key]!r}; use another store.path or delete it"
            )


def _already_complete(run: _HarvestRun, existing: dict, summary: dict, t0: float) -> dict:
    """`harvest`'s answer when every store is already a complete harvest (`existing`: the first one's
    attributes): `summary` marked complete."""
    if run.rank == 0:
        _log(f"{', '.join(t.store_path for t in run.targets)}: already complete ({existing.get('n_tokens')} "
             "tokens); nothing to do", run.rank)
    summary.update(complete=True, already_complete=True, n_tokens=existing.get("n_tokens"),
                   wall_s=time.perf_counter() - t0)
    return summary


def _harvest_locked(run: _HarvestRun, summary: dict, finalize: bool, barrier_timeout_s: float) -> int:
    """Under this worker's lock on each store: create or resume the stores, harvest this worker's shards that
    some store lacks, then finalise (`_finalize`) unless preempted or `finalize` is False. Updates `summary`
    (shards_written, tokens_written, preempted, complete, n_tokens); returns the tokens written per store.
    DirectoryBusyError naming the holder when another process harvests these shards."""
    from sae_dist.store import create_store

    with ExitStack() as locks:
        for t in run.targets:
            locks.enter_context(DirectoryLock(t.store_path, f"sae-harvest worker {run.rank} of {run.world_size}",
                                              lock_file=harvest_lock_file(t.store_path, run.rank)))
        g = run.geom
        done = run.done_shards()
        _check_disk_space(run, len(done))
        groups = [create_store(t.store_path, n_tokens=g.n_tokens, d_in=run.d_model, dtype=run.dtype,
                               chunk_tokens=g.chunk_tokens, shard_tokens=g.shard_tokens,
                               attrs={**t.store_attrs, "harvest": run.harvest_info}) for t in run.targets]
        todo = [s for s in range(g.n_shards) if s % run.world_size == run.rank and s not in done]
        if done and run.rank == 0:
            _log(f"resuming: {len(done)}/{g.n_shards} shards already done", run.rank)
        written, preempted = 0, False
        if todo:
            with Preemption("sae-harvest") as preempt:
                written, preempted = _harvest_shards(run, groups, todo, should_stop=lambda: preempt.requested)
        now_done = run.done_shards()
        summary["shards_written"] = sum(1 for s in todo if s in now_done)
        summary["tokens_written"] = written
        summary["preempted"] = preempted
        if preempted:
            _log(f"stopped on SIGTERM after {written} tokens (every written shard is kept); rerun the same "
                 "command to resume", run.rank)
        if finalize and not preempted:
            _finalize(run, summary, barrier_timeout_s)
    return written


def _check_disk_space(run: _HarvestRun, n_done: int) -> None:
    """Log (rank 0) the size on disk of the stores this harvest writes (`plan.harvest_store_bytes`) and the free
    space; HarvestError, before any LM forward, when the shards still to write need more than is free."""
    import shutil

    from sae_dist.plan import format_bytes, harvest_store_bytes

    g = run.geom
    per_store = harvest_store_bytes(g.n_tokens, run.d_model, dtype=run.dtype, ctx_len=g.ctx_len,
                                    seqs_per_chunk=g.seqs_per_chunk, seqs_per_shard=g.seqs_per_shard)["total_bytes"]
    need = per_store * len(run.targets) * (g.n_shards - n_done) / g.n_shards
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(run.targets[0].store_path))).free
    where = os.path.dirname(os.path.abspath(run.targets[0].store_path))
    if run.rank == 0:
        _log(f"{g.n_tokens:,} tokens x {run.d_model} {run.dtype}: {format_bytes(per_store)} per store, "
             f"{len(run.targets)} store(s); {format_bytes(need)} still to write, {format_bytes(free)} free in "
             f"{where}", run.rank)
    if need > free:
        raise HarvestError(
            f"the harvest still has {format_bytes(need)} to write ({len(run.targets)} store(s) of {g.n_tokens:,} "
            f"tokens x {run.d_model} {run.dtype}) but {where} has {format_bytes(free)} free; free some space, or "
            "use another store.path, fewer harvest.tokens or harvest.dtype=bfloat16/float16")


def _finalize(run: _HarvestRun, summary: dict, barrier_timeout_s: float) -> None:
    """Meet the other workers (torch.distributed barrier, when there is a process group or a torchrun env);
    when every shard is marked in every store, rank 0 (or, without a process group, this worker) finalises the
    stores (`_write_final`) and `summary` gets complete and n_tokens."""
    from sae_dist.store import done_shards

    g = run.geom
    dist, created = _maybe_dist(run.world_size, run.rank, barrier_timeout_s)
    try:
        if dist is not None:
            dist.barrier()
        done = run.done_shards()
        all_done = all(s in done for s in range(g.n_shards))
        if all_done and (run.rank == 0 or dist is None):
            for t in run.targets:
                _write_final(run, t, done_shards(t.store_path))
        if dist is not None:
            dist.barrier()  # nobody returns (and reads the stores) before rank 0 has finalised
        if all_done:
            summary["complete"] = True
            summary["n_tokens"] = _final_n_tokens(done, g, run.targets[0].store_path)
    finally:
        if created:
            dist.destroy_process_group()


def _write_final(run: _HarvestRun, target: _Target, done: dict) -> None:
    """Finalise `target`'s store from its shard markers `done` (every shard present): trim to the rows written,
    merge the norm stats, mark the harvest complete. HarvestError when no train sequence was written at all."""
    from sae_dist.store import finalize_store, merge_norm_stats

    g = run.geom
    final_n = _final_n_tokens(done, g, target.store_path)
    if final_n == 0:
        raise HarvestError(
            f"the corpus gave no train sequence of ctx_len={g.ctx_len} tokens (documents "
            f"shorter than {g.ctx_len - 1} tokens are dropped, and eval_fraction="
            f"{run.eval_fraction} are held out); use more data or a shorter ctx_len"
        )
    stats = merge_norm_stats([done[s]["norm_stats"] for s in range(g.n_shards) if done[s].get("n_tokens", 0) > 0])
    end_of_data = any(done[s].get("end_of_data") for s in range(g.n_shards))
    final_attrs = {
        **target.store_attrs,
        "n_tokens": final_n,
        "norm_stats": stats,
        "harvest": {**run.harvest_info, "complete": True, "n_tokens": final_n, "end_of_data": bool(end_of_data)},
    }
    finalize_store(target.store_path, final_n, final_attrs)
    if end_of_data:
        _log(f"the corpus ended after {final_n} tokens (asked for {g.n_tokens}); store trimmed", run.rank)
    _log(f"store {target.store_path} complete: {final_n} tokens x {run.d_model}", run.rank)


def _final_n_tokens(done: dict, geom: _Geometry, store_path: str) -> int:
    """Rows actually written: full shards, then at most one partial shard, then only empty shards."""
    total = 0
    short_seen = None
    for s in range(geom.n_shards):
        n = int(done[s].get("n_seqs", 0))
        if short_seen is not None and n > 0:
            raise HarvestError(
                f"store {store_path!r}: shard {s} has {n} sequences although shard {short_seen} was "
                "short (the corpus ended there); the workers saw different corpora. Delete the store "
                "and harvest again with identical data on every worker."
            )
        total += n
        expected_full = geom.seqs_per_shard if s < geom.n_shards - 1 else None
        if expected_full is not None and n < expected_full and short_seen is None:
            short_seen = s
    return total * geom.body


class _WriteQueue:
    """One background thread running the shard writes in submission order, one at a time: `submit` first waits
    for the write in flight, so at most one shard is being written while the caller fills the next. A write's
    exception is re-raised in the caller: by `raise_failed` once it has happened, else by the next `submit` or
    by `close`."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sae-harvest-writer")
        self._inflight: Future | None = None

    def raise_failed(self) -> None:
        """Re-raise the exception of the write in flight if it has already failed (does not wait)."""
        f = self._inflight
        if f is not None and f.done() and f.exception() is not None:
            self._inflight = None
            f.result()

    def wait(self) -> None:
        """Wait for the write in flight (if any); its exception is re-raised here."""
        f, self._inflight = self._inflight, None
        if f is not None:
            f.result()

    def submit(self, fn, *args) -> None:
        """Wait for the write in flight (re-raising its exception), then start fn(*args) in the writer thread."""
        self.wait()
        self._inflight = self._pool.submit(fn, *args)

    def close(self, failing: BaseException | None, rank: int) -> None:
        """Wait for the write in flight and stop the thread. Its exception is re-raised, unless the caller is
        already failing with `failing`: then it is logged and added to `failing` as a note."""
        try:
            self.wait()
        except BaseException as e:
            if failing is None:
                raise
            failing.add_note(f"the background shard write failed too: {e!r}")
            _log(f"the background shard write failed too: {e!r}", rank)
        finally:
            self._pool.shutdown(wait=True)


class _ShardWriter:
    """This worker's shard in progress: its sequences' token ids, their LM activations at each hook (in a host
    buffer per hook, pinned when the LM is on CUDA) and the sequences not yet run through the LM. `write_shard`
    hands a full shard to a background thread (`_WriteQueue`), which writes it into each store with ONE
    `write_block` and then marks it done there, while the LM fills the next shard in the other set of buffers.

    Memory: two shard buffers of `rows` x d_model (store dtype) per hook, plus the permuted copy of one shard
    while it is written. The GPU does not wait for the host per batch: activations are copied out with
    non_blocking, and each sequence's finiteness flag is copied out the same way; both are synchronised and
    read once per shard (`_check_landed`)."""

    def __init__(self, run: _HarvestRun, groups: list, bar, rows: int):
        self.run, self.groups, self.bar = run, groups, bar
        self.written = 0  # token rows written and marked done by this call (per store)
        pin = run.device.type == "cuda" and torch.cuda.is_available()
        dt, n_t = STORE_DTYPES[run.dtype], len(run.targets)
        #: two sets of per-hook [rows, d_model] host buffers: one being filled, one being written
        self.buffers = [[torch.empty((rows, run.d_model), dtype=dt, pin_memory=pin) for _ in range(n_t)]
                        for _ in range(2)]
        self.cur = 0  # the set being filled
        #: bool [hooks, sequences]: the shard's sequences with a non-finite activation at each hook (a row per
        #: hook, so that each batch's copy lands in contiguous memory: a strided one would wait)
        self.nonfinite = torch.zeros((n_t, -(-rows // run.geom.body)), dtype=torch.bool, pin_memory=pin)
        self.copied_from: set[torch.device] = set()  # CUDA devices with copies to the host in flight
        self.queue = _WriteQueue()
        self.clear()
        self.pending: list[list[int]] = []  # sequences not yet run through the LM

    def add(self, i: int, seq: list[int]) -> None:
        """Queue sequence `i` (token ids incl. BOS) of the current shard; runs the LM on a full batch."""
        self.seq_ids.append(seq)
        self.seq_index.append(int(i))
        self.pending.append(seq)
        if len(self.pending) >= self.run.batch_size:
            self.flush_pending()
            self.bar.update(self.run.batch_size * self.run.geom.body)

    def flush_pending(self) -> None:
        """Run the LM on the pending sequences and start copying each hook's activations at positions 1.. (store
        dtype) and their finiteness flags to the host (no wait). HarvestError for a width other than d_model;
        a failed background write is re-raised here."""
        run, pending = self.run, self.pending
        if not pending:
            return
        self.queue.raise_failed()
        ids = torch.tensor(pending, dtype=torch.long)  # run_to_hooks checks them here, then moves them
        lo = len(self.seq_ids) - len(pending)
        with torch.inference_mode():
            acts = run_to_hooks(run.model, [t.spec for t in run.targets], ids)
            for k, (t, a) in enumerate(zip(run.targets, acts, strict=True)):
                a = self._checked(t.name, a[:, 1:, :].to(STORE_DTYPES[run.dtype]))
                n, body = a.shape[0], a.shape[1]
                self._copy_out(a, self.buffers[self.cur][k][lo * body : (lo + n) * body].view(n, body, -1))
                self._copy_out((~torch.isfinite(a)).flatten(1).any(1), self.nonfinite[k, lo : lo + n])
        self.batches.append((lo, len(self.seq_ids)))
        self.pending = []

    def _copy_out(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """dst (host, contiguous: else torch copies through a pageable temporary and waits) <- src (any
        device), without waiting for a CUDA source (`_check_landed` waits)."""
        on_cuda = src.device.type == "cuda"
        dst.copy_(src, non_blocking=on_cuda)  # another device (CPU, ...): a plain copy, done on return
        if on_cuda:
            self.copied_from.add(src.device)

    def _checked(self, hook: str, a: torch.Tensor) -> torch.Tensor:
        """`a` [n, body, d] of the pending sequences at `hook`; HarvestError if not d_model wide."""
        if a.shape[-1] != self.run.d_model:
            raise HarvestError(
                f"hook {hook!r} gives activations of width {a.shape[-1]}, but the model config says "
                f"d_model={self.run.d_model}; this hook point is not supported for {type(self.run.model).__name__}"
            )
        return a

    def _check_landed(self) -> None:
        """Wait for the shard's copies to the host (one synchronisation per device); HarvestError for a
        non-finite activation, naming the first batch that has one and its bad sequences."""
        for dev in self.copied_from:
            torch.cuda.current_stream(dev).synchronize()
        self.copied_from = set()
        bad = self.nonfinite[:, : len(self.seq_ids)].numpy()
        if not bad.any():
            return
        for lo, hi in self.batches:
            for k, t in enumerate(self.run.targets):
                rows = np.flatnonzero(bad[k, lo:hi]).tolist()
                if rows:
                    batch = self.seq_index[lo:hi]
                    raise HarvestError(
                        f"non-finite activations at hook {t.name!r} in the batch of sequences {batch[:8]}"
                        f"{'...' if len(batch) > 8 else ''} (bad: {[batch[b] for b in rows[:8]]}) in dtype "
                        f"{STORE_DTYPES[self.run.dtype]}; try dtype='float32' or check the model"
                    )

    def write_shard(self, s: int, end_of_data: bool) -> None:
        """Hand the buffered sequences to the background writer as shard `s` of every store (none: an empty
        shard), after the previous shard's write has finished (its exception is re-raised here); advances the
        progress bar by the rows the LM had not yet run on. HarvestError for a non-finite activation."""
        body = self.run.geom.body
        left = len(self.pending)
        self.flush_pending()
        self._check_landed()
        n = len(self.seq_ids)
        acts = [b[: n * body] for b in self.buffers[self.cur]]
        self.queue.submit(self._write, s, end_of_data, acts, self.seq_ids, self.seq_index)
        self.cur = 1 - self.cur  # the other set: its shard's write has finished
        self.clear()
        self.bar.update(left * body)

    def _write(self, s: int, end_of_data: bool, acts: list[torch.Tensor], seq_ids: list[list[int]],
               seq_index: list[int]) -> None:
        """(writer thread) Write shard `s` into every store with ONE `write_block` (rows permuted by the row
        order) and then mark it done there (info: n_seqs, n_tokens, first_seq, end_of_data, norm_stats, rank).
        acts: per hook, the shard's host rows [n * body, d_model] in sequence order."""
        from sae_dist.store import mark_shard_done, norm_stats_partial, write_block
        from sae_dist.store.layout import to_numpy

        body = self.run.geom.body
        n = len(seq_ids)
        start_seq = s * self.run.geom.seqs_per_shard
        if n:
            perm = np.arange(n * body) if self.run.row_order == "text" else shard_row_permutation(s, n * body)
            tok = np.asarray(seq_ids, dtype=np.int32)[:, 1:].reshape(-1)[perm]
            sidx = np.repeat(np.asarray(seq_index, dtype=np.int64), body)[perm]
            pos = np.tile(np.arange(1, body + 1, dtype=np.int32), n)[perm]
        for t, group, a in zip(self.run.targets, self.groups, acts, strict=True):
            stats = None
            if n:
                acts_np = to_numpy(a)[perm]
                write_block(group, start_seq * body, acts_np, token_ids=tok, seq_index=sidx, position=pos)
                stats = norm_stats_partial(acts_np)
            info = {"n_seqs": n, "n_tokens": n * body, "first_seq": start_seq,
                    "end_of_data": bool(end_of_data), "norm_stats": stats, "rank": self.run.rank}
            mark_shard_done(t.store_path, s, info)
        self.written += n * body

    def clear(self) -> None:
        """Drop the buffered sequences (the activations in the current buffers are overwritten by the next)."""
        self.seq_ids: list[list[int]] = []  # sequences of the current shard (token ids incl. BOS)
        self.seq_index: list[int] = []  # their global sequence indices
        self.batches: list[tuple[int, int]] = []  # the LM batches so far: [lo, hi) positions in the shard

    def close(self, failing: BaseException | None) -> None:
        """Wait for the shard being written and stop the writer thread (`_WriteQueue.close`)."""
        self.queue.close(failing, self.run.rank)


def _harvest_shards(run: _HarvestRun, groups: list, todo: list[int], should_stop=None) -> tuple[int, bool]:
    """Walk the sequence stream, run the LM on this worker's unfinished shards `todo` and write them (in a
    background thread, `_ShardWriter`; every write has finished, and its shard is marked, when this returns or
    raises). Returns (tokens written, stopped): `should_stop()` is asked after every shard handed to the
    writer, and True ends the walk there (preemption)."""
    from tqdm.auto import tqdm

    g = run.geom
    bar = tqdm(total=sum(g.shard_tokens_planned(s) for s in todo), unit="tok", unit_scale=True,
               disable=not run.progress, position=run.rank, desc=f"harvest r{run.rank}", dynamic_ncols=True,
               leave=run.rank == 0)
    writer = _ShardWriter(run, groups, bar, rows=min(g.seqs_per_shard, g.n_seqs) * g.body)
    try:
        n_avail, stopped, cur_shard = _walk_stream(run, writer, set(todo), should_stop)
        if n_avail is not None and n_avail < g.n_seqs:
            _write_after_end(run, writer, set(todo), n_avail, cur_shard)
    except BaseException as e:
        writer.close(e)
        raise
    else:
        writer.close(None)
    finally:
        bar.close()
    return writer.written, stopped


def _walk_stream(run: _HarvestRun, writer: _ShardWriter, todo: set[int],
                 should_stop) -> tuple[int | None, bool, int | None]:
    """Feed the packed train sequences of the shards in `todo` to `writer`, writing each shard as it
    completes, up to n_seqs sequences or the last shard needed. Returns (n_avail, stopped, cur_shard):
    n_avail the number of sequences in the corpus when the stream ended (else None), stopped whether
    `should_stop()` ended the walk, cur_shard the shard still buffered in `writer` (None if none)."""
    g = run.geom
    last_needed = max(todo)
    stream, n_known = _sequence_stream(run, todo)
    cur_shard: int | None = None
    p = -1
    for p, i, seq in stream:
        s = p // g.seqs_per_shard
        if p >= g.n_seqs or s > last_needed:
            return None, False, cur_shard
        if s not in todo:
            continue
        if cur_shard != s:
            if cur_shard is not None:
                writer.write_shard(cur_shard, end_of_data=False)
            cur_shard = s
        writer.add(i, seq)
        if (p + 1) % g.seqs_per_shard == 0 or p + 1 == g.n_seqs:
            writer.write_shard(s, end_of_data=False)
            cur_shard = None
            if should_stop is not None and should_stop():
                return None, True, cur_shard
    if n_known is None:  # the text ran out
        return p + 1, False, cur_shard
    return (n_known if n_known < g.n_seqs else None), False, cur_shard


def _sequence_stream(run: _HarvestRun,
                     todo: set[int]) -> tuple[Iterable[tuple[int, int, list[int]]], int | None]:
    """((shard position, sequence index, token ids) in position order, covering at least the shards in
    `todo`; the corpus size in sequences when known): the pretokenised sequences of `todo`'s shards only
    (position p holds sequence `sequence_order(n)[p]` with row_order shuffled_global, else p), else the whole
    packed text (position = sequence index)."""
    g = run.geom
    if run.sequences is None:
        seqs = packed_sequences(run.docs, run.tokenizer, g.ctx_len, eval_fraction=run.eval_fraction, split="train")
        return ((i, i, seq) for i, seq in enumerate(seqs)), None
    n = len(run.sequences)
    order = sequence_order(min(n, g.n_seqs)) if run.row_order == "shuffled_global" else None
    pos = (p for s in sorted(todo) for p in range(s * g.seqs_per_shard, min((s + 1) * g.seqs_per_shard, g.n_seqs, n)))
    idx = ((p, p if order is None else int(order[p])) for p in pos)
    return ((p, i, run.sequences[i]) for p, i in idx), n


def _write_after_end(run: _HarvestRun, writer: _ShardWriter, todo: set[int], n_avail: int,
                     cur_shard: int | None) -> None:
    """The corpus ran out after `n_avail` sequences: finish the shard it ended in and mark this worker's
    later shards empty (all with end_of_data)."""
    end_shard = n_avail // run.geom.seqs_per_shard
    for s in sorted(todo):
        if s < end_shard:
            continue  # already written by `_walk_stream`
        if not (s == end_shard and cur_shard == s):
            writer.clear()
        writer.write_shard(s, end_of_data=True)
