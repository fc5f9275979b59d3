"""Export a latent-sharded TopK SAE to the contract files without gathering it (docs/formats.md#sae-export).

`export_sae_sharded` writes the same `cfg.json` and `sae_weights.safetensors` as the single-process
`sae_dist.sae.export.export_sae` would for the unsharded SAE with the same global weights (float32,
b_enc and b_dec divided by the fold factor of the training normalisation), but every tp shard writes
its own slices straight into the one file: no rank ever holds more than its own shard plus a bounded
write buffer, and no collective moves weights (the only collectives are a few all-reduces of one
int32 status flag per rank, so that every rank fails together when any rank fails).

The safetensors format (huggingface/safetensors, README "Format"): an 8-byte little-endian unsigned
header length N, N bytes of a UTF-8 JSON header {name: {"dtype", "shape", "data_offsets": [begin,
end]}} (offsets relative to the start of the data section, tensors packed without holes, the header
space-padded so the data section starts 8-byte aligned), then the row-major little-endian data.
The layout below is the one `safetensors.torch.save_file` produces for float32 tensors without
metadata (compact JSON, tensors ordered by name, data in that order), so the file is byte-for-byte
the file `export_sae` writes.

File regions written by each rank (n = d_sae, tp rank r holds latents [lo, hi), 4 bytes a float):
  W_dec [n, d_in]: rows lo..hi are one contiguous range      (written in chunks of whole rows)
  b_enc [n]:       elements lo..hi are one contiguous range
  W_enc [d_in, n]: d_in strided runs of hi - lo floats, row i's run at (i * n + lo) * 4
  b_dec [d_in]:    replicated; written by global rank 0
Only the ranks with dp_rank == 0 write (the dp replicas hold the same weights).

Protocol (all ranks call it; `ctx.barrier`-like agreement steps are all-reduces of status flags):
  1. every rank validates its shard and computes the layout from the global shapes; agree.
  2. global rank 0 creates the temporary file `sae_weights.safetensors.tmp` at its full size and
     writes the header; agree.
  3. writers open it, write their slices (bounded chunks), flush and fsync; agree.
  4. rank 0 renames it into place and writes cfg.json (the same atomic renames as `export_sae`); agree.
On any failure every rank raises (the failing rank its own error, the others a RuntimeError naming
it) and rank 0 removes the temporary file. `out_dir` must be on a filesystem every writer can open
(a shared filesystem when the writers span nodes).
"""

from __future__ import annotations

import json
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sae_dist.parallel.mesh import ParallelContext, shard_range
from sae_dist.sae.export import commit_export, export_cfg_dict, tmp_weights_path

__all__ = ["export_sae_sharded", "SafetensorsLayout", "safetensors_f32_layout", "DEFAULT_BUFFER_BYTES"]

#: Default bound on the bytes of weights one rank converts and writes at a time.
DEFAULT_BUFFER_BYTES = 64 << 20

_F32_BYTES = 4


@dataclass(frozen=True)
class SafetensorsLayout:
    """Where each tensor of a float32 safetensors file lies.

    header: the file's first bytes (8-byte length + space-padded JSON header); offsets: absolute file
    offset (bytes) of each tensor's first element; shapes: each tensor's shape; size: file size in bytes.
    """

    header: bytes
    offsets: dict[str, int]
    shapes: dict[str, tuple[int, ...]]
    size: int


def safetensors_f32_layout(shapes: dict[str, tuple[int, ...]]) -> SafetensorsLayout:
    """Layout of a safetensors file holding float32 ("F32") tensors of the given shapes, no metadata.

    Same bytes as `safetensors.torch.save_file` writes for these tensors: tensors sorted by
    (dtype size descending, name), here by name; compact JSON header in that order, padded with
    spaces to a multiple of 8 bytes; data packed in that order. Raises ValueError for a negative or
    non-integer dimension.
    """
    entries, pos = {}, 0
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in shape):
            raise ValueError(f"tensor {name!r}: shape {shape} must be non-negative ints")
        nbytes = _F32_BYTES * int(np.prod(shape, dtype=np.int64))
        entries[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    js = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    js += b" " * (-len(js) % 8)
    header = struct.pack("<Q", len(js)) + js
    data0 = len(header)
    return SafetensorsLayout(
        header=header,
        offsets={n: data0 + e["data_offsets"][0] for n, e in entries.items()},
        shapes={n: tuple(shapes[n]) for n in entries},
        size=data0 + pos,
    )


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    """os.pwrite until every byte of buf is at `offset` (pwrite may write less than asked)."""
    while len(buf):
        done = os.pwrite(fd, buf, offset)
        if done <= 0:
            raise OSError(f"pwrite wrote {done} bytes at offset {offset}")
        buf, offset = buf[done:], offset + done


def _write_strided(fd: int, t: torch.Tensor, base: int, row_stride: int, chunk_elems: int,
                   divisor: float | None = None) -> None:
    """Write a 2-D tensor t [R, C] as float32 little-endian into file descriptor fd: row r's C
    floats at file offset base + r * row_stride (bytes). Converts at most `chunk_elems` elements at a
    time (on CPU, then divided by `divisor` if given, exactly as `export_sae` computes `b / f`)."""
    R, C = t.shape
    if R == 0 or C == 0:
        return
    contiguous_rows = row_stride == C * _F32_BYTES
    rows_per = max(1, chunk_elems // C)
    cols_per = min(C, max(1, chunk_elems))
    for r0 in range(0, R, rows_per):
        r1 = min(R, r0 + rows_per)
        for c0 in range(0, C, cols_per):
            c1 = min(C, c0 + cols_per)
            chunk = t[r0:r1, c0:c1].detach().to("cpu", torch.float32).contiguous()
            if divisor is not None:
                chunk = chunk / divisor
            arr = chunk.numpy()
            if sys.byteorder != "little":
                arr = arr.astype("<f4")
            if contiguous_rows and c0 == 0 and c1 == C:  # whole rows, back to back in the file
                _pwrite_all(fd, memoryview(arr).cast("B"), base + r0 * row_stride)
            else:
                for i in range(r1 - r0):
                    _pwrite_all(fd, memoryview(arr[i]).cast("B"),
                                base + (r0 + i) * row_stride + c0 * _F32_BYTES)


def _agree(ctx: ParallelContext, step: str, err: BaseException | None, cleanup=None) -> None:
    """Every rank learns whether any rank failed `step`; all raise together (no rank left waiting).

    One all-reduce (sum) of an int32 [world] flag vector over the context's ranks (`ctx.world_group`); a
    no-op exchange in a single-process context. The failing rank re-raises its own error; the others raise RuntimeError
    naming the failed ranks. `cleanup` (rank 0 only) runs before raising.
    """
    failed: list[int]
    if ctx.mesh is None:
        failed = [] if err is None else [ctx.rank]
    else:
        flags = torch.zeros(ctx.world_size, dtype=torch.int32, device=ctx.device)
        if err is not None:
            flags[ctx.rank] = 1
        dist.all_reduce(flags, group=ctx.world_group)
        failed = [int(r) for r in flags.nonzero().flatten().tolist()]
    if not failed:
        return
    if cleanup is not None:
        cleanup()
    if err is not None:
        raise err
    raise RuntimeError(f"export_sae_sharded: rank(s) {failed} failed while {step} (see their error); "
                       "the export was not written")


def _check_shard(model, ctx: ParallelContext) -> tuple[int, int, int, int]:
    """(d_in, n, lo, hi) of the shard after checking it matches ctx; ValueError otherwise."""
    cfg = model.cfg
    d, n = int(cfg.d_in), int(cfg.d_sae)
    lo, hi = shard_range(n, ctx.tp, ctx.tp_rank)
    if (int(model.latent_start), int(model.latent_end)) != (lo, hi):
        raise ValueError(
            f"model holds latents [{model.latent_start}, {model.latent_end}) but ctx (tp={ctx.tp}, "
            f"tp_rank={ctx.tp_rank}) expects [{lo}, {hi}): pass the ParallelContext the model was built with"
        )
    want = {"W_enc": (d, hi - lo), "b_enc": (hi - lo,), "W_dec": (hi - lo, d), "b_dec": (d,)}
    for name, shape in want.items():
        p = getattr(model, name)
        if tuple(p.shape) != shape:
            raise ValueError(f"shard parameter {name} has shape {tuple(p.shape)}, expected {shape} "
                             f"(d_in={d}, latents [{lo}, {hi}))")
        if p.device.type == "meta":
            raise ValueError(f"shard parameter {name} is on the meta device: initialise or load the "
                             "weights before exporting")
    return d, n, lo, hi


@torch.no_grad()
def export_sae_sharded(
    model,
    ctx: ParallelContext,
    out_dir: str | os.PathLike,
    *,
    hook_name: str | None,
    model_name: str | None,
    normalize: str,
    scale: float | None = None,
    extra_cfg: dict | None = None,
    max_buffer_bytes: int = DEFAULT_BUFFER_BYTES,
) -> Path:
    """Write `out_dir/cfg.json` and `out_dir/sae_weights.safetensors` from a latent-sharded SAE.

    Called collectively by ALL ranks of the mesh (module docstring: protocol). The files equal those
    of `sae_dist.sae.export.export_sae` on the unsharded SAE with the same global weights: cfg.json
    byte for byte, the tensors exactly (W_enc [d_in, d_sae], b_enc [d_sae] / f, W_dec [d_sae, d_in],
    b_dec [d_in] / f, float32, f the fold factor of `normalize`; see sae_dist/sae/export.py).

    model: this rank's latent shard of a TopK SAE (`parallelize_sae`: W_enc [d_in, n/tp], b_enc [n/tp],
      W_dec [n/tp, d_in], b_dec [d_in]; any float dtype, any device); a tp=1 shard in a single-process ctx exports the
      whole SAE. ctx: the `ParallelContext` the model was built with (its tp, tp_rank, dp_rank, rank).
    normalize / scale / hook_name / model_name / extra_cfg: as in `export_sae`.
    max_buffer_bytes: bound on the float32 bytes a rank converts and writes at a time (a row of
      W_enc's shard longer than that is split); peak extra memory about twice this.
    Returns the output directory (on every rank, after the files are in place).
    Raises ValueError (bad normalize/scale, a shard not matching ctx, weights on "meta", a
    max_buffer_bytes < 4) on every rank; an OSError of the writing rank, with RuntimeError on the
    others. Every rank raises together, so none is left waiting in a collective.
    """
    out = Path(out_dir)
    tmp = tmp_weights_path(out)
    writer = ctx.dp_rank == 0
    err: BaseException | None = None
    try:  # 1. validate + layout (every rank, from the global shapes)
        if not isinstance(max_buffer_bytes, int) or max_buffer_bytes < _F32_BYTES:
            raise ValueError(f"max_buffer_bytes={max_buffer_bytes!r} must be an int >= {_F32_BYTES}")
        d, n, lo, hi = _check_shard(model, ctx)
        cfg, f = export_cfg_dict(d_in=d, d_sae=n, k=None, arch_cfg=model.export_cfg(), normalize=normalize, scale=scale,
                           hook_name=hook_name, model_name=model_name, extra_cfg=extra_cfg)
        layout = safetensors_f32_layout({"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)})
    except Exception as e:  # noqa: BLE001 - re-raised by _agree on this rank
        err = e
    _agree(ctx, "validating the shard", err)

    def _remove_tmp():
        if ctx.is_main:
            tmp.unlink(missing_ok=True)

    if ctx.is_main:  # 2. create the file at full size, header in place
        try:
            out.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(layout.header)
                fh.truncate(layout.size)
                fh.flush()
                os.fsync(fh.fileno())
        except Exception as e:  # noqa: BLE001
            err = e
    _agree(ctx, f"creating {tmp}", err, _remove_tmp)

    if writer:  # 3. each tp shard writes its own slices
        try:
            chunk = max_buffer_bytes // _F32_BYTES
            row = d * _F32_BYTES
            fd = os.open(tmp, os.O_WRONLY)  # no O_CREAT: rank 0 made it (shared filesystem)
            try:
                _write_strided(fd, model.W_dec, layout.offsets["W_dec"] + lo * row, row, chunk)
                _write_strided(fd, model.b_enc.view(1, -1), layout.offsets["b_enc"] + lo * _F32_BYTES,
                               0, chunk, divisor=f)
                _write_strided(fd, model.W_enc, layout.offsets["W_enc"] + lo * _F32_BYTES,
                               n * _F32_BYTES, chunk)
                if ctx.is_main:
                    _write_strided(fd, model.b_dec.view(1, -1), layout.offsets["b_dec"], 0, chunk,
                                   divisor=f)
                os.fsync(fd)
            finally:
                os.close(fd)
        except Exception as e:  # noqa: BLE001
            err = e
    _agree(ctx, f"writing shards into {tmp}", err, _remove_tmp)

    if ctx.is_main:  # 4. rename into place, write cfg.json
        try:
            if tmp.stat().st_size != layout.size:
                raise OSError(f"{tmp} has {tmp.stat().st_size} bytes after the writes, expected "
                              f"{layout.size}: was it written concurrently by another export?")
            commit_export(out, cfg)
        except Exception as e:  # noqa: BLE001
            err = e
    _agree(ctx, f"committing the export in {out}", err, _remove_tmp)
    return out
