"""Device and tolerances of the kernel tests (tests/unit/kernels/).

Device: decided once, by `choose_kernel_device`, which conftest.py calls when pytest loads it (before
any test module imports Triton or sae_dist.kernels: `triton.jit` reads TRITON_INTERPRET when a kernel
is defined). With a CUDA device (torch.cuda.is_available(), so CUDA_VISIBLE_DEVICES="" counts as none)
the kernel tests build their tensors on CUDA and run the compiled kernels; TRITON_INTERPRET is removed
from the environment so that the GPU run really checks compiled code (to run the interpreter on a GPU
machine, hide the GPUs). Without one they run on CPU tensors through Triton's interpreter
(TRITON_INTERPRET=1). Tests receive the device through conftest's `kernel_device` fixture.

Tolerances: on CPU every test keeps its own, unchanged (`kernel_tol` returns them as given). The
interpreter upcasts 16-bit tiles to fp32 and computes IEEE fp32 dots, so the CPU numbers can be tight.
A GPU does neither: bf16 dots run on tensor cores (exact products, fp32 accumulation in another
order), fp32 dots run as TF32 when torch's matmul setting allows it. On CUDA `kernel_tol` therefore
raises each (rtol, atol) to at least a floor per dtype (`CUDA_FLOOR`), and TopK selections are compared
by `assert_topk_selection`, which allows the kernel to pick a different latent than the oracle only
where the two pre-activations are within a tolerance of each other (a near-tie).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

import pytest
import torch


def choose_kernel_device(environ: MutableMapping[str, str] = os.environ) -> torch.device:
    """The device of the kernel tests: CUDA when torch.cuda.is_available(), else CPU. Sets
    TRITON_INTERPRET=1 in `environ` for CPU and removes it for CUDA (compiled kernels)."""
    if torch.cuda.is_available():
        environ.pop("TRITON_INTERPRET", None)
        return torch.device("cuda")
    environ["TRITON_INTERPRET"] = "1"  # before anything imports Triton (its settings are read at import)
    _check_interpreter_numpy()
    return torch.device("cpu")


def _check_interpreter_numpy() -> None:
    """Triton's interpreter before 3.7 turns a one-element array into an int with `int()`, which NumPy 2.4
    refuses: under it most kernel tests would fail with "only 0-dimensional arrays can be converted to Python
    scalars" (measured with triton 3.6.0 and numpy 2.4.6; docs/benchmarks.md, "Triton releases"). Say so once."""
    import re

    try:
        import numpy
        import triton
    except ImportError:
        return
    tri, npy = (tuple(int(p) for p in re.findall(r"\d+", v)[:2]) for v in (triton.__version__, numpy.__version__))
    if tri < (3, 7) and npy >= (2, 4):
        raise pytest.UsageError(
            f"triton {triton.__version__}'s CPU interpreter cannot run the kernel tests with numpy "
            f"{numpy.__version__}: install triton>=3.7 or numpy<2.4 (the tested set: `make install`)")


requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="large shape: compiled Triton kernels on a CUDA device only (too slow for the CPU interpreter)",
)

# (rtol, atol) floors on CUDA, for quantities of order 1 (tests scale atol by the oracle's magnitude
# where it is not). Measured on CPU by emulating the GPU's arithmetic at B=512, d=768, n=65536 against
# an fp64 oracle (unit-variance pre-activations): largest |error| of a pre-activation
#   fp32, IEEE dots (TF32 off): 2.4e-6 (summation order and FMA only)               -> floor 1e-5
#   fp32, TF32 dots (operands truncated to a 10-bit mantissa): 4.2e-3 (std 7.8e-4)   -> floor 1e-2 / 2e-2
#   bf16 (exact products, fp32 accumulation; x - b_dec rounded to bf16): 9.8e-3, and
#        bf16 outputs add half an ulp (2^-9 relative; 0.016 at values in [4, 8))     -> floor 2e-2
# The bf16 floor is the budget the CPU bf16 tests already use.
CUDA_FLOOR = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (1e-2, 1e-2),
    torch.float64: (1e-7, 1e-7),
}
TF32_FLOOR = (1e-2, 2e-2)

# Near-tie window (absolute, for unit-scale pre-activations) of `assert_topk_selection`: how far below
# the oracle's k-th largest pre-activation a latent the kernel chose may lie: at least 5x the largest
# error measured above (fp32 on CUDA: 40x); the existing CPU bf16 test uses 0.05.
SELECT_ATOL = {
    ("cpu", torch.float32): 1e-5,
    ("cpu", torch.bfloat16): 5e-2,
    ("cuda", torch.float32): 1e-4,
    ("cuda", torch.bfloat16): 5e-2,
}
TF32_SELECT_ATOL = 2e-2

_TORCH_DEFAULT = {  # torch.testing.assert_close's defaults
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
}


def tf32_on() -> bool:
    """Whether fp32 CUDA matmuls (torch's and the Triton encoder's) may use TF32 now."""
    return torch.get_float32_matmul_precision() != "highest"


def kernel_tol(device: torch.device, dtype: torch.dtype, rtol: float | None = None,
               atol: float | None = None, *, scale: float = 1.0) -> dict[str, float]:
    """`torch.testing.assert_close` keyword arguments for a kernel result of `dtype` on `device`.

    CPU: exactly (rtol, atol) as given, or {} (torch's defaults) when both are None: nothing is
    loosened on CPU. CUDA: each raised to at least CUDA_FLOOR[dtype] (TF32_FLOOR for fp32 while TF32
    is on), starting from torch's defaults when not given; the atol floor is multiplied by `scale`,
    the magnitude of the compared quantity (e.g. the oracle's largest entry), when that is not 1.
    """
    if rtol is None and atol is None and torch.device(device).type != "cuda":
        return {}
    if (rtol is None) != (atol is None):
        raise ValueError("give both rtol and atol, or neither")
    if torch.device(device).type != "cuda":
        return {"rtol": rtol, "atol": atol}
    if rtol is None:
        rtol, atol = _TORCH_DEFAULT.get(dtype, _TORCH_DEFAULT[torch.float32])
    f_rtol, f_atol = TF32_FLOOR if (dtype == torch.float32 and tf32_on()) else CUDA_FLOOR.get(
        dtype, CUDA_FLOOR[torch.float32])
    return {"rtol": max(rtol, f_rtol), "atol": max(atol, f_atol * scale)}


def select_atol(device: torch.device, dtype: torch.dtype) -> float:
    """Near-tie window for TopK selections of a kernel computing in `dtype` on `device`."""
    dev = torch.device(device).type
    if dev == "cuda" and dtype == torch.float32 and tf32_on():
        return TF32_SELECT_ATOL
    return SELECT_ATOL[(dev, torch.float32 if dtype == torch.float64 else dtype)]


def assert_topk_selection(values: torch.Tensor, indices: torch.Tensor, pre: torch.Tensor, *,
                          window: float, rtol: float, atol: float, mask: torch.Tensor | None = None,
                          what: str = "top-k") -> None:
    """A kernel's ReLU'd TopK selection against oracle pre-activations, robust to near-ties.

    values, indices [B, k] (any order within a row): the kernel's output. pre [B, n]: the oracle's
    pre-activations (e.g. fp64 from the same inputs). mask: optional bool [n], the latents eligible
    (AuxK: the dead ones). Checks, per row, with kth = the oracle's k-th largest eligible pre-activation:
      - the indices are distinct, in range and eligible;
      - the sorted values equal ReLU of the oracle's k largest (rtol, atol): sorted top-k values move by
        at most the largest pre-activation error, so this holds whatever near-ties are broken;
      - each index carries its value: ReLU(pre[b, index]) equals the value (rtol, atol);
      - every chosen latent has pre >= kth - window, and every eligible latent with pre > kth + window
        is chosen: the selection differs from the oracle's only among latents within `window` of kth.
    """
    B, k = indices.shape
    assert values.shape == (B, k), (what, tuple(values.shape), tuple(indices.shape))
    assert pre.shape[0] == B, (what, tuple(pre.shape))
    n = pre.shape[1]
    idx = indices.long()
    assert bool(((idx >= 0) & (idx < n)).all()), f"{what}: index out of range [0, {n})"
    srt = idx.sort(dim=1).values
    assert bool((srt[:, 1:] != srt[:, :-1]).all()), f"{what}: repeated latent in a row"
    pre = pre.double()
    if mask is not None:
        assert bool(mask[idx].all()), f"{what}: a chosen latent is not eligible (mask)"
        pre = torch.where(mask, pre, torch.full_like(pre, float("-inf")))
    if k == 0:
        return
    top = pre.topk(k, dim=1).values  # sorted descending
    got = values.double()
    torch.testing.assert_close(got.sort(dim=1, descending=True).values, top.clamp_min(0), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: sorted values differ from the oracle's\n{m}")
    chosen = pre.gather(1, idx)
    torch.testing.assert_close(chosen.clamp_min(0), got, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: an index does not carry its value\n{m}")
    kth = top[:, -1:]
    low = chosen < kth - window
    assert not bool(low.any()), (
        f"{what}: {int(low.sum())} chosen latents lie more than {window} below the oracle's k-th largest")
    picked = torch.zeros(pre.shape, dtype=torch.bool, device=pre.device).scatter_(1, idx, True)
    missed = (pre > kth + window) & ~picked
    assert not bool(missed.any()), (
        f"{what}: {int(missed.sum())} latents more than {window} above the oracle's k-th largest were not chosen")
