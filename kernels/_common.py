"""Helpers shared by the kernels: backend selection, the Triton version gate, input checks, `Launch`.

This module imports Triton only when asked whether the kernels can use it (`triton_problem`); every kernel
module imports without Triton, and only `backend="triton"` (or `"auto"` on CUDA) needs it.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings

import torch

__all__ = ["BACKENDS", "MIN_TRITON", "COMPILE_OPTIONS", "triton_release", "triton_problem", "triton_available",
           "interpret_mode", "resolve_backend", "check_sparse_codes", "drop_padding", "csr_offsets"]

BACKENDS = ("auto", "torch", "triton")


#: The oldest Triton release the kernels run with: every kernel compiles for sm_90a without spills and the kernel
#: tests pass under its interpreter (docs/benchmarks.md, "Triton releases"; 3.3 is PyTorch 2.7's). 3.2's
#: interpreter aborts and 3.0 rejects the kernels. Older: the torch path (`resolve_backend`).
MIN_TRITON = (3, 3)
#: Launch options every compiled kernel states rather than leaving to Triton's defaults: FMA contraction on (the
#: default through 3.9, which 3.10 turns off; stated, it also silences 3.9's warning about that change).
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def triton_release() -> tuple[int, int] | None:
    """(major, minor) of the installed Triton, or None when it does not import."""
    try:
        import triton
    except Exception:
        return None
    return tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:2])


def triton_problem() -> str | None:
    """Why the kernels cannot use this environment's Triton: it does not import, or it is older than MIN_TRITON
    (the message names the version and the fix); None when they can. Cached after the first call."""
    global _TRITON_PROBLEM
    if _TRITON_PROBLEM is None:
        try:
            import triton
            import triton.language  # noqa: F401

            have = triton_release()
            need = ".".join(map(str, MIN_TRITON))
            _TRITON_PROBLEM = "" if have >= MIN_TRITON else (
                f"triton {triton.__version__} is older than {need}, the oldest release sae-dist's kernels run with; "
                f"upgrade it (pip install 'triton>={need}', or a PyTorch >= 2.7 build, which brings it)")
        except Exception as e:  # ImportError, or a broken install
            _TRITON_PROBLEM = f"the `triton` package does not import ({type(e).__name__}: {e}); install it"
    return _TRITON_PROBLEM or None


def triton_available() -> bool:
    """True when the kernels can use this environment's Triton (`triton_problem` is None)."""
    return triton_problem() is None


_TRITON_PROBLEM: str | None = None
_WARNED_OLD_TRITON = False


def interpret_mode() -> bool:
    """True when Triton's CPU interpreter is on (env TRITON_INTERPRET=1, read at kernel definition)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Map a requested backend to "torch" or "triton".

    "auto": "triton" when every given tensor is on CUDA and the kernels can use Triton (`triton_available`),
    else "torch" (on CUDA with a warning, once, saying why).
    "triton": forced; raises RuntimeError naming the problem if Triton is missing or too old, or if a tensor
    is on CPU while the interpreter is off (set TRITON_INTERPRET=1 before importing the kernels to run Triton on CPU).
    "torch": the torch reference path.
    Raises ValueError for any other string.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if backend == "auto":
        if on_cuda and not triton_available():
            _warn_torch_path_on_cuda()
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError(f"backend='triton': {triton_problem()}; or use backend='torch'")
    if not on_cuda and not interpret_mode():
        raise RuntimeError(
            "backend='triton' got CPU tensors but TRITON_INTERPRET is not set; move the tensors to CUDA, "
            "set TRITON_INTERPRET=1 before importing sae_dist.kernels, or use backend='torch'"
        )
    return "triton"


def _warn_torch_path_on_cuda() -> None:
    global _WARNED_OLD_TRITON
    if not _WARNED_OLD_TRITON:
        _WARNED_OLD_TRITON = True
        warnings.warn(f"sae-dist's Triton kernels are off on this CUDA device, the torch path runs (slower): "
                      f"{triton_problem()}", RuntimeWarning, stacklevel=3)


def check_sparse_codes(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
                       names: tuple[str, str] = ("values", "indices")) -> bool | None:
    """Validate sparse codes against a decoder: values/indices [B, k], indices integer in [0, n) or
    -1 (padding: "no latent", e.g. fewer dead latents than k_aux; its value is ignored).

    Returns whether any index is -1 (False/True), or None on CUDA, where the range is not checked (the
    check would force a host sync every step; the Triton kernels mask indices outside [0, n)).
    Raises ValueError naming the bad shape, dtype, device or index range.
    """
    vn, iname = names
    if values.dim() != 2 or values.shape != indices.shape:
        raise ValueError(
            f"{vn} {tuple(values.shape)} and {iname} {tuple(indices.shape)} must both be [B, k]"
        )
    if indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{iname} must be int64 (or int32), got {indices.dtype}; use .long()")
    if not values.is_floating_point():
        raise ValueError(f"{vn} must be a floating tensor, got {values.dtype}")
    if W_dec.dim() != 2:
        raise ValueError(f"W_dec must be [d_sae, d_in], got shape {tuple(W_dec.shape)}")
    if not (values.device == indices.device == W_dec.device):
        raise ValueError(
            f"{vn} ({values.device}), {iname} ({indices.device}) and W_dec ({W_dec.device}) must be "
            "on one device"
        )
    if indices.is_cuda:
        return None
    if indices.numel() == 0:
        return False
    lo, hi = int(indices.min()), int(indices.max())
    if lo < -1 or hi >= W_dec.shape[0]:
        raise ValueError(
            f"{iname} must lie in [0, d_sae={W_dec.shape[0]}) (or be -1 for padding), got range "
            f"[{lo}, {hi}]"
        )
    return lo == -1


def drop_padding(values: torch.Tensor, indices: torch.Tensor, has_pad: bool | None):
    """(values, indices int64) with padding entries (index -1) turned into value 0 at row 0, so that
    plain torch ops (embedding_bag, scatter) can consume them; a no-op when has_pad is False."""
    if has_pad is False:
        return values, indices.long()
    valid = indices >= 0
    return torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device)), \
        indices.clamp_min(0).long()


# CPU torch paths: when a batch's sparse codes span few distinct latents u (the usual case for the AuxK
# codes, which are drawn from the dead latents only), a dense [B, u] code block and BLAS matmuls beat
# gathers/scatters of the B*k rows. Measured on 2 shared (noisy) CPU cores, fp32, B=4096, d=576,
# k_aux=256: AuxK decode fwd+bwd, u=500 about 2.5x and u=1000 about 2x faster than embedding_bag,
# u=2000 a tie within noise, u=4000 slower; the encoder's W_enc gradient of the same codes, u=819:
# 26 ms dense against 60 ms for the CSR product of the 1M entries.
DENSE_ROWS_FACTOR = 4
DENSE_MAX_ELEMENTS = 1 << 24  # B * u cap: 64 MiB per fp32 [B, u] buffer


def dense_rows_block(values: torch.Tensor, indices: torch.Tensor, n_rows: int, dtype: torch.dtype):
    """Sparse codes as a dense block over their distinct latents, when that is the cheaper form.

    values [B, k] float, indices [B, k] int64 in [0, n_rows) (no padding), on a CPU device; dtype is the
    block's dtype. Returns (rows [u] int64 ascending distinct latents, Z [B, u] with
    Z[b, position of indices[b, j] in rows] += values[b, j]) when u <= DENSE_ROWS_FACTOR * k and
    B * u <= DENSE_MAX_ELEMENTS, else None (callers then take their gather/scatter path). Only for
    fp32/fp64 on CPU (None otherwise: CUDA runs Triton, and CPU half matmuls may be slow).
    """
    B, k = indices.shape
    if indices.is_cuda or dtype not in (torch.float32, torch.float64) or DENSE_ROWS_FACTOR <= 0:
        return None
    present = torch.bincount(indices.reshape(-1), minlength=n_rows) > 0  # faster than index_put
    u = int(present.sum())
    if u > DENSE_ROWS_FACTOR * k or B * u > DENSE_MAX_ELEMENTS:
        return None
    rows = present.nonzero().squeeze(1)  # distinct rows, ascending
    # position of each index in rows (index_select: 2.1 -> 1.2 ms at [4096, 256] over 16384 latents)
    local = (torch.cumsum(present, 0) - 1).index_select(0, indices.reshape(-1)).view(B, k)
    Z = torch.zeros(B, u, dtype=dtype, device=indices.device).scatter_add_(1, local, values.to(dtype))
    return rows, Z


def csr_offsets(sorted_rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """CSR row offsets of entries sorted by row: int64 [n_rows + 1], offsets[r] = number of entries
    with row < r. sorted_rows: int64 [E] ascending (entries with row >= n_rows, e.g. a padding
    sentinel, are left out). A binary search per row, with no host synchronisation on CUDA (torch's
    bincount reads the rows' min and max on the host)."""
    return torch.searchsorted(sorted_rows, torch.arange(n_rows + 1, device=sorted_rows.device))


# ------------------------------------------------------------------------------------ launches
class Launch:
    """One Triton kernel launch, described before it runs: `kernel[grid](*args, **constexprs,
    **options)`. The same object is what runs (`run`), what `sae_dist.kernels.report` compiles
    ahead of time for a GPU architecture (with meta tensors standing in for the real ones), and what
    `record_variants` counts, so the report and the variant test see exactly the production launch.

    name: the kernel's public name (report rows); args: runtime arguments in the kernel's order
    (tensors, ints); constexprs: the tl.constexpr arguments by name; options: launch options
    (num_warps, num_stages).
    """

    __slots__ = ("name", "kernel", "grid", "args", "constexprs", "options")

    def __init__(self, name, kernel, grid, args, constexprs, options=None):
        self.name, self.kernel, self.grid = name, kernel, tuple(int(g) for g in grid)
        self.args, self.constexprs = tuple(args), dict(constexprs)
        self.options = {**COMPILE_OPTIONS, **(options or {})}  # the interpreter ignores them

    def run(self) -> None:
        """Launch the kernel on the device of its CUDA tensor arguments (and that device's current stream):
        Triton launches on the *current* CUDA device, which need not be the tensors' (a single process
        on cuda:1 keeps cuda:0 current)."""
        if _RECORDERS:
            key = self.variant_key()
            for rec in _RECORDERS:
                rec.add(key)
        dev = next((a.device for a in self.args if isinstance(a, torch.Tensor) and a.is_cuda), None)
        with torch.cuda.device(dev) if dev is not None else contextlib.nullcontext():
            self.kernel[self.grid](*self.args, **self.constexprs, **self.options)

    def signature(self) -> list[tuple]:
        """Triton's specialisation of each runtime argument, as its JIT computes it: (type, attribute)
        pairs such as ('*bf16', 'D') (16-byte aligned pointer), ('i32', 'D') (int divisible by 16),
        ('i64', '') (an int >= 2^31) or ('constexpr', 1) (ints equal to 1 are specialised)."""
        spec = _specializer()
        return [tuple(spec(a)) for a in self.args]

    def variant_key(self) -> tuple:
        """What selects a compiled binary: the argument specialisation, the constexprs and the launch
        options. Two launches with equal keys reuse one compiled kernel."""
        return (self.name, tuple(self.signature()), tuple(sorted(self.constexprs.items())),
                tuple(sorted(self.options.items())))


_RECORDERS: list[set] = []


def _specializer():
    """Triton's JIT argument specialisation, arg -> (type, attribute), in each release from 3.3 on (3.5 moved
    it to C++, 3.4 and 3.3 differ in how the backend's part is passed)."""
    from triton.backends.compiler import BaseBackend

    try:
        from triton._C.libtriton import native_specialize_impl  # 3.5 and later

        return lambda a: native_specialize_impl(BaseBackend, a, False, True, True)
    except ImportError:
        pass
    from triton.runtime.jit import create_specialize_impl

    extra = BaseBackend.get_arg_specialization
    try:
        impl = create_specialize_impl(extra)  # 3.4
        return lambda a: impl(a, False, True, True)
    except TypeError:  # 3.3
        impl = create_specialize_impl()
        return lambda a: impl(a, extra, False, True, True)


class record_variants:
    """Context manager collecting the `Launch.variant_key` of every Triton launch inside it:
    ``with record_variants() as seen: ...; len(seen)`` is the number of distinct compiled variants the
    block needed. Used by the tests to bound recompilation (no data-dependent constexpr)."""

    def __enter__(self) -> set:
        self.seen: set = set()
        _RECORDERS.append(self.seen)
        return self.seen

    def __exit__(self, *exc) -> None:
        _RECORDERS.remove(self.seen)


def tf32_enabled() -> bool:
    """torch's choice for fp32 CUDA matmuls: True when they may use TF32 tensor cores (the
    `torch.backends.cuda.matmul.fp32_precision = "tf32"` setting of torch >= 2.9, or the older
    `allow_tf32` flag). The Triton encoder follows it so that both backends select the same latents."""
    prec = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if prec in ("tf32", "ieee"):
        return prec == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)
