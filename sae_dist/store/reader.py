"""`ActivationStore`: endless, shuffled, dp-split, prefetched, normalised batches from a store; the input
normalisation of activations and its exact inverse.

Order of rows (a pure function of ``seed``, the epoch and the batch index, so resume is exact and
free). The read unit is one inner zarr chunk (``chunk_tokens`` rows; zarr's sharding codec reads it
alone), so the shuffle buffer gathers chunks from all over the store.

1. Epoch e permutes the read units (every inner chunk of every shard) with
   ``np.random.default_rng([seed, e, 0])``.
2. The permuted units are cut into groups of ``shuffle_shards * shard_tokens / chunk_tokens``
   consecutive units (the shuffle buffer: ``shuffle_shards`` shards' worth of rows). Group g's rows
   (its units concatenated in permuted order) are permuted with ``np.random.default_rng([seed, e, 1, g])``.
3. The epoch's row stream is the concatenation of the permuted groups; global batch j is stream
   positions ``[j*B, (j+1)*B)`` (B = batch_tokens; a batch may straddle two groups). The incomplete
   last global batch of each epoch (``tokens_per_epoch % B`` rows) is dropped, so every epoch has
   ``tokens_per_epoch // B`` batches and no row appears twice in an epoch.
4. dp rank r gets rows ``[r*b, (r+1)*b)`` of each global batch (b = B // dp_size): the union over
   ranks is exactly the single-process global batch, whatever dp_size is. Every rank reads its
   groups' units whole (page cache is shared on a node) and gathers only its own rows; the ranks of
   a ``share_group`` (a tensor-parallel group, one dp rank) read once, on ``share_src``.

With ``shuffle=False`` units and rows keep store order (stream = rows 0, 1, 2, ...).

How well a batch mixes documents: two rows of a batch come from the same unit with probability about
1 / G (G units per group). With the harvest's ``row_order = "shuffled_in_shard"`` (text input) each
document's rows are spread over one shard, so the same-document rate of a batch is about (1 + N / (W * G))
times that of a uniform sample of the store (N store rows, W rows per shard); with ``"shuffled_global"``
(pretokenised input) a shard is a uniform sample of the text's sequences and only a sequence's own rows stay
in one shard: about 1 + N / (c * W * G), c the length-weighted mean document length in sequences. A store
in text order keeps a document's rows in one or two units: about N / (G * chunk_tokens). docs/internals.md
has the derivation and measurements.

Reader states of the earlier order (version 1: whole shards as the read unit) resume with that order.

Resuming from ``state_dict() == {"epoch": e, "batch": j, ...}`` recomputes which group holds position
j*B and starts there; nothing is replayed. A state saved at one dp_size can be loaded at another
(same batch_tokens): the global batch sequence does not depend on dp_size.

Input normalisation (`normalize`, `denormalize`, `scalar_scale`), applied to every batch:
Modes (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", sec. 2.1 and appendix):

- ``"layer_norm"``: per token, subtract the mean over d_in and scale to unit L2 norm (the paper's
  LayerNorm without affine parameters); we multiply by sqrt(d) so that ||x_n|| = sqrt(d) (entries of
  order 1). ctx = {"mean": [..., 1], "norm": [..., 1]} (the norm after the eps floor) so `denormalize`
  restores x exactly (up to float rounding).
- ``"scalar"``: x_n = s * x with one dataset-wide scalar s = sqrt(d) / E||x|| (`scalar_scale`, from
  the store's norm_stats), so E||x_n|| = sqrt(d). ctx = {"scale": s}. Linear, hence foldable into
  exported SAE weights.
- ``"none"``: identity.

Functions accept torch tensors or numpy arrays [..., d] and return the same kind; half-precision
inputs are computed in float32 and returned in their own dtype.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from zarr.buffer import default_buffer_prototype

from sae_dist.parallel.comm import broadcast_from
from sae_dist.store.errors import IncompleteStoreError, NonFiniteError, StoreError
from sae_dist.store.layout import (
    BF16,
    HARVEST_RESUME_HINT,
    chunk_grid,
    done_shards,
    dtype_name,
    merge_norm_stats,
    norm_stats_from_data,
    open_store,
    read_attrs,
)

__all__ = ["ActivationStore", "MODES", "check_mode", "scalar_scale", "normalize", "denormalize"]

_STATE_VERSION = 2  # 1: whole shards as the read unit; 2: inner chunks
_ND = default_buffer_prototype().nd_buffer


# ----------------------------------------------------------------------------------------- normalisation
MODES = ("layer_norm", "scalar", "none")
EPS = 1e-8


def check_mode(mode) -> str:
    """Return the canonical mode name (None -> "none"); ValueError listing the valid modes otherwise."""
    if mode is None:
        return "none"
    if mode not in MODES:
        raise ValueError(f"unknown normalisation mode {mode!r}; valid modes: {list(MODES)}")
    return mode


def scalar_scale(norm_stats: Mapping[str, Any], d: int) -> float:
    """s = sqrt(d) / E||x|| for the "scalar" mode, from a store's ``norm_stats`` attribute.

    Args: norm_stats with "mean_norm" (mean L2 norm of activation rows, > 0); d = d_in.
    Raises: ValueError if mean_norm is missing, non-finite or <= 0.
    """
    try:
        mean_norm = float(norm_stats["mean_norm"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"norm_stats {norm_stats!r} has no usable 'mean_norm'; recompute it with "
                         f"sae_dist.store.finalize_store or write_store") from None
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise ValueError(f"norm_stats mean_norm={mean_norm} must be finite and > 0 for scalar normalisation")
    return math.sqrt(d) / mean_norm


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def normalize(x, mode: str, scale: float | None = None):
    """Normalise activations x [..., d] (torch or numpy).

    Args:
        x: activations, last axis = d_in.
        mode: "layer_norm" | "scalar" | "none" (see module docstring).
        scale: s for "scalar" mode (required there, see `scalar_scale`); ignored otherwise.
    Returns: (x_n, ctx): x_n like x (same shape, dtype, device); ctx a dict for `denormalize`.
    Raises: ValueError for an unknown mode or a missing/invalid scale in "scalar" mode.
    """
    mode = check_mode(mode)
    if mode == "none":
        return x, {}
    if mode == "scalar":
        if scale is None or not math.isfinite(float(scale)) or float(scale) <= 0:
            raise ValueError(f"scalar normalisation needs a finite scale > 0 (scalar_scale(norm_stats, d)), "
                             f"got {scale!r}")
        return x * float(scale), {"scale": float(scale)}
    d = x.shape[-1]
    if _is_torch(x):
        import torch

        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        mean = xf.mean(dim=-1, keepdim=True)
        xc = xf - mean
        norm = torch.linalg.vector_norm(xc, dim=-1, keepdim=True).clamp_min(EPS)
        out = xc * (math.sqrt(d) / norm)
        return out.to(x.dtype), {"mean": mean, "norm": norm}
    a = np.asarray(x)
    af = a.astype(np.float32) if a.dtype.itemsize < 4 else a
    mean = af.mean(axis=-1, keepdims=True)
    xc = af - mean
    norm = np.maximum(np.sqrt(np.sum(xc * xc, axis=-1, keepdims=True)), EPS).astype(af.dtype)
    out = xc * (math.sqrt(d) / norm)
    return out.astype(a.dtype), {"mean": mean, "norm": norm}


def denormalize(x_n, mode: str, ctx: Mapping[str, Any]):
    """Invert `normalize`: map x_n [..., d] (or a reconstruction of it) back to activation space.

    Args: x_n as returned by normalize (or an SAE reconstruction), mode, ctx from that normalize call.
    Returns: x like x_n. Raises: ValueError for an unknown mode or a ctx missing its keys.
    """
    mode = check_mode(mode)
    if mode == "none":
        return x_n
    if mode == "scalar":
        if "scale" not in ctx:
            raise ValueError("denormalize(mode='scalar') needs ctx['scale'] from normalize()")
        return x_n / ctx["scale"]
    if "mean" not in ctx or "norm" not in ctx:
        raise ValueError("denormalize(mode='layer_norm') needs ctx['mean'] and ctx['norm'] from normalize()")
    d = x_n.shape[-1]
    if _is_torch(x_n):
        import torch

        xf = x_n.float() if x_n.dtype in (torch.float16, torch.bfloat16) else x_n
        return (xf * (ctx["norm"] / math.sqrt(d)) + ctx["mean"]).to(x_n.dtype)
    a = np.asarray(x_n)
    af = a.astype(np.float32) if a.dtype.itemsize < 4 else a
    return (af * (ctx["norm"] / math.sqrt(d)) + ctx["mean"]).astype(a.dtype)


__all__ = ["MODES", "EPS", "normalize", "denormalize", "scalar_scale", "check_mode"]


# ----------------------------------------------------------------------------------------- reader
def worker_result(q: queue.Queue, thread: threading.Thread, close, stopped_message: str):
    """The next ("ok", item) of a background worker's queue: its item. A ("error", exception) entry, or the
    worker's thread ending with nothing queued, calls `close()` and raises that exception, or
    RuntimeError(`stopped_message`)."""
    while True:
        try:
            kind, item = q.get(timeout=1.0)
            break
        except queue.Empty:
            if not thread.is_alive():
                close()
                raise RuntimeError(stopped_message) from None
    if kind == "error":
        close()
        raise item
    return item


def _check_int(name: str, v, lo: int) -> int:
    """int(v) for an int (numpy ints included, bools not) >= lo; ValueError naming the argument otherwise."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return int(v)


def _native_to_torch(a: np.ndarray) -> torch.Tensor:
    """Zero-copy torch view of a numpy activation array (ml_dtypes.bfloat16 -> torch.bfloat16)."""
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


class ActivationStore:
    """Iterator of float32 activation batches ``[batch_tokens // dp_size, d_in]`` on ``device``.

    Endless (epochs follow each other); see the module docstring for the exact order, the dp split and
    the epoch tail (the incomplete last global batch of each epoch is dropped).

    Args:
        path: store directory (written by `sae-harvest` or `write_store`).
        batch_tokens: global batch size B (tokens over all dp ranks); must be divisible by dp_size and
            at most the store's token count.
        dp_rank, dp_size: this process's data-parallel rank and the dp world size.
        seed: non-negative int; the order is a pure function of (seed, epoch, batch index).
        shuffle: permute shards and rows (False: store order).
        shuffle_shards: shards read together and shuffled as one buffer (memory: this many shards of
            the store dtype, plus one batch).
        prefetch: batches prepared ahead by a background daemon thread (0: no thread, read inline).
        device: torch device of the returned batches ("cpu", "cuda", "cuda:1", ...).
        normalize: "layer_norm" | "scalar" | "none" (`normalize`; Gao et al. 2024 sec. 2.1).
        check_finite: raise NonFiniteError naming the token rows / chunk if a batch holds NaN or Inf.
        allow_incomplete: read a store whose harvest is unfinished, using only shards with progress
            markers (otherwise IncompleteStoreError).
        read_ahead: read the next shuffle group in a helper thread while serving the current one
            (hides read latency; host memory: two groups instead of one).
        share_group, share_src: a torch.distributed group whose ranks need the same batches (a
            tensor-parallel group: its ranks share dp_rank) and the global rank in it that reads the
            store. The others read nothing and start no thread: each batch reaches them by broadcast in
            the store's dtype (`sae_dist.parallel.comm.broadcast_from`; a read error on share_src
            makes them raise RuntimeError naming it), and their position advances with it, so
            state_dict() is the same on every rank. None: this rank reads its own batches.

    Attributes: d_in, n_tokens, attrs (group attributes), scale (s in "scalar" mode, else None),
        tokens_per_epoch, batches_per_epoch, local_batch_tokens, epoch, batch_index (next batch).
    Raises (constructor): StoreError (missing / invalid store), IncompleteStoreError, ValueError for
        bad arguments. During iteration: StoreError naming the shard file for missing/corrupt shards,
        NonFiniteError naming rows and chunk; exceptions of the prefetch thread are re-raised here.
    """

    def __init__(self, path, *, batch_tokens: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 shuffle: bool = True, shuffle_shards: int = 4, prefetch: int = 2, device="cpu",
                 normalize: str = "layer_norm", check_finite: bool = True, allow_incomplete: bool = False,
                 read_ahead: bool = True, share_group=None, share_src: int = 0):
        self.path = os.fspath(path)
        self.batch_tokens = _check_int("batch_tokens", batch_tokens, 1)
        self.dp_size = _check_int("dp_size", dp_size, 1)
        self.dp_rank = _check_int("dp_rank", dp_rank, 0)
        if self.dp_rank >= self.dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be < dp_size={dp_size}")
        if self.batch_tokens % self.dp_size:
            raise ValueError(f"batch_tokens={batch_tokens} is not divisible by dp_size={dp_size}; choose a "
                             f"batch_tokens that is a multiple of the data-parallel size, e.g. "
                             f"{max(1, self.batch_tokens // self.dp_size) * self.dp_size}")
        self.seed = _check_int("seed", seed, 0)
        self.shuffle = bool(shuffle)
        self.shuffle_shards = _check_int("shuffle_shards", shuffle_shards, 1)
        self.prefetch = _check_int("prefetch", prefetch, 0)
        self.device = torch.device(device)
        self.normalize = check_mode(normalize)
        self.check_finite = bool(check_finite)
        self.read_ahead = bool(read_ahead)
        if share_group is not None and not torch.distributed.is_initialized():
            raise ValueError("share_group needs an initialised torch.distributed process group")
        self.share_group, self.share_src = share_group, _check_int("share_src", share_src, 0)
        #: whether this process reads the store (False on the receiving ranks of a `share_group`)
        self.computes = share_group is None or torch.distributed.get_rank() == self.share_src
        self.local_batch_tokens = self.batch_tokens // self.dp_size

        complete = self._open_activations()
        self._batch_dtype = _native_to_torch(np.empty(0, dtype=self._acts.dtype)).dtype  # up to the device
        self._complete, self._allow_incomplete = complete, bool(allow_incomplete)
        self._set_units(_STATE_VERSION)
        self.tokens_per_epoch = int(self._unit_sizes.sum())
        self.batches_per_epoch = self.tokens_per_epoch // self.batch_tokens
        if self.batches_per_epoch == 0:
            raise ValueError(f"batch_tokens={self.batch_tokens} exceeds the {self.tokens_per_epoch} tokens "
                             f"available in store {self.path!r}; lower batch_tokens or harvest more tokens")
        self.scale: float | None = self._scalar_scale(complete) if self.normalize == "scalar" else None

        self.epoch = 0
        self.batch_index = 0
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._gen: Iterator | None = None

    # ------------------------------------------------------------------ opening

    def _open_activations(self) -> bool:
        """Open the store's `activations` and set _acts, attrs, n_tokens, d_in, dtype, chunk_tokens,
        shard_tokens; returns whether the harvest is complete (a store without a harvest attribute, written
        by another tool, is). StoreError for a missing store or an activation dtype we do not read."""
        g = open_store(self.path, "r")
        self._acts = g["activations"]
        self.attrs: dict[str, Any] = read_attrs(g)
        self.n_tokens, self.d_in = (int(s) for s in self._acts.shape)
        self.dtype = dtype_name(self._acts.dtype)
        if self.dtype not in ("float16", "bfloat16", "float32"):
            raise StoreError(f"store {self.path!r}: activations dtype {self.dtype} is not float16/bfloat16/float32")
        self.chunk_tokens, self.shard_tokens = chunk_grid(self._acts)
        self._own_layout = "layout_version" in self.attrs
        return bool((self.attrs.get("harvest") or {"complete": True}).get("complete", False))

    def _set_units(self, version: int) -> None:
        """The read units and the units per shuffle group of order `version` (1: shards, 2: inner chunks)."""
        rows = self.shard_tokens if version == 1 else self.chunk_tokens
        shards = self._readable_shards(self._complete, self._allow_incomplete)
        self._units = [(i, a, min(a + rows, hi)) for i, lo, hi in shards for a in range(lo, hi, rows)]
        self._unit_sizes = np.array([hi - lo for _, lo, hi in self._units], dtype=np.int64)
        self._group_units = self.shuffle_shards * (self.shard_tokens // rows)
        self._order_version = version

    def _readable_shards(self, complete: bool, allow_incomplete: bool) -> list[tuple[int, int, int]]:
        """(shard index, first row, end row) of the readable shards: every shard of a complete store;
        of an unfinished one (only with allow_incomplete, else IncompleteStoreError) the shards with a
        progress marker, cut to the rows the marker says were written (IncompleteStoreError if none)."""
        n_shards = math.ceil(self.n_tokens / self.shard_tokens)
        if complete:
            return [(i, i * self.shard_tokens, min((i + 1) * self.shard_tokens, self.n_tokens))
                    for i in range(n_shards)]
        if not allow_incomplete:
            raise IncompleteStoreError(
                f"store {self.path!r}: the harvest is unfinished (attribute harvest.complete is false; "
                f"{len(done_shards(self.path))} of {n_shards} shards done). To finish it, {HARVEST_RESUME_HINT}; "
                f"or pass allow_incomplete=True to read only the finished shards.")
        marks = done_shards(self.path)
        units = []
        for i in sorted(marks):
            if i >= n_shards:
                continue
            lo = i * self.shard_tokens
            hi = min(lo + self.shard_tokens, self.n_tokens)
            if "n_tokens" in marks[i]:
                hi = min(hi, lo + int(marks[i]["n_tokens"]))
            if hi > lo:
                units.append((i, lo, hi))
        if not units:
            raise IncompleteStoreError(f"store {self.path!r}: the harvest is unfinished and no shard is "
                                       f"done yet; {HARVEST_RESUME_HINT}")
        return units

    def _scalar_scale(self, complete: bool) -> float:
        """s = sqrt(d_in) / E||x|| of normalize="scalar", from the norm_stats attribute, else the progress
        markers' partial stats, else (complete store only; UserWarning) one pass over the data. StoreError
        when there are none."""
        ns = self.attrs.get("norm_stats")
        if not (isinstance(ns, dict) and ns.get("mean_norm")):
            parts = [m["norm_stats"] for m in done_shards(self.path).values()
                     if isinstance(m.get("norm_stats"), dict)]
            ns = merge_norm_stats(parts) if parts else None
        if (not ns or not ns.get("n")) and complete:
            warnings.warn(f"store {self.path!r} has no norm_stats attribute; computing it from the data "
                          f"(one pass) for normalize='scalar'", stacklevel=3)
            ns = norm_stats_from_data(self._acts, self.n_tokens)
        if not ns or not ns.get("n"):
            raise StoreError(f"store {self.path!r} has no norm_stats attribute, needed for "
                             f"normalize='scalar'; finish the harvest or use normalize='layer_norm'")
        return scalar_scale(ns, self.d_in)

    # ------------------------------------------------------------------ order (pure functions)

    def epoch_groups(self, epoch: int) -> list[np.ndarray]:
        """Unit (inner chunk) indices into ``self._units`` of each shuffle group of an epoch, in stream order."""
        n, g = len(self._units), self._group_units
        order = (np.random.default_rng([self.seed, epoch, 0]).permutation(n) if self.shuffle
                 else np.arange(n))
        return [order[i : i + g] for i in range(0, n, g)]

    def _group_perm(self, epoch: int, g: int, size: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(size)
        return np.random.default_rng([self.seed, epoch, 1, g]).permutation(size)

    def global_batch_rows(self, epoch: int, batch: int) -> np.ndarray:
        """Store row indices [batch_tokens] of global batch ``batch`` of ``epoch`` (for tests/tools; no I/O)."""
        groups = self.epoch_groups(epoch)
        sizes = [int(self._unit_sizes[u].sum()) for u in groups]
        cum = np.concatenate([[0], np.cumsum(sizes)])
        lo, hi = batch * self.batch_tokens, (batch + 1) * self.batch_tokens
        out = []
        for gi, units in enumerate(groups):
            a, b = max(lo, cum[gi]), min(hi, cum[gi + 1])
            if a >= b:
                continue
            rows = np.concatenate([np.arange(self._units[u][1], self._units[u][2]) for u in units])
            out.append(rows[self._group_perm(epoch, gi, sizes[gi])[a - cum[gi] : b - cum[gi]]])
        return np.concatenate(out)

    # ------------------------------------------------------------------ reading

    def _shard_file(self, shard: int) -> str:
        key = self._acts.metadata.encode_chunk_key((shard, 0))
        return os.path.join(self.path, "activations", *key.split("/"))

    def _where(self, u: int) -> str:
        """Unit u for an error message: its shard's token rows and the rows being read."""
        shard, lo, hi = self._units[u]
        s_lo = shard * self.shard_tokens
        return (f"shard {shard} (token rows [{s_lo}, {min(s_lo + self.shard_tokens, self.n_tokens)}); reading "
                f"rows [{lo}, {hi}))")

    def _read_unit(self, u: int, out: np.ndarray | None = None) -> np.ndarray:
        """Read unit u's rows [hi - lo, d] (one inner chunk of a shard) with one zarr call, into ``out`` if given."""
        shard, lo, hi = self._units[u]
        f = self._shard_file(shard)
        marker = os.path.join(self.path, "_progress", f"shard_{shard:08d}.json")
        hint = (f"Re-harvest it: delete {f} and {marker}, then {HARVEST_RESUME_HINT}; "
                f"for a store made by write_store(), write it again.")
        if not os.path.isfile(f) and not self._own_layout:
            # plain zarr skips all-fill shards (write_empty_chunks=False); our writers never do
            warnings.warn(f"store {self.path!r}: no file {f} for shard {shard}; reading it as zeros (fill value)",
                          stacklevel=2)
        elif not os.path.isfile(f):
            raise StoreError(f"store {self.path!r}: {self._where(u)} is missing: no file "
                             f"{f}. Re-harvest it: delete {marker} (if present), then {HARVEST_RESUME_HINT}; "
                             f"for a store made by write_store(), write it again.")
        try:
            if out is None:
                a = self._acts[lo:hi]
            else:
                self._acts.get_basic_selection((slice(lo, hi),), out=_ND.from_numpy_array(out))
                a = out
        except Exception as e:
            raise StoreError(f"store {self.path!r}: {self._where(u)} is corrupt: cannot "
                             f"decode {f} ({type(e).__name__}: {e}). {hint}") from e
        if a.shape != (hi - lo, self.d_in):
            raise StoreError(f"store {self.path!r}: shard {shard} decoded to shape {a.shape}, expected "
                             f"{(hi - lo, self.d_in)}. {hint}")
        return a

    def _load_group(self, units: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Read a group's shards: (rows [size, d] in the store dtype as a torch tensor, store row of each)."""
        if len(units) == 1:
            raw = self._read_unit(int(units[0]))
        else:
            sizes = self._unit_sizes[units]
            raw = np.empty((int(sizes.sum()), self.d_in), dtype=self._acts.dtype)
            off = 0
            for u, n in zip(units, sizes, strict=True):
                self._read_unit(int(u), out=raw[off : off + n])  # no concatenation copy
                off += n
        rows = np.concatenate([np.arange(self._units[u][1], self._units[u][2]) for u in units])
        return _native_to_torch(raw), rows

    def _raise_nonfinite(self, x: torch.Tensor, store_rows: np.ndarray):
        bad = (~torch.isfinite(x).all(dim=1)).nonzero()[:, 0].numpy()
        if len(bad) == 0:
            return  # the fast check's sum overflowed; the data is finite
        rows = np.sort(store_rows[bad])
        r = int(rows[0])
        c_lo = (r // self.chunk_tokens) * self.chunk_tokens
        c_hi = min(c_lo + self.chunk_tokens, self.n_tokens)
        shard = r // self.shard_tokens
        raise NonFiniteError(
            f"store {self.path!r}: NaN/Inf activations at token row {r} (chunk rows [{c_lo}, {c_hi}) in shard "
            f"{shard}, file {self._shard_file(shard)}; {len(rows)} bad row(s) in this batch, first few: "
            f"{rows[:8].tolist()}). Re-harvest that shard (delete the file and its _progress marker, then "
            f"{HARVEST_RESUME_HINT}), or pass check_finite=False.")

    def _plan(self, epoch: int):
        groups = self.epoch_groups(epoch)
        sizes = [int(self._unit_sizes[u].sum()) for u in groups]
        return groups, sizes, np.concatenate([[0], np.cumsum(sizes)])

    def _batches(self, epoch: int, batch: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Generator of (epoch, batch index, CPU tensor [b, d] in the store's dtype, pinned for a CUDA
        device) from a position, endless.

        With read_ahead, the next shuffle group is read by a helper thread while the current one is
        being served (two groups in memory).
        """
        B, b, r = self.batch_tokens, self.local_batch_tokens, self.dp_rank
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        pool = ThreadPoolExecutor(1, thread_name_prefix="ActivationStore-read") if self.read_ahead else None
        pending: dict[tuple[int, int], Future] = {}

        def load(e: int, gi: int, groups):
            fut = pending.pop((e, gi), None)
            raw, rows = fut.result() if fut is not None else self._load_group(groups[gi])
            if pool is not None:  # start reading the group after this one
                ne, ngi, ngroups = (e, gi + 1, groups) if gi + 1 < len(groups) else (e + 1, 0, self._plan(e + 1)[0])
                pending.clear()
                pending[(ne, ngi)] = pool.submit(self._load_group, ngroups[ngi])
            return raw, rows

        try:
            while True:
                groups, sizes, cum = self._plan(epoch)
                gi, cur = -1, None  # loaded group index, (raw, store rows, permutation)
                while batch < self.batches_per_epoch:
                    lo, hi = batch * B + r * b, batch * B + (r + 1) * b
                    xs, rs = [], []
                    while lo < hi:
                        if gi < 0 or lo >= cum[gi + 1]:
                            gi = int(np.searchsorted(cum, lo, side="right") - 1)
                            cur = None  # free the old group before the next one arrives
                            raw, rows = load(epoch, gi, groups)
                            cur = (raw, rows, torch.from_numpy(self._group_perm(epoch, gi, sizes[gi])))
                        take = min(hi, int(cum[gi + 1])) - lo
                        idx = cur[2][lo - cum[gi] : lo - cum[gi] + take]
                        xs.append(cur[0].index_select(0, idx))
                        rs.append(cur[1][idx.numpy()])
                        lo += take
                    x = xs[0] if len(xs) == 1 else torch.cat(xs)  # the store's dtype, up to the device
                    # fast check: the sum is finite iff every entry is (barring overflow, which the
                    # exact scan in _raise_nonfinite then clears)
                    if self.check_finite and not bool(torch.isfinite(x.sum(dtype=torch.float32))):
                        self._raise_nonfinite(x, np.concatenate(rs))
                    if pin:
                        x = x.pin_memory()
                    yield epoch, batch, x
                    batch += 1
                epoch, batch = epoch + 1, 0
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ prefetch thread

    def _worker(self, gen, q: queue.Queue, stop: threading.Event):
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for item in gen:
                if not put(("ok", item)):
                    return
        except BaseException as e:  # re-raised in the consumer
            put(("error", e))
        finally:
            gen.close()

    def _start(self):
        gen = self._batches(self.epoch, self.batch_index)
        if self.prefetch == 0:
            self._gen = gen
            return
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._worker, args=(gen, self._queue, self._stop),
                                        name=f"ActivationStore-prefetch-r{self.dp_rank}", daemon=True)
        self._thread.start()

    def _next_raw(self):
        if self._gen is None and self._thread is None:
            self._start()
        if self._gen is not None:
            return next(self._gen)
        return worker_result(self._queue, self._thread, self.close,
                             f"ActivationStore prefetch thread for {self.path!r} stopped unexpectedly")

    def __iter__(self):
        return self

    def _read_next(self) -> torch.Tensor:
        epoch, batch, x = self._next_raw()
        assert (epoch, batch) == (self.epoch, self.batch_index), "prefetch order out of sync"
        return x.to(self.device, non_blocking=True)

    def __next__(self) -> torch.Tensor:
        """Next float32 batch [batch_tokens // dp_size, d_in] on self.device, normalised."""
        if self.share_group is None:
            x = self._read_next()
        else:
            x = broadcast_from(self._read_next if self.computes else None, (self.local_batch_tokens, self.d_in),
                               self._batch_dtype, self.device, self.share_group, self.share_src,
                               f"reading a batch of store {self.path!r}")
        self.batch_index += 1
        if self.batch_index == self.batches_per_epoch:
            self.epoch, self.batch_index = self.epoch + 1, 0
        x, _ = normalize(x.float(), self.normalize, self.scale)
        return x

    def close(self):
        """Stop the prefetch thread (idempotent). Iterating again restarts it at the current position."""
        if self._thread is not None:
            self._stop.set()
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=10)
            if self._thread.is_alive():
                warnings.warn("ActivationStore prefetch thread did not stop within 10 s", stacklevel=2)
        if self._gen is not None:
            self._gen.close()
        self._thread = self._queue = self._stop = self._gen = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        """Small dict for exact resume: position of the NEXT batch to be returned plus the order's inputs."""
        return {"version": self._order_version, "epoch": self.epoch, "batch": self.batch_index, "seed": self.seed,
                "batch_tokens": self.batch_tokens, "shuffle": self.shuffle, "shuffle_shards": self.shuffle_shards,
                "tokens_per_epoch": self.tokens_per_epoch, "shard_tokens": self.shard_tokens,
                "chunk_tokens": self.chunk_tokens,
                "dp_size": self.dp_size, "tokens_seen": (self.epoch * self.batches_per_epoch + self.batch_index)
                * self.batch_tokens}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a `state_dict()`: the next batch is the one an uninterrupted run would return.

        dp_size may differ from the saving run's (the global batches are the same). Raises ValueError if
        seed, batch_tokens, shuffle, shuffle_shards, tokens_per_epoch, shard_tokens or chunk_tokens differ (the order
        would differ), naming the value.
        """
        for key in ("seed", "batch_tokens", "shuffle", "shuffle_shards", "tokens_per_epoch", "shard_tokens",
                    "chunk_tokens"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: saved {key}={state[key]!r} but this ActivationStore has "
                                 f"{key}={getattr(self, key)!r}; use the same value (the data order depends on it)")
        version = int(state.get("version", 1))
        if version not in (1, _STATE_VERSION):
            raise ValueError(f"cannot resume: reader state version {version} is newer than this sae-dist's "
                             f"({_STATE_VERSION}); resume with the release that wrote it")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise ValueError(f"invalid resume position epoch={epoch}, batch={batch} "
                             f"(batches_per_epoch={self.batches_per_epoch})")
        self.close()
        if version != self._order_version:
            self._set_units(version)  # the order the run started with
        self.epoch, self.batch_index = epoch, batch


__all__ = ["ActivationStore"]
