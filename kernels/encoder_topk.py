"""Fused TopK-SAE encoder: pre-activations, TopK (and AuxK candidates) without a [B, n] matrix.

Method (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"):
    pre   = (x - b_dec) @ W_enc + b_enc                       (section 2.1 / 2.3, eq. 3)
    z     = ReLU(TopK_k(pre))                                 (section 2.3)
    aux   = ReLU(TopK_{k_aux}(pre restricted to dead latents)) (section 2.4.1, AuxK; Appendix A.2)
and the section-5.1 observation that the encoder's backward only needs the k selected columns.

Forward, two implementations with the same result:

* torch (CPU, and CUDA with ``backend="torch"``): the latents are processed in chunks of
  ``latent_chunk`` columns. For each chunk the [B, chunk] pre-activations are computed into one
  reused buffer (``addmm``), the chunk's top-k is taken and merged with the running top-k
  (``cat([B, k], [B, k]) -> topk``). The AuxK candidates come from the same chunk buffer with the
  non-dead columns masked to -inf. Peak extra memory is one [B, chunk] buffer (plus a second one for
  the AuxK mask), never [B, n].
* Triton (CUDA, or CPU under ``TRITON_INTERPRET=1``): grid (token blocks of BLOCK_B, latent splits).
  Each program computes [BLOCK_B, BLOCK_N] pre-activation tiles with ``tl.dot`` over d in BLOCK_D
  steps (tensor cores: bf16/fp16, or TF32 for fp32 when torch's fp32 matmul precision allows it) and
  keeps a per-token running top-k of next_pow2(k) slots in registers. A tile is merged by repeated
  extraction: while some row's tile maximum beats that row's running minimum, the maximum replaces
  the minimum (at most k+1 rounds per tile, usually far fewer once the running set is warm). Each
  program writes its split's local top-k to a [B, splits * k] candidate buffer; ``torch.topk`` over
  the splits*k candidates gives the final result (a standard two-pass split-k selection). One split
  spans ``latent_chunk`` latents (rounded up to a multiple of BLOCK_N), widened when needed so that
  the candidate buffers stay under CANDIDATE_BUFFER_BYTES (1 GiB). The AuxK candidates are not
  selected in the kernel (k_aux = 2048 running slots per row would not fit in registers, and a
  dead-count-dependent width would recompile the kernel as latents die): `_select_dead` gathers the
  dead latents' W_enc columns, a chunk at a time, and merges one [rows, chunk] matmul per token
  block into a running top-k_aux, costing n_dead / n of the encoder matmul with transients bounded
  by DEAD_PASS_ELEMENTS whatever B and n_dead are. No kernel argument depends on the data, so one
  compiled variant serves a whole run. Tile shapes and launch options per shape class:
  `encoder_launch_config` (checked with `python -m sae_dist.kernels.report`; on a GPU whose timings
  `python -m sae_dist.kernels.tune` merged into its table, the fastest candidate). All pointer offsets
  are int64 (d_in x d_sae reaches 2^31 at production widths).

Backward (both backends, torch ops touching only the selected latents): with
g[b, j] = grad_values[b, j] * (values[b, j] > 0) (ReLU) and i = indices[b, j] (main and AuxK
selections together, duplicates summed),
    grad W_enc[:, i] += g[b, j] * (x[b] - b_dec)   (= (G^T @ (x - b_dec))^T, G^T a sparse CSR
                                                  [n, B] matrix of the B*k entries)
    grad b_enc[i]    += g[b, j]                     (index_add_)
    grad b_dec        = -W_enc @ grad b_enc         (one [d, n] x [n] matvec)
    grad x[b]         = sum_j g[b, j] * W_enc[:, i] (only when need_x_grad=True; gathered columns)
Gradients are accumulated in float32 and cast to the parameters' dtypes (with fp32 master weights
and a bf16 compute_dtype, as the trainer runs under autocast, they stay fp32; x - b_dec is the bf16
operand the forward used). grad W_enc: on the Triton backend computing in fp32 (fp32 training), when
at least DROP_ZEROS_BELOW (90 %) of the entries have a nonzero gradient, one atomic-scatter kernel
into the [d, n] gradient. Otherwise the zero entries are dropped (under tensor parallelism most of a
rank's AuxK candidates are other shards' winners, with zero gradient) and the rest go per latent
chunk (a slice of the latent-sorted CSR matrix, [chunk, d] product, copied transposed into a [d, n]
buffer laid out like W_enc, chunks of up to GRAD_CHUNK_BYTES on CUDA), so no second parameter-sized
temporary exists. bf16 training keeps this CSR path, as it always had: sae-plan's model rates it at
about half the atomic kernel's memory traffic, which `make gpu-check` has yet to measure. On CPU
(d=576, n=16384, k=32, B=4096, fp32) the CSR product measured 35 ms against 52 ms for a COO
torch.sparse.mm and 137 ms for index_add_ of the [B*k, d] rows (which also needs a [B*k, d]
temporary). Deterministic on CPU (rows sorted by a stable sort, one thread per output row); on CUDA
index_add_ and the atomic scatter use atomics (float summation order may vary between runs;
`torch.use_deterministic_algorithms(True)` selects the CSR path for W_enc).

Measured (2-core CPU, torch 2.13, fp32, d=576, n=16384, k=32, B=4096; CPU-seconds of the process,
median of 5, relative to one bare dense x @ W_enc in the same loop): forward 1.09x (dense addmm +
torch.topk: 1.12x), backward 0.08x; with AuxK (k_aux=256, 5% dead) forward 1.21x, backward 0.23x.
"""

from __future__ import annotations

import functools
import itertools
import threading
import warnings

import torch
import torch.nn.functional as F

from . import _common
from ._common import BACKENDS, Launch, dense_rows_block, interpret_mode, resolve_backend, tf32_enabled, triton_release

__all__ = ["encode_topk", "encode_topk_reference", "triton_available", "BACKENDS", "LATENT_CHUNK"]

#: The dtypes `encode_topk` computes in (its compute_dtype).
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: `encode_topk`'s default latent_chunk (the trainer's): the torch path's [B, chunk] pre-activation buffer width.
LATENT_CHUNK = 4096

try:  # Triton is optional: the module (and the torch path) works without it.
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only where Triton is absent
    triton = None
    tl = None


def triton_available(device: torch.device | str) -> bool:
    """True when the Triton kernel can run on tensors of `device`: the kernels can use this environment's
    Triton (`_common.triton_available`: it imports and is recent enough) and `device` is CUDA, or CPU under
    the Triton interpreter (env TRITON_INTERPRET=1)."""
    dev = torch.device(device)
    return _common.triton_available() and (dev.type == "cuda" or (dev.type == "cpu" and interpret_mode()))


# ---------------------------------------------------------------------------------------- checks
def _check_inputs(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, backend, latent_chunk):
    if W_enc.dim() != 2:
        raise ValueError(f"W_enc must be [d_in, d_sae], got shape {tuple(W_enc.shape)}")
    d, n = W_enc.shape
    if x.dim() != 2 or x.shape[1] != d:
        raise ValueError(
            f"x must be [B, d_in={d}] (flatten leading dims first), got shape {tuple(x.shape)}"
        )
    if b_enc.shape != (n,):
        raise ValueError(f"b_enc must be [d_sae={n}], got shape {tuple(b_enc.shape)}")
    if b_dec.shape != (d,):
        raise ValueError(f"b_dec must be [d_in={d}], got shape {tuple(b_dec.shape)}")
    for name, t in (("x", x), ("b_enc", b_enc), ("b_dec", b_dec)):
        if t.device != W_enc.device:
            raise ValueError(f"{name} is on {t.device} but W_enc is on {W_enc.device}; move it")
    if b_enc.dtype != W_enc.dtype or b_dec.dtype != W_enc.dtype:
        raise ValueError(
            f"b_enc ({b_enc.dtype}) and b_dec ({b_dec.dtype}) must have W_enc's dtype {W_enc.dtype}"
        )
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
        raise ValueError(f"k={k!r} must be an int in [1, d_sae={n}]")
    if not isinstance(k_aux, int) or isinstance(k_aux, bool) or k_aux < 0:
        raise ValueError(f"k_aux={k_aux!r} must be an int >= 0 (0 disables the AuxK candidates)")
    if dead_mask is not None:
        if dead_mask.dtype != torch.bool or dead_mask.shape != (n,):
            raise ValueError(
                f"dead_mask must be bool [d_sae={n}], got {dead_mask.dtype} "
                f"{tuple(dead_mask.shape)}"
            )
        if dead_mask.device != W_enc.device:
            raise ValueError(f"dead_mask is on {dead_mask.device} but W_enc on {W_enc.device}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; choose one of {BACKENDS}")
    if not isinstance(latent_chunk, int) or isinstance(latent_chunk, bool) or latent_chunk < 1:
        raise ValueError(f"latent_chunk={latent_chunk!r} must be an int >= 1 (e.g. 4096)")


# ---------------------------------------------------------------------------- torch selection
class _RunningTopK:
    """Running per-row top-k over column chunks: candidates are buffered and reduced with one
    torch.topk whenever their total width exceeds `flush_width` (and at the end), which costs less
    than merging after every chunk. A chunk's ids are [B, w] int64, or [w] when every row has the
    same candidate columns (a gather of the dead latents): those stay 1-D until a reduction picks
    from them, so no [B, w] id block is built for them."""

    def __init__(self, k: int, flush_width: int):
        self.k = k
        self.flush_width = max(flush_width, 2 * k)
        self.vals: list[torch.Tensor] = []
        self.idx: list[torch.Tensor] = []
        self.width = 0

    def add(self, v: torch.Tensor, i: torch.Tensor) -> None:
        if self.vals and self.width + v.shape[1] > self.flush_width:
            self._reduce()  # the buffer never exceeds max(flush_width, k + this chunk's width)
        self.vals.append(v)
        self.idx.append(i)
        self.width += v.shape[1]

    def _reduce(self) -> None:
        B = self.vals[0].shape[0]
        if len(self.vals) == 1 and self.width <= self.k:
            cv, ci = self.vals[0], self.idx[0]
        else:
            cv = torch.cat(self.vals, dim=1) if len(self.vals) > 1 else self.vals[0]
            shared = all(i.dim() == 1 for i in self.idx)
            ids = self.idx if shared else [i.expand(B, -1) if i.dim() == 1 else i for i in self.idx]
            ci = torch.cat(ids, dim=-1) if len(ids) > 1 else ids[0]
            kk = min(self.k, cv.shape[1])
            if kk < cv.shape[1]:
                cv, j = cv.topk(kk, dim=1, sorted=False)
                ci = ci[j] if shared else ci.gather(1, j)
        self.vals, self.idx, self.width = [cv], [ci], cv.shape[1]

    def result(self):
        if not self.vals:
            return None, None
        self._reduce()
        v, i = self.vals[0], self.idx[0]
        return v, (i.expand(v.shape[0], -1) if i.dim() == 1 else i)


_WORKSPACES = threading.local()


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-D scratch tensor of >= numel elements, reused across calls on CPU (per thread, per
    dtype): the [B, chunk] pre-activation buffer is rewritten every step, and a fresh 64 MiB
    allocation per step costs ~15 ms of page faults on CPU. On other devices torch's caching
    allocator already reuses memory, so a plain torch.empty. Contents are undefined."""
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    cache = getattr(_WORKSPACES, "bufs", None)
    if cache is None:
        cache = _WORKSPACES.bufs = {}
    buf = cache.get(dtype)
    if buf is None or buf.numel() < numel:
        cache[dtype] = buf = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


_GROUP = 8  # columns per group of the max-pool prefilter in `_chunk_topk`


def _chunk_topk(pre: torch.Tensor, k: int):
    """Exact unsorted top-k per row of pre [B, w] (values, int64 column indices).

    When w is a multiple of _GROUP (= g) and w >= 16 k, a max-pool prefilter first: the row's top-k
    elements lie in the k groups of g consecutive columns with the largest maxima (any element
    beaten by k group maxima is beaten by k distinct elements), so torch.topk runs over the w/g group
    maxima and then over the k*g gathered candidates instead of over all w columns. With exact ties
    the chosen indices may differ from torch.topk's, never the values. Measured on a 2-core CPU,
    fp32, [4096, 4096], k=32: 31 ms for torch.topk, 21 ms with the prefilter.
    """
    B, w = pre.shape
    g = _GROUP
    if w % g or w < 16 * k:
        return pre.topk(k, dim=1, sorted=False)
    gmax = F.max_pool1d(pre.unsqueeze(1), g).squeeze(1)  # [B, w/g]
    gi = gmax.topk(k, dim=1, sorted=False).indices  # [B, k]
    cols = (gi.unsqueeze(-1) * g + torch.arange(g, device=pre.device)).view(B, k * g)
    v, j = pre.gather(1, cols).topk(k, dim=1, sorted=False)
    return v, cols.gather(1, j)


@torch.no_grad()
def _select_torch(xc, W_enc, b_enc, k, dead_mask, k_aux, latent_chunk):
    """Chunked selection. xc [B, d] = x - b_dec in the compute dtype; W_enc and b_enc are cast to it a
    chunk at a time (no copy when they have it already). Returns unsorted (vals [B, k], idx [B, k]
    int64, aux_vals [B, k_aux] | None, aux_idx | None) of raw pre-acts."""
    B = xc.shape[0]
    n = W_enc.shape[1]
    C = min(latent_chunk, n)
    dt = xc.dtype
    buf = _workspace(B * C, dt, W_enc.device)
    want_aux = k_aux > 0
    if want_aux:
        # Per-chunk dead counts in one host transfer; chunks without dead latents are skipped.
        n_chunks = (n + C - 1) // C
        pad = n_chunks * C - n
        dm = F.pad(dead_mask, (0, pad)) if pad else dead_mask
        dead_per_chunk = dm.view(n_chunks, C).sum(1).tolist()
        dead_ids = dead_mask.nonzero().squeeze(1)  # ascending; chunk ci's are a slice (no sync per chunk)
        dead_start = [0, *itertools.accumulate(dead_per_chunk)]
        abuf = None  # [B * C] buffer for chunks where most latents are dead (made on first use)
        neg_inf = torch.full((), float("-inf"), dtype=dt, device=W_enc.device)
    main = _RunningTopK(k, flush_width=8 * k)
    # AuxK candidates are few (at most the dead latents): buffer up to a [B, min(C, 2^24 / B)] block
    # of them and reduce once, rather than one torch.topk(k_aux) per chunk.
    aux = (_RunningTopK(k_aux, flush_width=max(2 * k_aux, min(C, (1 << 24) // max(B, 1))))
           if want_aux else None)
    for ci, c0 in enumerate(range(0, n, C)):
        c1 = min(n, c0 + C)
        w = c1 - c0
        pre = buf[: B * w].view(B, w)
        torch.addmm(b_enc[c0:c1].to(dt), xc, W_enc[:, c0:c1].to(dt), out=pre)
        v, i = _chunk_topk(pre, min(k, w))
        i += c0
        main.add(v, i)
        nd = dead_per_chunk[ci] if want_aux else 0
        if nd == 0:
            continue
        if 2 * nd <= w:
            # few dead latents in this chunk (the usual case): gather their columns only
            ids = dead_ids[dead_start[ci]:dead_start[ci + 1]]
            v, i = pre.gather(1, (ids - c0).expand(B, nd)), ids  # [B, nd]; faster than index_select
        else:
            if abuf is None:
                abuf = torch.empty(B * C, dtype=dt, device=W_enc.device)
            apre = abuf[: B * w].view(B, w)
            torch.where(dead_mask[c0:c1], pre, neg_inf, out=apre)
            v, i = apre.topk(min(k_aux, nd), dim=1, sorted=False)
            i += c0
        aux.add(v, i)
    rv, ri = main.result()
    av, ai = aux.result() if want_aux else (None, None)
    return rv, ri, av, ai


# --------------------------------------------------------------------------- Triton selection
if triton is not None:

    @triton.jit
    def _merge_tile(tile, n0, rv, ri, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
        """Merge a [BLOCK_B, BLOCK_N] tile (columns n0 + 0..BLOCK_N-1) into the running top-k
        (rv, ri) [BLOCK_B, K_PAD]: padded slots hold +inf and are never replaced."""
        kcols = tl.arange(0, K_PAD)
        ncols = tl.arange(0, BLOCK_N)
        m = tl.max(tile, axis=1)
        rmin = tl.min(rv, axis=1)
        go = tl.max((m > rmin).to(tl.int32), axis=0)
        while go > 0:
            am = tl.argmax(tile, axis=1)
            ramin = tl.argmin(rv, axis=1)
            upd = m > rmin
            slot = (kcols[None, :] == ramin[:, None]) & upd[:, None]
            rv = tl.where(slot, m[:, None], rv)
            ri = tl.where(slot, (n0 + am)[:, None], ri)
            tile = tl.where(ncols[None, :] == am[:, None], float("-inf"), tile)
            m = tl.max(tile, axis=1)
            rmin = tl.min(rv, axis=1)
            go = tl.max((m > rmin).to(tl.int32), axis=0)
        return rv, ri

    @triton.jit
    def _encoder_topk_kernel(
        xc_ptr, w_ptr, b_ptr, out_v_ptr, out_i_ptr,
        B, D, N, SPAN,
        stride_xb, stride_xd, stride_wd, stride_wn, stride_ob,
        K: tl.constexpr, K_PAD: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        # Every pointer offset is int64: d_in x n_local reaches 2^31 at production widths.
        pid_b = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        rows64 = rows.to(tl.int64)
        dk = tl.arange(0, BLOCK_D).to(tl.int64)
        x_step = tl.full((), BLOCK_D, tl.int64) * stride_xd
        w_step = tl.full((), BLOCK_D, tl.int64) * stride_wd
        kcols = tl.arange(0, K_PAD)
        rv = tl.where(kcols[None, :] < K, float("-inf"), float("inf")) + tl.zeros(
            [BLOCK_B, K_PAD], tl.float32)
        ri = tl.full([BLOCK_B, K_PAD], -1, tl.int32)
        n_start = pid_s * SPAN
        n_end = tl.minimum(n_start + SPAN, N)
        for n0 in range(n_start, n_end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < n_end
            cols64 = cols.to(tl.int64)
            a_ptrs = xc_ptr + rows64[:, None] * stride_xb + dk[None, :] * stride_xd
            w_ptrs = w_ptr + dk[:, None] * stride_wd + cols64[None, :] * stride_wn
            acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d_ok = dk < D - d0
                a = tl.load(a_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
                if UPCAST:  # Triton 3.9's interpreter computes garbage for 16-bit tl.dot
                    a = a.to(tl.float32)
                    w = w.to(tl.float32)
                acc = tl.dot(a, w, acc, input_precision=PRECISION)
                a_ptrs += x_step
                w_ptrs += w_step
            bias = tl.load(b_ptr + cols64, mask=col_ok, other=0.0).to(tl.float32)
            acc = tl.where(col_ok[None, :], acc + bias[None, :], float("-inf"))
            # NaN ranks as +inf (torch.topk ranks it first): compiled tl.max skips NaN but tl.argmax
            # does not, so a NaN left in would pair one column's value with another's index
            acc = tl.where(acc != acc, float("inf"), acc)
            rv, ri = _merge_tile(acc, n0, rv, ri, K_PAD, BLOCK_N)
        # candidate buffers are [B, SPLITS * K]: this split's k slots of each row
        out_off = rows64[:, None] * stride_ob + (pid_s * K + kcols)[None, :].to(tl.int64)
        out_mask = row_ok[:, None] & (kcols[None, :] < K)
        tl.store(out_v_ptr + out_off, rv, mask=out_mask)
        tl.store(out_i_ptr + out_off, ri, mask=out_mask)


#: Upper bound of the Triton path's split candidate buffers ([B, splits, k] values and indices).
CANDIDATE_BUFFER_BYTES = 1 << 30


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _default_config(k: int, precision: str | None, interpret: bool) -> dict:
    """The launch configuration chosen offline for one shape class (`encoder_launch_config`'s fallback)."""
    K_PAD = max(2, _next_pow2(k))
    if interpret:
        return dict(BLOCK_B=16, BLOCK_N=32, BLOCK_D=16, K_PAD=K_PAD, num_warps=4, num_stages=1)
    rows = max(16, min(64, 8192 // K_PAD))  # the running top-k's slots per program stay <= 8192
    if precision is None:
        # 4 warps spill at K_PAD = 32 before Triton 3.5 (616 / 48 bytes with 3.3 / 3.4), 8 do not
        warps = 8 if K_PAD >= 64 or (triton_release() or (0, 0)) < (3, 5) else 4
        return dict(BLOCK_B=rows, BLOCK_N=128, BLOCK_D=64, K_PAD=K_PAD, num_warps=warps, num_stages=3)
    ieee = precision == "ieee"
    return dict(BLOCK_B=min(32, rows) if ieee else rows, BLOCK_N=64 if ieee else 128, BLOCK_D=32, K_PAD=K_PAD,
                num_warps=8, num_stages=3)


def encoder_launch_config(d_in: int, k: int, precision: str | None, interpret: bool = False,
                          device_name: str | None = None) -> dict:
    """Tile shape and launch options of the fused encoder kernel for one shape class.

    precision: the dot's input precision: None (16-bit inputs, tensor cores), "tf32" (fp32 inputs
    on TF32 tensor cores) or "ieee" (fp32 FMA dots). device_name: the GPU's name
    (`torch.cuda.get_device_name`); when the measured table (`sae_dist.kernels.tune`, file
    `encoder_tuned.json`) holds this device, precision and K_PAD, its fastest candidate is returned.
    Otherwise the configuration chosen offline for Hopper (sm_90a), checked with
    `python -m sae_dist.kernels.report` (0 spill bytes at d_in 768 / 2304 / 4096, k 32 / 64, bf16,
    tf32 and ieee): BLOCK_B x BLOCK_N pre-activation tiles over BLOCK_D steps with a 3-stage
    pipeline, a running top-k of K_PAD = next_pow2(k) slots per row in registers (8 warps, or 4 for 16-bit
    inputs at K_PAD <= 32 from Triton 3.5 on: before it 4 warps spill there). 16-bit inputs take
    BLOCK_D = 64, fp32 BLOCK_D = 32, so a pipeline stage is the same number of bytes; IEEE dots hold
    their operands in registers and take half the token and latent blocks. From K_PAD = 256 (Multi-TopK's
    4k at k = 64) the token block shrinks so that BLOCK_B x K_PAD stays 8192 slots (at 64 rows it spilled
    168 / 404 bytes for bf16 / TF32 with Triton 3.9). The interpreter (CPU tests) takes small tiles. d_in
    enters only through masking (any d_in compiles to the same kernel).
    Returns a dict with BLOCK_B, BLOCK_N, BLOCK_D, K_PAD, num_warps, num_stages.
    """
    default = _default_config(k, precision, interpret)
    if interpret or device_name is None:
        return default
    from .tune import measured_config

    return measured_config(device_name, precision, k) or default


def encoder_candidates(k: int, precision: str | None) -> list[dict]:
    """The launch configurations `python -m sae_dist.kernels.tune` times for one shape class on a GPU,
    the offline default (`encoder_launch_config` without a measured entry) first, then: 2 and 4 pipeline
    stages (IEEE dots: 2 only), half the reduction step BLOCK_D at 4 stages (IEEE: at 3), half the latent
    tile BLOCK_N, and 8 warps where the default takes 4. Each keeps the default's BLOCK_N or half of it,
    so that the latent splits (`encoder_launch`, aligned to the default's BLOCK_N) and sae-plan's model
    do not depend on the choice, and the default's BLOCK_B x K_PAD running top-k slots. The variants
    left out spilled registers for sm_90a with Triton 3.9 (4 warps where the default takes 8; IEEE dots
    at 4 stages); `python -m sae_dist.kernels.report --candidates` compiles the others (0 spill bytes:
    docs/benchmarks.md)."""
    base = _default_config(k, precision, False)
    ieee = precision == "ieee"
    variants = [{}, {"num_stages": 2}, {"BLOCK_N": base["BLOCK_N"] // 2},
                {"BLOCK_D": base["BLOCK_D"] // 2, "num_stages": 3 if ieee else 4}]
    if not ieee:
        variants.insert(1, {"num_stages": 4})
    if base["num_warps"] == 4:
        variants.append({"num_warps": 8})
    return [{**base, **v} for v in variants]


def dot_precision(xc: torch.Tensor) -> str | None:
    """The fused encoder's `tl.dot` input precision for operands of xc's dtype and device: "ieee" under
    the CPU interpreter (it upcasts 16-bit tiles, UPCAST), for fp32 "tf32" or "ieee" as torch's fp32
    matmul setting says (so the Triton and torch paths select the same latents), None (native 16-bit
    tensor-core dots, fp32 accumulation) for bf16 / fp16."""
    if xc.device.type == "cpu":
        return "ieee"
    if xc.dtype == torch.float32:
        return "tf32" if tf32_enabled() else "ieee"
    return None


#: Row stride (elements) of the encoder's xc operand: Triton specialises a pointer stride divisible by 16 as
#: aligned; an unaligned one (d_in not a multiple of 16) spilled 856 bytes per thread for sm_90a (bf16, k = 32).
ROW_ALIGN = 16


def _aligned_rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, d] itself when it starts 16-byte aligned with rows ROW_ALIGN elements apart (row stride a
    multiple of it, unit column stride), else a copy in a buffer of rows padded to a multiple of ROW_ALIGN
    elements (the view [B, d] of it)."""
    if x.stride(1) == 1 and x.stride(0) % ROW_ALIGN == 0 and x.data_ptr() % 16 == 0:
        return x
    buf = x.new_empty(x.shape[0], -(-x.shape[1] // ROW_ALIGN) * ROW_ALIGN)[:, : x.shape[1]]
    return buf.copy_(x)


def encoder_launch(xc, W_enc, b_enc, k, latent_chunk, cand_v=None, cand_i=None, config=None):
    """The fused encoder's `Launch` for xc [B, d] (= x - b_dec), W_enc [d, n], b_enc [n]: a grid of
    (token blocks, latent splits); split s writes its local top-k of every row into columns
    [s k, (s + 1) k) of the [B, splits * k] candidate buffers (fp32 values, int32 latent ids).
    xc is copied into rows padded to a multiple of ROW_ALIGN elements when its rows are not aligned
    (`_aligned_rows`; a [B, d] copy when d_in is not a multiple of 16: aligned loads keep the kernel
    from spilling).
    config: a launch configuration (one of `encoder_candidates`; the tuner passes them), default
    `encoder_launch_config` for the tensors' device. Returns (launch, cand_v, cand_i). Meta tensors are
    accepted (the report compiles from them)."""
    xc = _aligned_rows(xc)
    B, D = xc.shape
    N = W_enc.shape[1]
    interp = xc.device.type == "cpu"
    precision = dot_precision(xc)
    cfg = config or encoder_launch_config(D, k, precision, interpret=interp,
                                          device_name=_device_name(xc.device) if xc.is_cuda else None)
    # the splits are aligned to the default tile, which every candidate's BLOCK_N divides on a GPU (under the
    # interpreter a split may end inside a tile: columns past its end are masked)
    bn = _default_config(k, precision, interp)["BLOCK_N"]
    # Latent splits give parallelism when there are few token blocks; the candidate buffers
    # (8 bytes per entry) stay under CANDIDATE_BUFFER_BYTES by widening the span.
    max_splits = max(1, CANDIDATE_BUFFER_BYTES // max(1, B * k * 8))
    span = max(latent_chunk, -(-N // max_splits), 1)
    span = -(-span // bn) * bn
    splits = -(-N // span)
    if cand_v is None:
        cand_v = torch.empty(B, splits * k, dtype=torch.float32, device=xc.device)
        cand_i = torch.empty(B, splits * k, dtype=torch.int32, device=xc.device)
    grid = (-(-B // cfg["BLOCK_B"]), splits)
    args = (xc, W_enc, b_enc, cand_v, cand_i, B, D, N, span,
            xc.stride(0), xc.stride(1), W_enc.stride(0), W_enc.stride(1), cand_v.stride(0))
    constexprs = dict(K=k, K_PAD=cfg["K_PAD"], BLOCK_B=cfg["BLOCK_B"], BLOCK_N=cfg["BLOCK_N"],
                      BLOCK_D=cfg["BLOCK_D"], PRECISION=precision,
                      UPCAST=interp and W_enc.dtype != torch.float32)
    options = {} if interp else dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    launch = Launch("encoder_topk", _encoder_topk_kernel, grid, args, constexprs, options)
    return launch, cand_v, cand_i


@torch.no_grad()
def _select_triton(xc, W_enc, b_enc, k, dead_mask, k_aux, latent_chunk):
    """Triton split-k selection; same contract as `_select_torch` (unsorted raw pre-acts). The kernel
    keeps only the k main slots per row; the AuxK candidates come from `_select_dead` (a pass over
    the dead latents' columns only), so no kernel depends on the dead count."""
    resolve_backend("triton", xc)  # RuntimeError when Triton cannot run here
    N = W_enc.shape[1]
    if N >= 2**31:
        raise ValueError(f"d_sae={N} per process must be < 2^31 (int32 latent ids); shard wider")
    # the dead latents' ids: nonzero() waits for the device, so before the kernel is queued, not after it
    dead = dead_mask.nonzero().squeeze(1) if k_aux > 0 and dead_mask is not None else None
    # the kernel reads W_enc in the compute dtype: a cast copy, freed with the launch before the dead pass
    launch, cand_v, cand_i = encoder_launch(xc, W_enc.to(xc.dtype), b_enc.to(xc.dtype), k, latent_chunk)
    if xc.shape[0]:
        launch.run()
    del launch
    v, j = cand_v.topk(k, dim=1, sorted=False)
    i = cand_i.gather(1, j).long()
    av = ai = None
    if dead is not None:
        av, ai = _select_dead(xc, W_enc, b_enc, dead, k_aux, latent_chunk)
    return v, i, av, ai


#: Bound of one token block of the dead-latent pass, in elements of its [rows, k_aux + chunk] merge.
DEAD_PASS_ELEMENTS = 1 << 27


@torch.no_grad()
def _select_dead(xc, W_enc, b_enc, dead, k_aux, latent_chunk):
    """AuxK candidates (Gao et al. 2024, section 2.4.1): the top-k_aux raw pre-activations of each
    row among the dead latents, int64 ids `dead` [n_dead] ascending (k_aux <= n_dead, as `encode_topk`
    passes it).

    The dead latents' W_enc columns are gathered C = min(max(latent_chunk, 2 k_aux), n_dead) at a
    time and cast to xc's dtype (the compute dtype); for each chunk and each block of
    R = DEAD_PASS_ELEMENTS // (k_aux + C) rows, one [R, C] addmm is merged into the running
    [B, k_aux] result (one torch.topk over k_aux + C columns). Costs n_dead / n of an encoder matmul;
    transients are bounded by the block, whatever B and n_dead (sizes: `sae_dist.plan._dead_pass`).
    Returns unsorted (values [B, k_aux] in xc's dtype, int64 latent ids [B, k_aux])."""
    B = xc.shape[0]
    nd = dead.numel()
    C = max(1, min(max(latent_chunk, 2 * k_aux), nd))
    R = max(1, DEAD_PASS_ELEMENTS // (k_aux + C))
    out_v = xc.new_empty(B, k_aux)
    out_i = torch.empty(B, k_aux, dtype=torch.long, device=xc.device)
    for c0 in range(0, nd, C):
        cols = dead[c0:c0 + C]
        Wc = bc = None  # the previous chunk's columns go before the next ones are gathered
        Wc, bc = W_enc.index_select(1, cols).to(xc.dtype), b_enc.index_select(0, cols).to(xc.dtype)
        for r0 in range(0, B, R):
            _merge_dead(out_v[r0:r0 + R], out_i[r0:r0 + R], xc[r0:r0 + R], Wc, bc, cols, c0 == 0)
    return out_v, out_i


def _merge_dead(out_v, out_i, xb, Wc, bc, cols, first):
    """Merge one chunk's pre-activations xb @ Wc + bc ([rows, w]; latent ids cols [w]) into the
    running top-k_aux out_v / out_i [rows, k_aux], in place. The first chunk (w >= k_aux) is selected
    alone."""
    ka = out_v.shape[1]
    pre = torch.addmm(bc, xb, Wc)
    if first:
        if pre.shape[1] == ka:
            out_v.copy_(pre)
            out_i.copy_(cols.expand_as(out_i))
        else:
            v, j = pre.topk(ka, dim=1, sorted=False)
            out_v.copy_(v)
            torch.index_select(cols, 0, j.view(-1), out=out_i.view(-1))
        return
    merged = torch.cat([out_v, pre], dim=1)
    del pre
    v, j = merged.topk(ka, dim=1, sorted=False)  # j < ka: a held slot; else column j - ka of pre
    del merged
    out_v.copy_(v)
    new = j >= ka
    new_ids = cols[(j - ka).clamp_(min=0)]
    old_ids = out_i.gather(1, j.clamp_(max=ka - 1))
    torch.where(new, new_ids, old_ids, out=out_i)


# ----------------------------------------------------------------------------- autograd glue
def _sort_desc(v, i):
    v, j = v.sort(dim=1, descending=True)
    return v, i.gather(1, j)


class _EncodeTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, backend, latent_chunk,
                need_x_grad, token_chunk, compute_dtype):
        # The selection runs on operands in compute_dtype; the selections cast W_enc themselves (the
        # backward reads the parameter, and its gradients are in its dtype).
        xc = x.to(compute_dtype) - b_dec.to(compute_dtype)
        B = x.shape[0]
        if backend == "triton":
            v, i, av, ai = _select_triton(xc.contiguous(), W_enc, b_enc, k, dead_mask, k_aux, latent_chunk)
        else:
            v, i, av, ai = _select_torch(xc, W_enc, b_enc, k, dead_mask, k_aux, latent_chunk)
        v, i = _sort_desc(v, i)
        values = F.relu(v).to(compute_dtype)
        if av is None:
            aux_values = values.new_zeros(B, 0)
            aux_indices = i.new_zeros(B, 0)
        else:
            aux_values, aux_indices = F.relu(av).to(compute_dtype), ai  # unsorted: AuxK sums them
        ctx.save_for_backward(xc, W_enc, values, i, aux_values, aux_indices)
        ctx.x_dtype = x.dtype
        ctx.need_x_grad = need_x_grad
        ctx.token_chunk = token_chunk
        ctx.latent_chunk = latent_chunk
        ctx.backend = backend
        ctx.mark_non_differentiable(i, aux_indices)
        return values, i, aux_values, aux_indices

    @staticmethod
    def backward(ctx, g_values, _g_idx, g_aux, _g_aux_idx):
        xc, W_enc, values, idx, aux_values, aux_idx = ctx.saved_tensors
        n = W_enc.shape[1]
        g = (g_values * (values > 0)).float()
        # The AuxK codes span only the dead latents: on CPU, when they are few, their part of every
        # gradient goes through a dense [B, u] block over those u latents (BLAS) instead of the
        # sparse entries (`_common.dense_rows_block`, measurement there).
        block = None
        if aux_values.shape[1] > 0:
            ga = (g_aux * (aux_values > 0)).float()
            if ctx.backend == "torch":  # (None on CUDA)
                block = dense_rows_block(ga, aux_idx, n, torch.float32)
            if block is None:
                g = torch.cat([g, ga], dim=1)
                idx = torch.cat([idx, aux_idx], dim=1)
        need_w, need_benc, need_bpre = ctx.needs_input_grad[1:4]
        xcf = xc if xc.dtype == torch.float32 else xc.float()
        gsum = None
        if need_benc or need_bpre:
            gsum = torch.zeros(n, dtype=torch.float32, device=g.device)
            gsum.index_add_(0, idx.reshape(-1), g.reshape(-1))
            if block is not None:
                gsum.index_add_(0, block[0], block[1].sum(0))
        atomic = ctx.backend == "triton" and xc.dtype == W_enc.dtype == torch.float32 and block is None
        gW = _grad_w_enc(xcf, g, idx, block, W_enc, atomic, ctx.latent_chunk) if need_w else None
        gx = None
        if ctx.needs_input_grad[0] and ctx.need_x_grad:
            gx = _grad_x(g, idx, block, W_enc, ctx.token_chunk).to(ctx.x_dtype)
        g_benc = gsum.to(W_enc.dtype) if need_benc else None
        g_bpre = _grad_b_dec(W_enc, gsum, ctx.latent_chunk) if need_bpre else None
        return gx, gW, g_benc, g_bpre, None, None, None, None, None, None, None, None


#: Bound of the CSR W_enc-gradient path's per-chunk [chunk, d] fp32 product, in bytes.
GRAD_CHUNK_BYTES = 1 << 28


#: The W_enc gradient keeps only its nonzero entries (a CSR product over them, no atomics) when fewer
#: than this fraction of its slots are nonzero: under tensor parallelism most of a rank's AuxK
#: candidates are other shards' winners, with zero gradient (`sae_dist.plan` mirrors it).
DROP_ZEROS_BELOW = 0.9


def _grad_w_enc(xcf, g, idx, block, W_enc, atomic, latent_chunk):
    """grad W_enc [d, n] = (G^T @ (x - b_dec))^T for the sparse codes (g, idx) [B, kk] (plus the dense
    AuxK block, CPU). atomic (the Triton backend computing in fp32), nondeterminism allowed and at
    least DROP_ZEROS_BELOW of the entries nonzero (one process): one atomic-scatter kernel
    (`sparse_decode`'s W_dec-gradient kernel writing through the [n, d] view of the [d, n] gradient).
    Otherwise CSR x dense products per latent chunk over the nonzero entries (module docstring)."""
    d, n = W_enc.shape
    gf = g.reshape(-1)
    # entries with g = 0 add nothing: ReLU-clipped values, and under tensor parallelism the
    # candidates another shard won (most of a rank's AuxK candidates)
    sparse = int(torch.count_nonzero(gf)) < DROP_ZEROS_BELOW * gf.numel()
    if atomic and not sparse and not torch.are_deterministic_algorithms_enabled():
        from .sparse_decode import grad_wdec_atomic_launch

        gW = torch.zeros(d, n, dtype=torch.float32, device=g.device)
        if g.numel():
            grad_wdec_atomic_launch(xcf.contiguous(), idx.contiguous(), g.contiguous(), gW.t()).run()
        return gW
    return _grad_w_enc_csr(xcf, gf, idx, block, W_enc, latent_chunk, drop_zeros=sparse)


def _grad_w_enc_csr(xcf, gf, idx, block, W_enc, latent_chunk, drop_zeros):
    """`_grad_w_enc` by CSR x dense products: gf [B * kk] the flat gradients of the entries idx [B, kk],
    only the nonzero ones kept when drop_zeros."""
    d, n = W_enc.shape
    B, kk = idx.shape
    # The entries are sorted by latent (stable sort: deterministic on CPU), so each latent chunk is a
    # slice of one CSR matrix; its [chunk, d] product is copied transposed into the [d, n] gradient, so
    # no second parameter-sized temporary exists. Chunks of >= latent_chunk latents and up to
    # GRAD_CHUNK_BYTES per product (few Python iterations at large n).
    rows = idx.reshape(-1)
    toks = torch.arange(B, device=gf.device).repeat_interleave(kk)
    if drop_zeros:
        nz = gf.nonzero().squeeze(1)
        rows, toks, gf = rows[nz], toks[nz], gf[nz]
    rows, order = torch.sort(rows, stable=True)
    toks, gf = toks[order], gf[order]
    crow = _common.csr_offsets(rows, n)
    gW = torch.empty(d, n, dtype=W_enc.dtype, device=gf.device)
    C = max(1, min(n, max(latent_chunk, GRAD_CHUNK_BYTES // (4 * d) if gf.is_cuda else latent_chunk)))
    bounds = crow[::C].tolist() + ([] if n % C == 0 else [crow[-1].item()])
    if block is not None:  # the dense AuxK block's rows, split by chunk (rows ascending)
        b_rows, b_gw = block[0], block[1].t() @ xcf  # [u], [u, d] fp32
        b_cut = torch.searchsorted(b_rows, torch.arange(0, n + C, C, device=gf.device)).tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        for c, c0 in enumerate(range(0, n, C)):
            c1 = min(n, c0 + C)
            e0, e1 = bounds[c], bounds[c + 1]
            Gt = torch.sparse_csr_tensor(crow[c0:c1 + 1] - e0, toks[e0:e1], gf[e0:e1], (c1 - c0, B))
            out = Gt @ xcf  # [chunk, d] fp32
            if block is not None and b_cut[c] < b_cut[c + 1]:
                sl = slice(b_cut[c], b_cut[c + 1])
                out.index_add_(0, b_rows[sl] - c0, b_gw[sl])
            gW[:, c0:c1].copy_(out.t())
    return gW


def _grad_x(g, idx, block, W_enc, token_chunk):
    """grad x [B, d] fp32 = sum_j g[b, j] W_enc[:, idx[b, j]] (gathered columns, token_chunk tokens at
    a time), plus the dense AuxK block's part."""
    B, kk = g.shape
    d = W_enc.shape[0]
    Wt = W_enc.t()
    gx = torch.empty(B, d, dtype=torch.float32, device=g.device)
    tb = max(1, token_chunk)
    for t0 in range(0, B, tb):
        t1 = min(B, t0 + tb)
        cols = Wt.index_select(0, idx[t0:t1].reshape(-1)).float().view(t1 - t0, kk, d)
        gx[t0:t1] = torch.bmm(g[t0:t1, None, :], cols).squeeze(1)
    if block is not None:
        gx += block[1] @ Wt.index_select(0, block[0]).float()
    return gx


def _grad_b_dec(W_enc, gsum, latent_chunk):
    """grad b_dec [d] = -W_enc @ gsum in fp32, cast to W_enc's dtype: one product for an fp32 W_enc, a latent
    chunk at a time for a 16-bit one (no fp32 copy of it)."""
    if W_enc.dtype == torch.float32:
        return -(W_enc @ gsum)
    d, n = W_enc.shape
    acc = torch.zeros(d, dtype=torch.float32, device=gsum.device)
    C = max(1, min(latent_chunk, n))
    for c0 in range(0, n, C):
        acc -= W_enc[:, c0:c0 + C].float() @ gsum[c0:c0 + C]
    return acc.to(W_enc.dtype)


def encode_topk(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    k: int,
    *,
    dead_mask: torch.Tensor | None = None,
    k_aux: int = 0,
    backend: str = "auto",
    latent_chunk: int = LATENT_CHUNK,
    need_x_grad: bool = False,
    token_chunk: int = 512,
    compute_dtype: torch.dtype | None = None,
):
    """Fused TopK-SAE encoder: ReLU(TopK_k((x - b_dec) @ W_enc + b_enc)) without a [B, n] matrix.

    Gao et al. 2024, section 2.3 (TopK activation, eq. 3), section 2.4.1 (AuxK dead-latent
    candidates), section 5.1 (sparse kernels). See the module docstring for the algorithms.

    Args:
      x: [B, d_in] float (any float dtype; cast to compute_dtype).
      W_enc: [d_in, d_sae] float32/bfloat16/float16; b_enc: [d_sae]; b_dec: [d_in]
        both in W_enc's dtype, all on one device.
      k: latents kept per token, 1 <= k <= d_sae.
      dead_mask: bool [d_sae], True for dead latents, or None (no AuxK candidates).
      k_aux: AuxK candidates per token among dead latents (0 disables them).
      backend: "auto" (Triton on CUDA when importable, else torch), "torch", or "triton" (CUDA, or
        CPU tensors under TRITON_INTERPRET=1).
      latent_chunk: latents per chunk (torch path: columns of one [B, chunk] buffer; Triton path:
        latents per program split, rounded up to the tile BLOCK_N). Any value >= 1 is valid.
      need_x_grad: also return a gradient for x (else x gets None).
      token_chunk: tokens per block when gathering W_enc columns for the x gradient (bounds its
        [token_chunk * k, d] temporary; only used with need_x_grad).
      compute_dtype: dtype of the selection's operands and of the returned values (float32, bfloat16
        or float16), or None for W_enc's dtype. With fp32 master weights under bf16 autocast pass
        torch.bfloat16: x, W_enc, b_enc and b_dec are cast inside the forward (W_enc a latent chunk at
        a time on the torch backend; whole for the Triton kernel, freed before the AuxK pass, which
        casts the dead latents' columns), the backward holds only the parameters, and the gradients
        come out in their dtype (fp32, no bf16 gradient to cast).

    Returns (values, indices, aux_values, aux_indices):
      values [B, k] in compute_dtype, ReLU of the top-k pre-activations, sorted descending
        (a value is 0 when fewer than k pre-activations are positive); indices [B, k] int64. A NaN
        pre-activation ranks first, as in torch.topk: NaN on the torch path, +inf from the Triton kernel.
      aux_values / aux_indices [B, k_eff] with k_eff = min(k_aux, number of dead latents), the
        ReLU'd top pre-activations among dead latents, in no particular order (the AuxK input); width 0
        when no latent is dead; both None when k_aux == 0 or dead_mask is None.
    Differentiable w.r.t. W_enc, b_enc, b_dec (and x when need_x_grad) through values and
    aux_values; the backward touches only the selected columns of W_enc (module docstring).

    Raises ValueError naming the bad argument (shapes, dtypes, devices, k, k_aux, backend,
    latent_chunk, compute_dtype); RuntimeError when backend="triton" cannot run on the tensors' device.
    """
    _check_inputs(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, backend, latent_chunk)
    if compute_dtype is None:
        compute_dtype = W_enc.dtype
    elif compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype={compute_dtype!r}; choose one of {COMPUTE_DTYPES} or None "
                         f"(W_enc's dtype)")
    backend = resolve_backend(backend, W_enc)
    use_aux = k_aux > 0 and dead_mask is not None
    # AuxK candidates: k_eff = min(k_aux, number of dead latents) of them, among dead_mask's latents
    k_eff, dm = (min(k_aux, int(dead_mask.sum())), dead_mask) if use_aux else (0, None)
    values, indices, aux_values, aux_indices = _EncodeTopK.apply(
        x, W_enc, b_enc, b_dec, k, dm, k_eff, backend, latent_chunk, bool(need_x_grad),
        int(token_chunk), compute_dtype,
    )
    if not use_aux:
        return values, indices, None, None
    return values, indices, aux_values, aux_indices


def encode_topk_reference(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    k: int,
    *,
    dead_mask: torch.Tensor | None = None,
    k_aux: int = 0,
    backend: str = "auto",
    latent_chunk: int = LATENT_CHUNK,
    need_x_grad: bool = False,
    token_chunk: int = 512,
):
    """Dense torch oracle of `encode_topk` (same signature and returns; `backend`, `latent_chunk`,
    `need_x_grad` and `token_chunk` are accepted and ignored). Materialises the [B, n]
    pre-activations and differentiates through plain autograd (x gets a gradient when it requires
    one). Tests and small inputs only. Gao et al. 2024, section 2.3 / 2.4.1.
    """
    _check_inputs(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, "torch", max(1, latent_chunk))
    pre = (x.to(W_enc.dtype) - b_dec) @ W_enc + b_enc
    v, i = pre.topk(k, dim=1, sorted=True)
    values = F.relu(v)
    if k_aux == 0 or dead_mask is None:
        return values, i, None, None
    k_eff = min(k_aux, int(dead_mask.sum()))
    masked = pre.masked_fill(~dead_mask, float("-inf"))
    av, ai = masked.topk(k_eff, dim=1, sorted=True)
    return values, i, F.relu(av), ai
