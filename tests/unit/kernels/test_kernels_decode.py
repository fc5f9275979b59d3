"""Sparse TopK decode kernel (torch path and Triton) against an independent dense oracle: a one-hot
code matrix Z [B, n] times W_dec, in float64. Without Triton: tests/integration/kernels/test_kernels_import.py.

backend="triton" runs on the `kernel_device` fixture's device (conftest.py, tests/_kernel_tol.py): the
compiled kernels on CUDA tensors when torch sees a CUDA device, else Triton's interpreter
(TRITON_INTERPRET=1) on CPU tensors; the oracle is computed on the same device. backend="torch" and
input-validation tests stay on CPU.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from _kernel_tol import choose_kernel_device, kernel_tol, requires_cuda

import sae_dist.kernels.sparse_decode as sd
from sae_dist.kernels._common import resolve_backend
from sae_dist.kernels.sparse_decode import sparse_decode


def dense_oracle(values, indices, W_dec, b_dec, grad_out):
    """x = onehot-code @ W_dec + b_dec in float64 and its gradients by autograd (dense)."""
    v = values.detach().double().requires_grad_()
    W = W_dec.detach().double().requires_grad_()
    b = b_dec.detach().double().requires_grad_()
    onehot = torch.nn.functional.one_hot(indices, W.shape[0]).double()  # [B, k, n]
    Z = (onehot * v[..., None]).sum(1)  # [B, n], repeated indices add up
    x = Z @ W + b
    x.backward(grad_out.double())
    return x.detach(), v.grad, W.grad, b.grad


@pytest.fixture
def poison(monkeypatch):
    """Every Triton output buffer starts as NaN, so an element the kernels forget to write shows up."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(sd, "_empty", nan_empty)


def make_case(kind, dtype, g):
    B, k, n, d = 20, 10, 37, 72  # B, k, d cross the 16, 8, 64 tiles; n is not a multiple of anything
    if kind == "k1":
        k = 1
    if kind == "small_d":
        B, n, d = 7, 11, 40
    if kind == "repeats":
        # few latents: repeats across rows; and force repeats within a row
        n = 6
    idx = torch.randint(0, n, (B, k), generator=g)
    if kind == "repeats":
        idx[:, 1] = idx[:, 0]
        idx[3] = 2
    vals = torch.rand(B, k, generator=g) * 2
    if kind == "zeros":
        vals[vals < 0.8] = 0.0
        vals[0] = 0.0
    W = torch.randn(n, d, generator=g)
    b = torch.randn(d, generator=g)
    go = torch.randn(B, d, generator=g)
    return vals.to(dtype), idx, W.to(dtype), b.to(dtype), go.to(dtype)


def run_decode(vals, idx, W, b, go, backend, deterministic=False):
    v = vals.clone().requires_grad_()
    Wr = W.clone().requires_grad_()
    br = b.clone().requires_grad_()
    x = sparse_decode(v, idx, Wr, br, backend=backend, deterministic=deterministic)
    gv, gW, gb = torch.autograd.grad(x, (v, Wr, br), go)
    return x, gv, gW, gb


def _on(dev, *ts):
    return [t.to(dev) for t in ts]


def _dev(backend, kernel_device):
    """backend="triton" runs on the kernel tests' device; the torch path's tests stay on CPU."""
    return kernel_device if backend == "triton" else torch.device("cpu")


def _assert_close_scaled(got, ref, dtype, dev, name):
    """Each output against the fp64 oracle, atol relative to the oracle's magnitude: fp32 1e-5,
    bf16 2e-2 (raised to the CUDA floors of tests/_kernel_tol.py on a GPU)."""
    for nm, a, r in zip(name, got, ref, strict=True):
        assert a.shape == r.shape, nm
        assert torch.isfinite(a).all(), f"{nm} has non-finite entries (unwritten output?)"
        scale = r.abs().max().item() + 1.0
        t = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(a.double(), r, **kernel_tol(dev, dtype, t, t * scale, scale=scale), msg=nm)


@pytest.mark.parametrize("kind", ["general", "k1", "small_d", "repeats", "zeros"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend,det", [("torch", False), ("triton", False), ("triton", True)])
def test_decode_matches_dense_oracle(kind, dtype, backend, det, poison, kernel_device):
    dev = _dev(backend, kernel_device)
    g = torch.Generator().manual_seed(zlib.crc32(f"{kind}{dtype}{backend}{det}".encode()))
    vals, idx, W, b, go = _on(dev, *make_case(kind, dtype, g))
    got = run_decode(vals, idx, W, b, go, backend, det)
    ref = dense_oracle(vals, idx, W, b, go)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == dtype
    _assert_close_scaled(got, ref, dtype, dev, ["x_hat", "grad_values", "grad_W_dec", "grad_b_dec"])
    # Rows of W_dec never selected get exactly zero gradient.
    unused = torch.ones(W.shape[0], dtype=torch.bool, device=dev)
    unused[idx.reshape(-1)] = False
    assert (got[2][unused] == 0).all()


def test_deterministic_grads_bit_identical(poison, kernel_device):
    g = torch.Generator().manual_seed(7)
    vals, idx, W, b, go = _on(kernel_device, *make_case("repeats", torch.float32, g))
    a = run_decode(vals, idx, W, b, go, "triton", deterministic=True)
    c = run_decode(vals, idx, W, b, go, "triton", deterministic=True)
    for x, y in zip(a, c, strict=True):
        assert torch.equal(x, y)
    # and it sums in sorted-pair order, which matches the oracle
    ref = dense_oracle(vals, idx, W, b, go)
    torch.testing.assert_close(a[2].double(), ref[2], **kernel_tol(kernel_device, torch.float32, 1e-5, 1e-5))


def test_no_b_dec_and_partial_grads(kernel_device):
    g = torch.Generator().manual_seed(3)
    case = make_case("general", torch.float32, g)
    for backend in ("torch", "triton"):
        dev = _dev(backend, kernel_device)
        vals, idx, W, b, go = _on(dev, *case)
        Wr = W.clone().requires_grad_()
        x = sparse_decode(vals, idx, Wr, None, backend=backend)  # values need no grad
        (gW,) = torch.autograd.grad(x, (Wr,), go)
        ref = dense_oracle(vals, idx, W, torch.zeros_like(b), go)
        torch.testing.assert_close(x.double(), ref[0], **kernel_tol(dev, torch.float32, 1e-5, 1e-4))
        torch.testing.assert_close(gW.double(), ref[2], **kernel_tol(dev, torch.float32, 1e-5, 1e-4))


def test_bad_inputs_raise_clear_errors():
    W = torch.randn(10, 8)
    v = torch.rand(4, 3)
    i = torch.randint(0, 10, (4, 3))
    with pytest.raises(ValueError, match="d_sae=10"):
        sparse_decode(v, torch.full((4, 3), 10), W)
    with pytest.raises(ValueError, match=r"\[B, k\]"):
        sparse_decode(v, i[:, :2], W)
    with pytest.raises(ValueError, match="int64"):
        sparse_decode(v, i.float(), W)
    with pytest.raises(ValueError, match="b_dec"):
        sparse_decode(v, i, W, torch.zeros(7))
    with pytest.raises(ValueError, match="backend"):
        sparse_decode(v, i, W, backend="cuda")


def test_auto_backend_on_cpu_is_torch(monkeypatch):
    W = torch.randn(10, 8)
    assert resolve_backend("auto", W) == "torch"

    def boom(*a, **k):
        raise AssertionError("Triton path used for CPU tensors with backend='auto'")

    monkeypatch.setattr(sd._SparseDecodeTriton, "apply", boom)
    v, i = torch.rand(4, 3), torch.randint(0, 10, (4, 3))
    x = sparse_decode(v, i, W)
    torch.testing.assert_close(x, (torch.nn.functional.one_hot(i, 10).float() * v[..., None]).sum(1) @ W)


def test_global_deterministic_switch_selects_sorted_path(monkeypatch, kernel_device):
    seen = []
    real = sd.triton_grad_wdec
    monkeypatch.setattr(sd, "triton_grad_wdec", lambda *a: seen.append(a[-1]) or real(*a))
    g = torch.Generator().manual_seed(29)
    vals, idx, W, b, go = _on(kernel_device, *make_case("small_d", torch.float32, g))
    run_decode(vals, idx, W, b, go, "triton")
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = run_decode(vals, idx, W, b, go, "triton")
    finally:
        torch.use_deterministic_algorithms(prev)
    assert seen == [False, True]
    torch.testing.assert_close(got[2].double(), dense_oracle(vals, idx, W, b, go)[2],
                               **kernel_tol(kernel_device, torch.float32, 1e-5, 1e-5))


@pytest.mark.parametrize("backend,det", [("torch", False), ("triton", False), ("triton", True)])
def test_padding_index_minus_one_is_ignored(backend, det, poison, kernel_device):
    """-1 marks "no latent" (the encoder pads AuxK candidates with it): the value is ignored and gets
    zero gradient; the oracle drops those entries."""
    dev = _dev(backend, kernel_device)
    g = torch.Generator().manual_seed(zlib.crc32(f"pad{backend}{det}".encode()))
    vals, idx, W, b, go = make_case("general", torch.float32, g)
    pad = torch.rand(idx.shape, generator=g) < 0.3
    pad[0] = True  # a token with no latent at all
    idx = idx.masked_fill(pad, -1)
    vals, idx, W, b, go, pad = _on(dev, vals, idx, W, b, go, pad)
    tol = kernel_tol(dev, torch.float32, 1e-5, 1e-5)
    got = run_decode(vals, idx, W, b, go, backend, det)
    ref = dense_oracle(vals.masked_fill(pad, 0.0), idx.clamp_min(0), W, b, go)
    torch.testing.assert_close(got[0].double(), ref[0], **tol)
    assert (got[1][pad] == 0).all()
    torch.testing.assert_close(got[1][~pad].double(), ref[1][~pad], **tol)
    torch.testing.assert_close(got[2].double(), ref[2], **tol)
    if dev.type == "cpu":  # on CUDA the index range is not checked (no host sync; the kernels mask it)
        with pytest.raises(ValueError, match="-1 for padding"):
            sparse_decode(vals, idx.masked_fill(pad, -2), W, b, backend=backend)


def scatter_oracle(values, indices, W_dec, b_dec, grad_out):
    """`dense_oracle` for shapes where the one-hot [B, k, n] does not fit: Z [B, n] by scatter_add
    (repeats add up; index -1 dropped), in float64, gradients by autograd."""
    v = values.detach().double().requires_grad_()
    W = W_dec.detach().double().requires_grad_()
    b = b_dec.detach().double().requires_grad_()
    keep = indices >= 0
    Z = torch.zeros(v.shape[0], W.shape[0], dtype=torch.float64, device=v.device)
    Z = Z.scatter_add(1, indices.clamp_min(0), torch.where(keep, v, torch.zeros_like(v)))
    x = Z @ W + b
    x.backward(grad_out.double())
    return x.detach(), v.grad, W.grad, b.grad


# (B, k, n, d, pad_frac): "small" runs everywhere; the large one (many token blocks, a big k with
# repeats within rows, 12 BLOCK_D column blocks, ~32 codes per W_dec row for the atomics) on CUDA only.
LARGE_DECODE = [
    pytest.param((16, 8, 30, 40, 0.1), id="small"),
    pytest.param((4096, 512, 65536, 768, 0.05), id="B4096-k512-n65536-d768", marks=requires_cuda),
]


@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", LARGE_DECODE)
def test_triton_decode_against_fp64_oracle(shape, dtype, det, poison, kernel_device):
    """Forward and all gradients of the Triton decode against an fp64 oracle at scale, with -1
    padding; the deterministic path also bit-identical across two runs."""
    dev = kernel_device
    B, k, n, d, pad_frac = shape
    g = torch.Generator().manual_seed(zlib.crc32(f"large{shape}{dtype}{det}".encode()))
    idx = torch.randint(0, n, (B, k), generator=g)
    idx = idx.masked_fill(torch.rand(B, k, generator=g) < pad_frac, -1)
    vals = torch.rand(B, k, generator=g) * 2
    W = torch.randn(n, d, generator=g) / d**0.5
    b = torch.randn(d, generator=g)
    go = torch.randn(B, d, generator=g)
    vals, W, b, go = (t.to(dtype) for t in (vals, W, b, go))
    vals, idx, W, b, go = _on(dev, vals, idx, W, b, go)
    got = run_decode(vals, idx, W, b, go, "triton", det)
    assert all(t.dtype == dtype for t in got[:3])
    ref = scatter_oracle(vals, idx, W, b, go)
    _assert_close_scaled(got, ref, dtype, dev, ["x_hat", "grad_values", "grad_W_dec", "grad_b_dec"])
    assert (got[1][idx < 0] == 0).all(), "padding entries must get zero gradient"
    if det:
        again = run_decode(vals, idx, W, b, go, "triton", det)
        for a, c in zip(got, again, strict=True):
            assert torch.equal(a, c)


def test_kernel_device_is_chosen_once_from_torch_cuda(kernel_device, monkeypatch):
    """The kernel tests' device: CUDA (compiled kernels) exactly when torch.cuda.is_available(), else
    CPU under Triton's interpreter; and the rule itself (`choose_kernel_device`, which conftest.py runs
    at startup) with torch.cuda.is_available patched both ways."""
    from sae_dist.kernels._common import interpret_mode

    cuda = torch.cuda.is_available()
    assert kernel_device == torch.device("cuda" if cuda else "cpu")
    assert interpret_mode() is (not cuda)
    # the kernels this session defined are interpreted exactly when the device is the CPU
    from triton.runtime.interpreter import InterpretedFunction

    fwd = sd._kernels()[1]
    assert isinstance(fwd, InterpretedFunction) is (not cuda), type(fwd)
    for available, device, env_after in ((True, "cuda", {}), (False, "cpu", {"TRITON_INTERPRET": "1"})):
        monkeypatch.setattr(torch.cuda, "is_available", lambda a=available: a)
        for env in ({}, {"TRITON_INTERPRET": "1"}, {"TRITON_INTERPRET": "0"}):
            assert choose_kernel_device(env) == torch.device(device)
            assert env == env_after, (available, env)


def test_csr_offsets_count_the_rows_below_each_without_a_host_sync(kernel_device):
    """`csr_offsets` (the deterministic W_dec gradient's and the encoder's CSR W_enc gradient's row offsets)
    equals the cumulative bincount of the rows it replaced, sentinel rows >= n_rows left out and rows without
    entries included; on CUDA it runs under torch's sync debug mode "error" (bincount reads min and max on the
    host, which that mode raises for)."""
    from sae_dist.kernels._common import csr_offsets

    g = torch.Generator().manual_seed(0)
    n = 50
    for numel in (0, 1, 7, 400):
        rows = torch.randint(0, n + 1, (numel,), generator=g)  # row n: the padding sentinel
        sorted_rows = rows.sort().values.to(kernel_device)
        want = torch.zeros(n + 1, dtype=torch.int64)
        want[1:] = torch.cumsum(torch.bincount(rows, minlength=n + 1)[:n], 0)
        if sorted_rows.is_cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            got = csr_offsets(sorted_rows, n)
        finally:
            if sorted_rows.is_cuda:
                torch.cuda.set_sync_debug_mode("default")
        assert got.dtype == torch.int64 and torch.equal(got.cpu(), want), numel
