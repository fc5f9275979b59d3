"""Latent-sharded SAE weights: shard files + an index, for SAEs too big for one file (docs/formats.md#sharded-weights).

The hub takes files up to 50 GB; a 16M-latent SAE at d_in 4096 holds two 256 GB matrices, so even one
tensor must be split. The split is along the latents: shard i (`sae_weights-0000i-of-0000N.safetensors`)
holds the contiguous latent range [lo_i, hi_i) of every latent-indexed tensor under its own name
(W_enc[:, lo:hi], b_enc[lo:hi], W_dec[lo:hi], threshold[lo:hi], ...: `LATENT_AXES`), and the first shard
also holds the tensors without a latent axis (b_dec), whole. The index `sae_weights.safetensors.index.json`
follows huggingface_hub's sharded checkpoints (`split_torch_state_dict_into_shards`: files
`model-00001-of-00003.safetensors`, index `model.safetensors.index.json` = {"metadata": {"total_size"},
"weight_map": {name: file}}) as far as a split tensor allows:

    {"metadata": {"total_size": bytes of tensor data in all shards (huggingface_hub's count),
                  "d_sae": n, "format": "sae_dist-latent-shards", "format_version": 1},
     "weight_map": {name: file} of the tensors stored whole (b_dec: the first shard),
     "latent_axis": {name: axis} of the tensors split along the latents,
     "latent_ranges": {file: [lo, hi]} of every shard, in order: [0, h1), [h1, h2), ..., [h_{N-1}, n)}

`write_shards` streams the split out of one safetensors file (safetensors' `safe_open` / `get_slice`: at
most one shard in memory); `read_shards` reassembles the tensors and checks that the ranges cover
[0, d_sae) without gap or overlap and that every shard holds what the index says.
`sae_dist.sae.sae_files.read_sae_files` (so `load_sae`, sae-eval, sae-browse) reads either layout;
`sae-push` (`sae_dist.sae.hub.push_folder`) writes shards when the weights exceed `max_shard_size`.
SAELens reads a single `sae_weights.safetensors` only.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["SHARD_INDEX_FILENAME", "DEFAULT_MAX_SHARD_SIZE", "LATENT_AXES", "SHARD_FORMAT", "parse_shard_size",
           "shard_filename", "plan_shards", "write_shards", "read_shards"]

SHARD_INDEX_FILENAME = "sae_weights.safetensors.index.json"
#: shard size when none is given: the hub recommends files under 20 GB (its hard limit is 50 GB); a
#: smaller SAE stays one sae_weights.safetensors, which SAELens loads
DEFAULT_MAX_SHARD_SIZE = "20GB"
#: the latent axis of each tensor name an SAE weights file may hold (sae_dist.sae.sae_files: _KNOWN_TENSORS);
#: any other tensor is stored whole in the first shard
LATENT_AXES = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "threshold": 0, "log_threshold": 0, "scaling_factor": 0}
#: the index's metadata "format" (and "format_version": 1)
SHARD_FORMAT = "sae_dist-latent-shards"
#: the units a shard size may carry (powers of 1000, as huggingface_hub sizes shards)
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", re.IGNORECASE)
# bytes per element of safetensors' dtype names
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def parse_shard_size(size: int | str) -> int:
    """Bytes of a shard size: an int, a string of digits, or a size with a unit ("5GB", "500MB": KB, MB, GB,
    TB, powers of 1000, as huggingface_hub counts them). ValueError naming the value otherwise or when it is
    not positive."""
    m = None if isinstance(size, bool) else _SIZE_RE.fullmatch(str(size))
    if m is None or m.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"max_shard_size={size!r}: give bytes (e.g. 20000000000) or a size with a unit "
                         "KB/MB/GB/TB (e.g. '20GB')")
    n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if n < 1:
        raise ValueError(f"max_shard_size={size!r}: must be positive")
    return n


def shard_filename(i: int, n: int) -> str:
    """Name of shard i (1-based) of n, huggingface_hub's pattern: sae_weights-00001-of-00003.safetensors."""
    return f"sae_weights-{i:05d}-of-{n:05d}.safetensors"


def plan_shards(weights_file: str | os.PathLike, d_sae: int, max_shard_size: int | str) -> dict:
    """The index (module docstring) that splits the safetensors file `weights_file` into shards of at most
    `max_shard_size` bytes of tensor data each: as few shards as fit, latents spread evenly (shard sizes
    differ by at most one latent). Reads the header only.

    ValueError when a latent-indexed tensor (LATENT_AXES) lacks d_sae entries on its latent axis, for an
    unknown dtype, or when `max_shard_size` cannot hold one latent of every split tensor plus the tensors
    stored whole (the first shard's share)."""
    limit = parse_shard_size(max_shard_size)
    axes, whole_bytes, per_latent, total = {}, 0, 0, 0
    with safe_open(str(weights_file), framework="pt") as f:
        names = sorted(f.keys())
        for name in names:
            sl = f.get_slice(name)
            shape, dtype = sl.get_shape(), sl.get_dtype()
            if dtype not in _DTYPE_BYTES:
                raise ValueError(f"{weights_file}: tensor {name} has dtype {dtype}, not one of {sorted(_DTYPE_BYTES)}")
            nbytes = math.prod(shape) * _DTYPE_BYTES[dtype]
            total += nbytes
            ax = LATENT_AXES.get(name)
            if ax is None:
                whole_bytes += nbytes
                continue
            if len(shape) <= ax or shape[ax] != d_sae:
                raise ValueError(f"{weights_file}: {name} has shape {shape}, expected d_sae={d_sae} on axis {ax}")
            axes[name], per_latent = ax, per_latent + nbytes // d_sae
    if limit < whole_bytes + per_latent:
        raise ValueError(f"max_shard_size={limit} bytes cannot hold one latent ({per_latent} bytes across "
                         f"{sorted(axes)}) plus the tensors stored whole ({whole_bytes} bytes); give at least "
                         f"{whole_bytes + per_latent}")
    n = math.ceil(d_sae / ((limit - whole_bytes) // max(per_latent, 1)))
    bounds = [d_sae * i // n for i in range(n + 1)]
    files = [shard_filename(i + 1, n) for i in range(n)]
    return {"metadata": {"total_size": total, "d_sae": d_sae, "format": SHARD_FORMAT, "format_version": 1},
            "weight_map": {name: files[0] for name in names if name not in axes},
            "latent_axis": axes,
            "latent_ranges": {f: [bounds[i], bounds[i + 1]] for i, f in enumerate(files)}}


def write_shards(weights_file: str | os.PathLike, out_dir: str | os.PathLike, d_sae: int,
                 max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> list[Path]:
    """Split the SAE weights file `weights_file` (one safetensors file, d_sae latents) into `out_dir` (an
    existing directory) as latent-range shards plus `SHARD_INDEX_FILENAME` (`plan_shards`; module
    docstring). Tensors keep their names and dtypes; shard i holds t[..., lo:hi, ...] along each tensor's
    latent axis, read with safetensors' `get_slice` so that one shard at a time is in memory. Returns the
    paths written, the shards in order then the index. ValueError from `plan_shards`."""
    index = plan_shards(weights_file, d_sae, max_shard_size)
    out, axes, written = Path(out_dir), index["latent_axis"], []
    with safe_open(str(weights_file), framework="pt") as f:
        for file, (lo, hi) in index["latent_ranges"].items():
            part = {name: f.get_tensor(name) for name, w in index["weight_map"].items() if w == file}
            for name, ax in axes.items():
                sl = f.get_slice(name)
                part[name] = (sl[lo:hi] if ax == 0 else sl[:, lo:hi]).contiguous()
            save_file(part, str(out / file))
            written.append(out / file)
            del part
    (out / SHARD_INDEX_FILENAME).write_text(json.dumps(index, indent=2) + "\n")
    return [*written, out / SHARD_INDEX_FILENAME]


def _read_index(index_file: Path) -> tuple[dict, int, list[tuple[int, int, str]]]:
    """(index, d_sae, [(lo, hi, file)] sorted by lo) of an index file; ValueError naming it when malformed."""
    try:
        index = json.loads(index_file.read_text())
        d_sae = int(index["metadata"]["d_sae"])
        ranges = sorted((int(lo), int(hi), str(f)) for f, (lo, hi) in index["latent_ranges"].items())
        if not isinstance(index.get("latent_axis"), dict) or not isinstance(index.get("weight_map", {}), dict):
            raise TypeError("latent_axis and weight_map must be objects")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index_file}: not a sharded-weights index (docs/formats.md#sharded-weights: metadata."
                         f"d_sae, latent_axis, latent_ranges {{file: [lo, hi]}}): {e!r}") from None
    meta = index["metadata"]
    if (meta.get("format", SHARD_FORMAT), meta.get("format_version", 1)) != (SHARD_FORMAT, 1):
        raise ValueError(f"{index_file}: format {meta.get('format')!r} version {meta.get('format_version')!r}; this "
                         f"release reads {SHARD_FORMAT!r} version 1 (a newer sae-dist wrote it: upgrade)")
    return index, d_sae, ranges


def _check_ranges(index_file: Path, d_sae: int, ranges: list[tuple[int, int, str]]) -> None:
    """ValueError naming the shards around a gap, an overlap or an empty range, or the latents no shard
    holds, unless `ranges` tile [0, d_sae) exactly."""
    at, prev = 0, "the start"
    for lo, hi, f in ranges:
        if lo > at:
            raise ValueError(f"{index_file}: latents [{at}, {lo}) are in no shard (a gap between {prev} and {f}): "
                             "a shard is missing from the index; re-create the shards (sae-push)")
        if lo < at or hi <= lo:
            raise ValueError(f"{index_file}: shard {f} has latents [{lo}, {hi}), which overlaps {prev} or is "
                             "empty; the ranges must tile [0, d_sae)")
        at, prev = hi, f
    if at != d_sae:
        raise ValueError(f"{index_file}: latents [{at}, {d_sae}) are in no shard (d_sae={d_sae}; the last shard, "
                         f"{prev}, ends at {at}): a shard is missing from the index")


def _copy_shard(path: Path, lo: int, hi: int, index: dict, d_sae: int, out: dict[str, torch.Tensor]) -> None:
    """Put the tensors of the shard at `path` (latents [lo, hi)) into `out` (full tensors allocated on first
    sight); ValueError naming the shard when its tensors, shapes or dtypes disagree with the index or with
    the other shards."""
    axes = index["latent_axis"]
    expected = set(axes) | {n for n, w in index.get("weight_map", {}).items() if w == path.name}
    with safe_open(str(path), framework="pt") as f:
        if set(f.keys()) != expected:
            raise ValueError(f"{path}: holds tensors {sorted(f.keys())}, the index says {sorted(expected)}")
        for name in sorted(expected):
            t = f.get_tensor(name)
            if name not in axes:
                out[name] = t
                continue
            ax = int(axes[name])
            if t.dim() <= ax or t.shape[ax] != hi - lo:
                raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, but the index gives this shard "
                                 f"latents [{lo}, {hi}) on axis {ax}")
            if name not in out:
                out[name] = torch.empty([d_sae if i == ax else s for i, s in enumerate(t.shape)], dtype=t.dtype)
            dst = out[name].narrow(ax, lo, hi - lo)
            if dst.shape != t.shape or dst.dtype != t.dtype:
                raise ValueError(f"{path}: {name} is {t.dtype} {tuple(t.shape)}, inconsistent with the other "
                                 f"shards ({dst.dtype} {tuple(dst.shape)} for these latents)")
            dst.copy_(t)


def read_shards(sae_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of the sharded weights in `sae_dir` (index + shards; module docstring), reassembled along
    each tensor's latent axis, in the shards' dtype (CPU). Peak memory: the result plus one tensor of one
    shard.

    FileNotFoundError naming the shard(s) the index lists that are not in `sae_dir`; ValueError naming the
    index or the shard for a malformed index, latent ranges that do not tile [0, d_sae) (a gap names the
    missing latents), or a shard whose tensors disagree with the index or with the other shards."""
    d = Path(sae_dir)
    index_file = d / SHARD_INDEX_FILENAME
    index, d_sae, ranges = _read_index(index_file)
    _check_ranges(index_file, d_sae, ranges)
    files = {f for _, _, f in ranges}
    stray = sorted(set(index.get("weight_map", {}).values()) - files)
    if stray:
        raise ValueError(f"{index_file}: weight_map names {stray}, which latent_ranges does not list")
    missing = [f for _, _, f in ranges if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{d}: shard(s) {missing} listed in {SHARD_INDEX_FILENAME} are missing; download "
                                "every sae_weights-*-of-*.safetensors file of the SAE")
    out: dict[str, torch.Tensor] = {}
    for lo, hi, f in ranges:
        _copy_shard(d / f, lo, hi, index, d_sae, out)
    return out
