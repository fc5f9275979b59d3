"""Activation-store layout: create, write, mark progress, finalize (docs/formats.md#activation-store).

A store is a zarr v3 group (a local directory)::

    <store>/zarr.json                 group attributes (see below)
    <store>/activations/              float16 | bfloat16 | float32  [n_tokens, d_in]
    <store>/token_ids/                int32 [n_tokens]     (optional: stores not made from text)
    <store>/seq_index/                int64 [n_tokens]     (optional: index of the packed sequence)
    <store>/position/                 int32 [n_tokens]     (optional: position inside that sequence)
    <store>/_progress/shard_00000012.json   one marker per finished shard (harvest resume)

Every array is chunked along tokens only: inner chunks of ``chunk_tokens`` rows, grouped into shard
files of ``shard_tokens`` rows by zarr's sharding codec (``activations/c/<shard>/0``). Shard ``i``
holds token rows ``[i * shard_tokens, min((i + 1) * shard_tokens, n_tokens))``; harvest workers each
write whole shards, so no two processes ever write into the same shard file.

Group attributes: ``d_in``, ``n_tokens``, ``dtype`` ("float16" | "bfloat16" | "float32"),
``chunk_tokens``, ``shard_tokens``, ``model``, ``hook``, ``layer``, ``ctx_len``, ``dataset``,
``norm_stats`` (``{"mean_norm", "mean_sq_norm", "n"}``: mean L2 norm and mean squared L2 norm of the
activation rows, over ``n`` rows) and ``harvest`` (``{"complete": bool, ...}``). Attributes callers add
are kept.

bfloat16: zarr 3.1 has no bfloat16 data type of its own. This module registers one (``BFloat16``,
zarr v3 data-type name ``"bfloat16"`` as in the zarr-extensions registry) with zarr's data-type
registry, backed by ``ml_dtypes.bfloat16``; arrays round-trip bit-exactly and numpy reads give
``ml_dtypes.bfloat16`` arrays. Importing ``sae_dist.store`` performs the registration.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Mapping

import ml_dtypes
import numpy as np
import zarr
from zarr.dtype import DataTypeValidationError, Float16, data_type_registry

from sae_dist.store.errors import NonFiniteError, StoreError

# --------------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------------

BF16 = np.dtype(ml_dtypes.bfloat16)
ACT_DTYPES = ("float16", "bfloat16", "float32")
TEXT_ARRAYS = {"token_ids": np.dtype("int32"), "seq_index": np.dtype("int64"), "position": np.dtype("int32")}
PROGRESS_DIR = "_progress"
HARVEST_RESUME_HINT = "rerun the same `sae-harvest` command (it resumes from the _progress markers)"


@dataclass(frozen=True, kw_only=True)
class BFloat16(Float16):
    """zarr v3 data type "bfloat16" (1 sign, 8 exponent, 7 mantissa bits), numpy side ``ml_dtypes.bfloat16``.

    Built on zarr's public data-type API (`zarr.dtype`, zarr >= 3.1): it reuses the 2-byte float
    behaviour of `zarr.dtype.Float16` and swaps the numpy dtype and the v3 name. Stored little-endian
    by the ``bytes`` codec like every other 2-byte float; fill values are JSON floats.
    """

    dtype_cls = type(BF16)
    _zarr_v3_name = "bfloat16"
    _zarr_v2_names: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_native_dtype(cls, dtype):
        if isinstance(dtype, np.dtype) and dtype == BF16:
            return cls(endianness="little")
        raise DataTypeValidationError(f"Invalid data type: {dtype}. Expected ml_dtypes.bfloat16")

    def to_native_dtype(self):
        return BF16

    @property
    def item_size(self) -> int:
        return 2


data_type_registry.register(BFloat16._zarr_v3_name, BFloat16)


def np_dtype(name: str) -> np.dtype:
    """numpy dtype for an activation dtype name ("float16" | "bfloat16" | "float32"); ValueError otherwise."""
    if name not in ACT_DTYPES:
        raise ValueError(f"activation dtype {name!r} is not supported; use one of {list(ACT_DTYPES)}")
    return BF16 if name == "bfloat16" else np.dtype(name)


def dtype_name(dtype) -> str:
    """Canonical name ("float16", "bfloat16", "float32", "float64", "int32", ...) of a numpy or torch dtype."""
    s = str(dtype)
    if s.startswith("torch."):
        s = s[len("torch.") :]
    return {"half": "float16", "float": "float32", "double": "float64"}.get(s, s)


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def to_numpy(x, dtype: str | None = None) -> np.ndarray:
    """numpy view/copy of a numpy array or torch tensor (any device; torch bfloat16 -> ml_dtypes.bfloat16).

    dtype: optional target dtype name (see `np_dtype`, or an integer dtype name); casting rounds to
    nearest even (torch and ml_dtypes agree bit for bit).
    """
    if _is_torch(x):
        import torch

        t = x.detach()
        if dtype is not None and dtype_name(t.dtype) != dtype:
            t = t.to(getattr(torch, dtype))
        t = t.cpu()
        if t.dtype == torch.bfloat16:
            return t.contiguous().view(torch.int16).numpy().view(BF16)
        return t.numpy()
    a = np.asarray(x)
    if dtype is not None and dtype_name(a.dtype) != dtype:
        a = a.astype(np_dtype(dtype) if dtype in ACT_DTYPES else np.dtype(dtype))
    return a


# --------------------------------------------------------------------------------------------------
# create / open
# --------------------------------------------------------------------------------------------------


def _compressors(compression: str | None, checksum: bool):
    if compression in (None, "none"):
        codecs = []
    elif compression == "zstd":
        codecs = [zarr.codecs.ZstdCodec(level=1)]
    else:
        raise ValueError(f"compression {compression!r} is not supported; use None or 'zstd'")
    if checksum:
        codecs.append(zarr.codecs.Crc32cCodec())
    return codecs or None


def _check_positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def _text_array_names(with_text_arrays) -> list[str]:
    if with_text_arrays is True:
        return list(TEXT_ARRAYS)
    if not with_text_arrays:
        return []
    names = list(with_text_arrays)
    bad = [n for n in names if n not in TEXT_ARRAYS]
    if bad:
        raise ValueError(f"unknown text arrays {bad}; valid: {list(TEXT_ARRAYS)}")
    return names


def _is_store_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "zarr.json"))


def open_store(path, mode: str = "r") -> zarr.Group:
    """Open an existing activation store as a zarr group.

    Args:
        path: store directory.
        mode: "r" (read only) or "r+" (read/write; the layout functions use it).
    Returns: the zarr v3 group (``group["activations"]`` is [n_tokens, d_in]).
    Raises: StoreError naming the path if it does not exist, is not a zarr v3 group, or has no
        ``activations`` array.
    """
    if mode not in ("r", "r+"):
        raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise StoreError(f"activation store {path!r} does not exist; create it with `sae-harvest` "
                         f"or sae_dist.store.write_store(), or fix store.path")
    if not _is_store_dir(path):
        raise StoreError(f"{path!r} is not an activation store (no zarr.json inside); expected the "
                         f"zarr v3 directory written by `sae-harvest` or write_store()")
    try:
        g = zarr.open_group(path, mode=mode, zarr_format=3)
    except Exception as e:  # corrupt zarr.json, an array instead of a group, a v2 store...
        raise StoreError(f"{path!r} is not a readable zarr v3 activation store: {type(e).__name__}: {e}") from e
    try:
        acts = g["activations"]
    except KeyError:
        raise StoreError(f"store {path!r} has no 'activations' array (members: {sorted(g.keys())}); "
                         f"it was not written by sae-harvest/write_store") from None
    except Exception as e:
        raise StoreError(f"store {path!r}: cannot open 'activations': {type(e).__name__}: {e}") from e
    if not isinstance(acts, zarr.Array) or acts.ndim != 2:
        raise StoreError(f"store {path!r}: 'activations' must be a 2-D array [n_tokens, d_in], "
                         f"got {getattr(acts, 'shape', acts)!r}")
    return g


#: Group attributes renamed since stores were first written (old name -> name used now), so that a store
#: harvested by an earlier release still trains, evaluates and resumes (read with a FutureWarning).
RENAMED_ATTRS = {"d_model": "d_in", "hook": "hook_name"}


def _with_old_names(attrs: dict) -> dict:
    """`attrs` plus a copy of each renamed attribute under its old name (`RENAMED_ATTRS`), which stores
    keep writing for one release so that tools reading the old names keep working."""
    return {**attrs, **{old: attrs[new] for old, new in RENAMED_ATTRS.items() if new in attrs}}


def read_attrs(group: zarr.Group) -> dict:
    """The group attributes of a store as a plain dict under today's names: a store written by an earlier
    release (`RENAMED_ATTRS`: d_model, hook only) is read as d_in / hook_name, with a FutureWarning; the
    old-name copies that stores still write are dropped. The store itself is not changed."""
    attrs = dict(group.attrs)
    old = [k for k in RENAMED_ATTRS if k in attrs and RENAMED_ATTRS[k] not in attrs]
    for k, new in RENAMED_ATTRS.items():
        value = attrs.pop(k, None)
        if k in old:
            attrs[new] = value
    if old:
        warnings.warn(f"store {group.store}: attributes {old} were written by an earlier sae-dist release and "
                      f"are read as {[RENAMED_ATTRS[k] for k in old]}; re-harvest to drop this warning",
                      FutureWarning, stacklevel=2)
    return attrs


def chunk_grid(arr: zarr.Array) -> tuple[int, int]:
    """(chunk_tokens, shard_tokens) of a store array: rows per inner chunk and per shard file (the first
    dimension of its chunk and shard shapes); shard_tokens == chunk_tokens when unsharded."""
    chunk = arr.chunks[0]
    shard = arr.shards[0] if arr.shards is not None else chunk
    return int(chunk), int(shard)


def _check_existing(path, *, n_tokens, d_in, dtype, chunk_tokens, shard_tokens, attrs, text_names):
    g = open_store(path, "r+")
    acts = g["activations"]
    a = read_attrs(g)
    complete = bool((a.get("harvest") or {}).get("complete", False))
    problems = []
    have_dtype = dtype_name(acts.dtype)
    if have_dtype != dtype:
        problems.append(f"dtype: store has {have_dtype!r}, requested {dtype!r}")
    if acts.shape[1] != d_in:
        problems.append(f"d_in: store has {acts.shape[1]}, requested {d_in}")
    # A finished harvest may have been trimmed below the requested size (the corpus ran out).
    if acts.shape[0] != n_tokens and not (complete and acts.shape[0] < n_tokens):
        problems.append(f"n_tokens: store has {acts.shape[0]}, requested {n_tokens}")
    c, s = chunk_grid(acts)
    if c != chunk_tokens:
        problems.append(f"chunk_tokens: store has {c}, requested {chunk_tokens}")
    if s != shard_tokens:
        problems.append(f"shard_tokens: store has {s}, requested {shard_tokens}")
    missing = [n for n in text_names if n not in g]
    if missing:
        problems.append(f"arrays {missing}: missing in the store, requested")
    for key in ("model", "hook_name", "layer", "ctx_len", "dataset"):
        if key in attrs and key in a and attrs[key] != a[key]:
            problems.append(f"{key}: store has {a[key]!r}, requested {attrs[key]!r}")
    if "row_order" in attrs and attrs["row_order"] != a.get("row_order", "text"):  # stores before row_order: text
        problems.append(f"row_order: store has {a.get('row_order', 'text')!r}, requested {attrs['row_order']!r} "
                        "(sae-harvest: harvest.row_order)")
    if problems:
        raise StoreError(f"store {path!r} exists with a different layout: " + "; ".join(problems)
                         + ". Use another store path, or delete the old store to re-harvest.")
    return g


def create_store(path, *, n_tokens: int, d_in: int, dtype: str, chunk_tokens: int = 4096,
                 shard_tokens: int = 65536, attrs: Mapping[str, Any] | None = None,
                 with_text_arrays=True, compression: str | None = None, checksum: bool = True) -> zarr.Group:
    """Create an empty activation store, or open the identical one that exists (idempotent).

    Safe to call from several processes at once: the store is built in a private temporary directory
    and moved into place with one atomic ``os.rename``; losers of the race open the winner's store.

    Args:
        path: store directory (local filesystem).
        n_tokens: rows to allocate (the harvest target; `finalize_store` trims to what was written).
        d_in: activation width.
        dtype: "float16" | "bfloat16" | "float32" (activation storage dtype).
        chunk_tokens: rows per inner zarr chunk (the unit of a partial read).
        shard_tokens: rows per shard file (a multiple of chunk_tokens; the unit of harvest work,
            progress markers and reader shuffling).
        attrs: extra group attributes (model, hook, layer, ctx_len, dataset, ... ; all kept).
        with_text_arrays: True (token_ids int32, seq_index int64, position int32), False (activations
            only) or an iterable naming a subset of those arrays.
        compression: None (default: no compressor) or "zstd" (level 1). Measured on fp16 activations
            (d=768, 2-core CPU): zstd-1 saves ~6% of disk and halves write/read throughput.
        checksum: append a crc32c checksum to every inner chunk (default True; nearly free), so a
            damaged shard file fails loudly on read instead of yielding garbage activations.
    Returns: the zarr group, opened read/write. ``attrs["harvest"] == {"complete": False}`` when new.
    Raises: ValueError for bad arguments; StoreError if a store exists at path with a different
        shape, dtype, chunking, arrays or model/hook/layer/ctx_len/dataset attributes (both values named).
        A finished (complete) store that was trimmed below n_tokens counts as identical.
    """
    path = os.fspath(path)
    n_tokens = _check_positive_int("n_tokens", n_tokens)
    d_in = _check_positive_int("d_in", d_in)
    chunk_tokens = _check_positive_int("chunk_tokens", chunk_tokens)
    shard_tokens = _check_positive_int("shard_tokens", shard_tokens)
    if shard_tokens % chunk_tokens:
        raise ValueError(f"shard_tokens ({shard_tokens}) must be a multiple of chunk_tokens ({chunk_tokens})")
    npdt = np_dtype(dtype)
    compressors = _compressors(compression, checksum)
    text_names = _text_array_names(with_text_arrays)
    attrs = dict(attrs or {})
    kw = dict(n_tokens=n_tokens, d_in=d_in, dtype=dtype, chunk_tokens=chunk_tokens,
              shard_tokens=shard_tokens, attrs=attrs, text_names=text_names)
    if os.path.exists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        return _check_existing(path, **kw)

    tmp = _tmp_dir_beside(path)
    try:
        _build_store(tmp, _new_group_attrs(attrs, n_tokens=n_tokens, d_in=d_in, dtype=dtype,
                                           chunk_tokens=chunk_tokens, shard_tokens=shard_tokens),
                     n_tokens=n_tokens, d_in=d_in, npdt=npdt, chunk_tokens=chunk_tokens,
                     shard_tokens=shard_tokens, compressors=compressors, text_names=text_names)
        if not _move_into_place(tmp, path):
            return _check_existing(path, **kw)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return zarr.open_group(path, mode="r+", zarr_format=3)


def _tmp_dir_beside(path: str) -> str:
    """A private name for building a store next to `path` (same filesystem, so the final os.rename is atomic);
    the parent directory is created if missing."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    return os.path.join(parent, f".{os.path.basename(path)}.creating-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _new_group_attrs(attrs: dict, *, n_tokens: int, d_in: int, dtype: str, chunk_tokens: int,
                     shard_tokens: int) -> dict:
    """Group attributes of a new store (module docstring): model/hook/layer/ctx_len/dataset default to None,
    the caller's `attrs` are kept, the layout keys are set, and harvest.complete is False."""
    group_attrs = {"model": None, "hook_name": None, "layer": None, "ctx_len": None, "dataset": None}
    group_attrs.update(attrs)
    group_attrs.update({
        "d_in": d_in, "n_tokens": n_tokens, "dtype": dtype, "chunk_tokens": chunk_tokens,
        "shard_tokens": shard_tokens, "layout_version": 1,
        "harvest": {"complete": False, **dict(attrs.get("harvest") or {})},
    })
    group_attrs["harvest"]["complete"] = False
    return _with_old_names(group_attrs)


def _build_store(tmp: str, group_attrs: dict, *, n_tokens: int, d_in: int, npdt: np.dtype, chunk_tokens: int,
                 shard_tokens: int, compressors, text_names: list[str]) -> None:
    """Create the empty store (group with `group_attrs`, `activations` [n_tokens, d_in] of npdt, the text
    arrays `text_names`; chunked and sharded along tokens) in the new directory `tmp`."""
    g = zarr.open_group(tmp, mode="w-", zarr_format=3, attributes=group_attrs)
    # write_empty_chunks: every shard file exists once written, even if all zeros, so a missing
    # file always means a missing/deleted shard (the reader checks for it).
    cfg = {"write_empty_chunks": True}
    g.create_array("activations", shape=(n_tokens, d_in), dtype=npdt, chunks=(chunk_tokens, d_in),
                   shards=(shard_tokens, d_in), compressors=compressors, fill_value=0, config=cfg,
                   dimension_names=("token", "d_in"))
    for name in text_names:
        g.create_array(name, shape=(n_tokens,), dtype=TEXT_ARRAYS[name], chunks=(chunk_tokens,),
                       shards=(shard_tokens,), compressors=compressors, fill_value=0, config=cfg,
                       dimension_names=("token",))


def _move_into_place(tmp: str, path: str) -> bool:
    """Rename the store built in `tmp` to `path` (atomic; also replaces an empty directory). False when another
    process won the race (a store now exists at `path`; `tmp` is removed); other OSErrors propagate."""
    try:
        os.rename(tmp, path)
    except OSError:
        if not _is_store_dir(path):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    return True


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------


def _as_group(group, mode="r+") -> zarr.Group:
    if isinstance(group, zarr.Group):
        return group
    return open_store(group, mode)


def first_nonfinite_row(x) -> int | None:
    """Index of the first row of x [m, d] (numpy or torch) holding NaN/Inf, or None if all finite.

    Fast path: one float64 (float32 on accelerators) sum, finite whenever every entry is; only when
    it is not (or overflows) are the rows scanned.
    """
    if _is_torch(x) and x.device.type != "cpu":
        import torch

        if bool(torch.isfinite(x.sum(dtype=torch.float32))):
            return None
        bad = ~torch.isfinite(x).all(dim=-1) if x.ndim > 1 else ~torch.isfinite(x)
        return int(torch.nonzero(bad)[0, 0]) if bool(bad.any()) else None
    a = to_numpy(x)
    if a.size == 0 or np.isfinite(a.sum(dtype=np.float64)):
        return None
    ok = np.isfinite(a)
    if ok.all():
        return None
    bad = ~ok.all(axis=-1) if a.ndim > 1 else ~ok
    return int(np.flatnonzero(bad)[0])


def _writable(arr: zarr.Array) -> zarr.Array:
    # write_empty_chunks is a runtime setting (not stored in zarr.json): apply it on every write so an
    # all-zero chunk/shard is still written and a missing shard file always means a missing shard.
    return arr.with_config({"write_empty_chunks": True})


def write_block(group, start: int, activations, token_ids=None, seq_index=None, position=None) -> None:
    """Write activation rows ``[start, start + m)`` (and the matching text arrays) into a store.

    Args:
        group: zarr group from `create_store`/`open_store(..., "r+")`, or a store path.
        start: first token row (>= 0).
        activations: [m, d_in] numpy array or torch tensor (any device; float16/bfloat16/float32/
            float64, cast to the store dtype with round-to-nearest-even).
        token_ids: optional [m] int (stored int32); seq_index: optional [m] (int64);
            position: optional [m] (int32).
    Writes are fastest (and safe across processes) when they cover whole shards, i.e. start and m are
    multiples of shard_tokens (except the store's last shard).
    Raises: ValueError for shape mismatches or rows beyond n_tokens; StoreError if a text array is
        given but the store has none.
    """
    g = _as_group(group)
    arr = _writable(g["activations"])
    n_tokens, d_in = arr.shape
    store_dtype = dtype_name(arr.dtype)
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise ValueError(f"start must be a non-negative int, got {start!r}")
    start = int(start)
    shape = tuple(activations.shape)
    if len(shape) != 2 or shape[1] != d_in:
        raise ValueError(f"activations must be [m, d_in={d_in}], got shape {list(shape)}")
    m = shape[0]
    if start + m > n_tokens:
        raise ValueError(f"rows [{start}, {start + m}) exceed the store's n_tokens={n_tokens}")
    if m == 0:
        return
    arr[start : start + m] = to_numpy(activations, store_dtype)
    for name, vals in (("token_ids", token_ids), ("seq_index", seq_index), ("position", position)):
        if vals is None:
            continue
        if name not in g:
            raise StoreError(f"store has no {name!r} array (created with with_text_arrays=False); "
                             f"pass {name}=None")
        v = to_numpy(vals)
        if v.shape != (m,):
            raise ValueError(f"{name} must have shape [{m}] to match activations, got {list(v.shape)}")
        _writable(g[name])[start : start + m] = v.astype(TEXT_ARRAYS[name], copy=False)


# --------------------------------------------------------------------------------------------------
# progress markers
# --------------------------------------------------------------------------------------------------


def _marker_path(path, shard: int) -> str:
    return os.path.join(os.fspath(path), PROGRESS_DIR, f"shard_{int(shard):08d}.json")


def mark_shard_done(path, shard: int, info: Mapping[str, Any] | None = None) -> None:
    """Record that shard ``shard`` (rows [shard*shard_tokens, ...)) is fully written.

    Writes ``<path>/_progress/shard_XXXXXXXX.json`` atomically (temporary file + os.replace), so a
    killed worker never leaves a half-written marker. info: JSON-serialisable dict (e.g. n_tokens,
    norm_stats, seq range, worker rank); stored as is.
    """
    if isinstance(shard, bool) or not isinstance(shard, (int, np.integer)) or shard < 0:
        raise ValueError(f"shard must be a non-negative int, got {shard!r}")
    final = _marker_path(path, shard)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = f"{final}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        json.dump(dict(info or {}), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)


def done_shards(path) -> dict[int, dict]:
    """{shard index: info} for every shard with a progress marker (empty dict if none).

    Unreadable markers are ignored with a warning (the shard is then redone on resume).
    """
    d = os.path.join(os.fspath(path), PROGRESS_DIR)
    out: dict[int, dict] = {}
    if not os.path.isdir(d):
        return out
    for name in sorted(os.listdir(d)):
        if not (name.startswith("shard_") and name.endswith(".json")):
            continue
        try:
            idx = int(name[len("shard_") : -len(".json")])
            with open(os.path.join(d, name)) as f:
                info = json.load(f)
        except (ValueError, OSError) as e:
            warnings.warn(f"ignoring unreadable progress marker {os.path.join(d, name)!r}: {e}", stacklevel=2)
            continue
        out[idx] = info if isinstance(info, dict) else {"info": info}
    return out


# --------------------------------------------------------------------------------------------------
# norm statistics
# --------------------------------------------------------------------------------------------------


def norm_stats_partial(acts) -> dict:
    """Norm statistics of one block of activations, to be merged with `merge_norm_stats`.

    Args: acts [m, d_in] numpy array or torch tensor (any float dtype, any device).
    Returns: {"mean_norm": mean_i ||x_i||_2, "mean_sq_norm": mean_i ||x_i||_2^2, "n": m}, accumulated
        in float64 (0.0 means when m == 0). mean_norm is E||x|| of the scalar normalisation
        s = sqrt(d) / E||x|| (see `sae_dist.store.reader.scalar_scale`).
    """
    m = int(acts.shape[0])
    if m == 0:
        return {"mean_norm": 0.0, "mean_sq_norm": 0.0, "n": 0}
    if _is_torch(acts) and acts.device.type != "cpu":
        import torch

        sq = torch.zeros((), dtype=torch.float64, device=acts.device)
        nrm = torch.zeros((), dtype=torch.float64, device=acts.device)
        for i in range(0, m, 8192):
            x = acts[i : i + 8192].detach().to(torch.float64)
            s = (x * x).sum(dim=-1)
            sq += s.sum()
            nrm += s.sqrt().sum()
        sum_sq, sum_n = float(sq), float(nrm)
    else:
        a = to_numpy(acts)
        sum_sq = sum_n = 0.0
        for i in range(0, m, 4096):
            x = a[i : i + 4096].astype(np.float64)
            s = np.einsum("ij,ij->i", x, x)
            sum_sq += float(s.sum())
            sum_n += float(np.sqrt(s).sum())
    return {"mean_norm": sum_n / m, "mean_sq_norm": sum_sq / m, "n": m}


def merge_norm_stats(parts: Iterable[Mapping[str, Any]]) -> dict:
    """Merge `norm_stats_partial` results: n-weighted means (float64). Empty input -> n == 0, means 0.0."""
    n = 0
    s_norm = s_sq = 0.0
    for p in parts:
        k = int(p["n"])
        n += k
        s_norm += k * float(p["mean_norm"])
        s_sq += k * float(p["mean_sq_norm"])
    if n == 0:
        return {"mean_norm": 0.0, "mean_sq_norm": 0.0, "n": 0}
    return {"mean_norm": s_norm / n, "mean_sq_norm": s_sq / n, "n": n}


def norm_stats_from_data(arr: zarr.Array, n_tokens: int) -> dict:
    """`merge_norm_stats` of the first n_tokens rows of the activation array `arr`, read shard by shard (one
    streaming pass; float64 accumulation as `norm_stats_partial`)."""
    _, shard = chunk_grid(arr)
    return merge_norm_stats(norm_stats_partial(arr[i : min(i + shard, n_tokens)])
                            for i in range(0, n_tokens, shard))


# --------------------------------------------------------------------------------------------------
# finalize / write_store
# --------------------------------------------------------------------------------------------------


def finalize_store(path, n_tokens: int, attrs: Mapping[str, Any] | None = None) -> zarr.Group:
    """Finish a harvest: trim every array to n_tokens rows, merge attrs, set ``harvest.complete``.

    Idempotent (calling it again with the same arguments changes nothing).

    Args:
        path: store directory.
        n_tokens: rows actually harvested (<= allocated rows; the corpus may run out early).
        attrs: attributes to merge in. ``attrs["harvest"]`` is merged into the existing harvest dict.
            ``attrs["norm_stats"]``, if given, is stored as is; otherwise the progress markers'
            ``info["norm_stats"]`` are merged when they cover exactly n_tokens rows, else the
            statistics are computed from the stored data (one streaming pass).
    Returns: the group (read/write).
    Raises: StoreError if the store is missing, or n_tokens is < 1 or larger than the allocated rows.
    """
    g = open_store(path, "r+")
    acts = g["activations"]
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, (int, np.integer)):
        raise ValueError(f"n_tokens must be an int, got {n_tokens!r}")
    n_tokens = int(n_tokens)
    if not 1 <= n_tokens <= acts.shape[0]:
        raise StoreError(f"finalize_store({os.fspath(path)!r}): n_tokens={n_tokens} must be in "
                         f"[1, {acts.shape[0]}] (the store's allocated rows)")
    for name in ("activations", *TEXT_ARRAYS):
        if name not in g:
            continue
        a = g[name]
        if a.shape[0] != n_tokens:
            a.resize((n_tokens,) + tuple(a.shape[1:]))
    attrs = dict(attrs or {})
    old = read_attrs(g)
    if "norm_stats" in attrs:
        ns = dict(attrs["norm_stats"])
    else:
        marks = done_shards(path)
        parts = [m["norm_stats"] for m in marks.values() if isinstance(m.get("norm_stats"), dict)]
        ns = merge_norm_stats(parts) if parts else None
        if ns is None or ns["n"] != n_tokens:
            old_ns = old.get("norm_stats")
            if isinstance(old_ns, dict) and old_ns.get("n") == n_tokens:
                ns = old_ns
            else:
                ns = norm_stats_from_data(acts, n_tokens)
    harvest = dict(old.get("harvest") or {})
    harvest.update(dict(attrs.pop("harvest", None) or {}))
    harvest.update({"complete": True, "n_tokens": n_tokens})
    new = {**attrs, "n_tokens": n_tokens, "d_in": int(acts.shape[1]), "dtype": dtype_name(acts.dtype),
           "norm_stats": ns, "harvest": harvest}
    g.update_attributes(_with_old_names(new))
    return g


def write_store(path, activations, token_ids=None, attrs: Mapping[str, Any] | None = None, *,
                chunk_tokens: int = 4096, shard_tokens: int = 65536, seq_index=None, position=None,
                dtype: str | None = None, compression: str | None = None, checksum: bool = True,
                overwrite: bool = True) -> str:
    """Write a complete activation store from in-memory arrays (docs/formats.md#activation-store).

    `sae-train` accepts the result exactly like a harvested store.

    Args:
        path: store directory to create.
        activations: [n_tokens, d_in] numpy array or torch tensor (float16 / bfloat16 / float32 are
            stored as is; float64 is stored as float32). Written shard by shard (no full copy).
        token_ids: optional [n_tokens] integer token ids (stored int32).
        attrs: extra group attributes (model, hook, layer, ctx_len, dataset, ...); kept.
        chunk_tokens, shard_tokens: zarr inner-chunk and shard-file rows (see `create_store`).
        seq_index, position: optional [n_tokens] arrays (int64 / int32).
        dtype: storage dtype override ("float16" | "bfloat16" | "float32"); default: from the input.
        compression: None or "zstd"; checksum: crc32c per chunk (see `create_store`).
        overwrite: replace an existing activation store (a directory holding zarr.json) or empty
            directory at path. Anything else at path is never deleted (StoreError).
    Returns: the store path (str).
    Raises: ValueError for bad shapes/dtypes; NonFiniteError (a StoreError) naming the first row
        holding NaN/Inf (nothing is written then); StoreError if path exists and cannot be replaced.
    """
    path = os.fspath(path)
    shape = tuple(getattr(activations, "shape", ()))
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"activations must be a non-empty 2-D array [n_tokens, d_in], got shape {list(shape)}")
    n, d = shape
    dtype = _storage_dtype(activations, dtype)
    text = _checked_text_arrays(n, token_ids=token_ids, seq_index=seq_index, position=position)
    shard_tokens = _check_positive_int("shard_tokens", shard_tokens)
    # Check every row first so a bad input leaves nothing behind.
    for i in range(0, n, shard_tokens):
        bad = first_nonfinite_row(activations[i : i + shard_tokens])
        if bad is not None:
            raise NonFiniteError(f"write_store: activations row {i + bad} contains NaN or Inf; "
                                 f"clean the input (e.g. drop that row) before writing")
    _clear_path(path, overwrite)
    all_attrs = dict(attrs or {})
    all_attrs.setdefault("harvest", {})
    all_attrs["harvest"] = {**dict(all_attrs["harvest"]), "source": "write_store"}
    g = create_store(path, n_tokens=n, d_in=d, dtype=dtype, chunk_tokens=chunk_tokens,
                     shard_tokens=shard_tokens, attrs=all_attrs, with_text_arrays=list(text),
                     compression=compression, checksum=checksum)
    parts = []
    for i in range(0, n, shard_tokens):
        block = to_numpy(activations[i : i + shard_tokens], dtype)
        parts.append(norm_stats_partial(block))
        write_block(g, i, block, **{k: v[i : i + shard_tokens] for k, v in text.items()})
    finalize_store(path, n, {"norm_stats": merge_norm_stats(parts)})
    return path


def _storage_dtype(activations, dtype: str | None) -> str:
    """`write_store`'s storage dtype name: `dtype` if given, else the input's (float64 -> "float32").
    ValueError for a non-float input or an unsupported `dtype`."""
    in_dtype = dtype_name(activations.dtype)
    if dtype is None:
        if in_dtype in ACT_DTYPES:
            dtype = in_dtype
        elif in_dtype == "float64":
            dtype = "float32"
        else:
            raise ValueError(f"activations must be a float array (float16/bfloat16/float32/float64), got {in_dtype}")
    np_dtype(dtype)
    return dtype


def _checked_text_arrays(n: int, **arrays) -> dict[str, np.ndarray]:
    """{name: numpy array} of the given (not None) text arrays (names of TEXT_ARRAYS), each checked to be
    [n] integers within its stored dtype's range; ValueError naming the array otherwise."""
    text = {}
    for name, vals in arrays.items():
        if vals is None:
            continue
        v = to_numpy(vals)
        if v.shape != (n,):
            raise ValueError(f"{name} must have shape [{n}] (one per activation row), got {list(v.shape)}")
        if not np.issubdtype(v.dtype, np.integer):
            raise ValueError(f"{name} must be integers, got dtype {v.dtype}")
        lim = np.iinfo(TEXT_ARRAYS[name])
        if v.size and (v.min() < lim.min or v.max() > lim.max):
            raise ValueError(f"{name} values out of range for {TEXT_ARRAYS[name]}")
        text[name] = v
    return text


def _clear_path(path: str, overwrite: bool) -> None:
    """Make room for a new store at `path`: remove an existing activation store or empty directory there
    (only with overwrite; else StoreError). StoreError for anything else at `path` (never deleted)."""
    if os.path.exists(path):
        if not overwrite:
            raise StoreError(f"{path!r} already exists; pass overwrite=True or choose another path")
        if os.path.isdir(path) and (_is_store_dir(path) or not os.listdir(path)):
            shutil.rmtree(path)
        else:
            raise StoreError(f"{path!r} exists and is not an activation store; refusing to delete it. "
                             f"Choose another path.")


__all__ = [
    "ACT_DTYPES", "BFloat16", "create_store", "open_store", "read_attrs", "RENAMED_ATTRS", "write_block",
    "mark_shard_done", "done_shards", "finalize_store", "norm_stats_partial", "merge_norm_stats", "write_store",
    "np_dtype", "dtype_name", "to_numpy", "first_nonfinite_row", "chunk_grid", "norm_stats_from_data",
]
