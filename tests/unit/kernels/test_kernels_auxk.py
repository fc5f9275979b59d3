"""AuxK loss kernel (torch path and Triton) against a dense float64 oracle written here: one-hot code
matrix @ W_dec, then sum ||e - e^||^2 / sum ||e - mean(e)||^2.

The Triton path runs on the `kernel_device` fixture's device (conftest.py, tests/_kernel_tol.py): the
compiled kernels on CUDA tensors when torch sees a CUDA device, else Triton's interpreter
(TRITON_INTERPRET=1) on CPU tensors. The torch paths and input-validation tests stay on CPU.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from _kernel_tol import kernel_tol, requires_cuda

import sae_dist.kernels._common as kc
import sae_dist.kernels.sparse_decode as ak
import sae_dist.kernels.sparse_decode as sd
from sae_dist.kernels.sparse_decode import auxk_loss, auxk_loss_reference


def oracle(values, indices, W_dec, residual):
    v = values.detach().double().requires_grad_()
    W = W_dec.detach().double().requires_grad_()
    e = residual.detach().double()
    Z = (torch.nn.functional.one_hot(indices, W.shape[0]).double() * v[..., None]).sum(1)
    e_hat = Z @ W
    loss = ((e - e_hat) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    gv, gW = torch.autograd.grad(loss, (v, W))
    return loss.detach(), gv, gW


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setattr(
        sd, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    )


# The torch path has two decodes (embedding_bag, or dense over the distinct aux rows): test both.
PATHS = [("torch", 0), ("torch", 10**6), ("triton", 0)]
PATH_IDS = ["torch-sparse", "torch-dense-rows", "triton"]


def use_path(monkeypatch, path):
    backend, factor = path
    monkeypatch.setattr(kc, "DENSE_ROWS_FACTOR", factor)
    return backend


def _dev(backend, kernel_device):
    """backend="triton" runs on the kernel tests' device; the torch paths stay on CPU."""
    return kernel_device if backend == "triton" else torch.device("cpu")


def _on(dev, *ts):
    return [t.to(dev) for t in ts]


def make(B, k_aux, n, d, dtype, g, repeats=False):
    idx = torch.randint(0, n, (B, k_aux), generator=g)
    if repeats and k_aux > 1:
        idx[:, -1] = idx[:, 0]
    vals = torch.relu(torch.randn(B, k_aux, generator=g))  # ReLU'd: some exact zeros
    W = torch.randn(n, d, generator=g) / d**0.5
    res = torch.randn(B, d, generator=g)
    return vals.to(dtype), idx, W.to(dtype), res


@pytest.mark.parametrize("shape", [(20, 6, 37, 72, False), (9, 1, 50, 40, False), (16, 8, 5, 33, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_auxk_matches_dense_oracle(shape, dtype, path, poison, monkeypatch, kernel_device):
    backend = use_path(monkeypatch, path)
    dev = _dev(backend, kernel_device)
    B, k_aux, n, d, rep = shape
    g = torch.Generator().manual_seed(zlib.crc32(f"{shape}{dtype}{path}".encode()))
    vals, idx, W, res = _on(dev, *make(B, k_aux, n, d, dtype, g, rep))
    v = vals.clone().requires_grad_()
    Wr = W.clone().requires_grad_()
    r = res.clone().requires_grad_()  # must NOT receive a gradient
    loss = auxk_loss(v, idx, Wr, r, backend=backend)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    loss.backward()
    ref_loss, ref_gv, ref_gW = oracle(vals, idx, W, res)
    assert r.grad is None
    _assert_loss_and_grads(loss, v.grad, Wr.grad, (ref_loss, ref_gv, ref_gW), dtype, dev)


def _assert_loss_and_grads(loss, gv, gW, ref, dtype, dev):
    """Loss and gradients against the fp64 oracle: fp32 1e-5, bf16 2e-2 (atol relative to each
    gradient's magnitude), raised to the CUDA floors of tests/_kernel_tol.py on a GPU."""
    ref_loss, ref_gv, ref_gW = ref
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss.double(), ref_loss, **kernel_tol(dev, dtype, tol, tol))
    for name, a, b in (("grad aux_values", gv, ref_gv), ("grad W_dec", gW, ref_gW)):
        assert torch.isfinite(a).all(), name
        scale = b.abs().max().item()
        torch.testing.assert_close(a.double(), b, **kernel_tol(dev, dtype, tol, tol * scale, scale=scale), msg=name)


def test_reference_equals_dispatch_on_cpu(monkeypatch):
    g = torch.Generator().manual_seed(11)
    vals, idx, W, res = make(12, 4, 30, 24, torch.float32, g)
    calls = []
    real = ak._decode_aux_torch
    monkeypatch.setattr(ak, "_decode_aux_torch", lambda *a: calls.append(1) or real(*a))
    a = auxk_loss(vals, idx, W, res)  # auto on CPU = torch path
    assert calls, "backend='auto' on CPU did not take the torch path"
    b = auxk_loss_reference(vals, idx, W, res)
    ref = oracle(vals, idx, W, res)[0]
    torch.testing.assert_close(a.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_nan_and_inf_become_zero_with_finite_grads(path, monkeypatch, kernel_device):
    backend = use_path(monkeypatch, path)
    dev = _dev(backend, kernel_device)
    g = torch.Generator().manual_seed(5)
    vals, idx, W, _ = _on(dev, *make(8, 3, 20, 16, torch.float32, g))
    # zero-variance residual (every row the same): denominator 0 -> inf -> 0
    const = torch.randn(1, 16, generator=g).expand(8, 16).contiguous().to(dev)
    # all-zero residual and all-zero aux values: 0 / 0 = NaN -> 0
    for res, v0 in ((const, vals), (torch.zeros(8, 16, device=dev), torch.zeros_like(vals))):
        v = v0.clone().requires_grad_()
        Wr = W.clone().requires_grad_()
        raw = ((res - 0) ** 2).sum() / ((res - res.mean(0)) ** 2).sum()
        assert not torch.isfinite(raw)  # the case really is degenerate
        loss = auxk_loss(v, idx, Wr, res, backend=backend)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.isfinite(v.grad).all() and torch.isfinite(Wr.grad).all()
        assert (v.grad == 0).all() and (Wr.grad == 0).all()


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_empty_aux_gives_differentiable_zero(path, monkeypatch, kernel_device):
    backend = use_path(monkeypatch, path)
    dev = _dev(backend, kernel_device)
    W = torch.randn(10, 8).to(dev).requires_grad_(True)
    res = torch.randn(4, 8).to(dev)
    for vals, idx in ((None, None), (torch.zeros(4, 0, device=dev), torch.zeros(4, 0, dtype=torch.long, device=dev))):
        W.grad = None
        loss = auxk_loss(vals, idx, W, res, backend=backend)
        assert loss.dim() == 0 and loss.dtype == torch.float32 and loss.item() == 0.0
        loss.backward()  # works on its own
        assert W.grad is None or (W.grad == 0).all()
        # and summed into a main loss
        main = (W**2).sum()
        W.grad = None
        (main + 0.5 * auxk_loss(vals, idx, W, res, backend=backend)).backward()
        torch.testing.assert_close(W.grad, 2 * W.detach())


def test_bad_inputs():
    W = torch.randn(10, 8)
    with pytest.raises(ValueError, match="residual"):
        auxk_loss(torch.rand(4, 2), torch.zeros(4, 2, dtype=torch.long), W, torch.randn(4, 7))
    with pytest.raises(ValueError, match="both"):
        auxk_loss(torch.rand(4, 2), None, W, torch.randn(4, 8))
    with pytest.raises(ValueError, match="B=3"):
        auxk_loss(torch.rand(4, 2), torch.zeros(4, 2, dtype=torch.long), W, torch.randn(3, 8))
    with pytest.raises(ValueError, match="aux_indices"):
        auxk_loss(torch.rand(4, 2), torch.full((4, 2), 12), W, torch.randn(4, 8))


def test_triton_deterministic_bit_identical_and_correct(poison, kernel_device):
    g = torch.Generator().manual_seed(23)
    vals, idx, W, res = _on(kernel_device, *make(20, 6, 9, 72, torch.float32, g, repeats=True))
    outs = []
    for _ in range(2):
        v = vals.clone().requires_grad_()
        Wr = W.clone().requires_grad_()
        loss = auxk_loss(v, idx, Wr, res, backend="triton", deterministic=True)
        loss.backward()
        outs.append((loss.detach(), v.grad, Wr.grad))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)
    ref = oracle(vals, idx, W, res)
    for a, b in zip(outs[0], ref, strict=True):
        torch.testing.assert_close(a.double(), b, **kernel_tol(kernel_device, torch.float32, 1e-5, 1e-6))


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_padding_index_minus_one_is_ignored(path, monkeypatch, poison, kernel_device):
    backend = use_path(monkeypatch, path)
    dev = _dev(backend, kernel_device)
    g = torch.Generator().manual_seed(zlib.crc32(f"auxpad{path}".encode()))
    vals, idx, W, res = make(20, 6, 37, 72, torch.float32, g)
    vals = vals + 0.5  # padded entries carry a non-zero value that must be ignored
    pad = torch.rand(idx.shape, generator=g) < 0.3
    idx = idx.masked_fill(pad, -1)
    vals, idx, W, res, pad = _on(dev, vals, idx, W, res, pad)
    v = vals.clone().requires_grad_()
    Wr = W.clone().requires_grad_()
    loss = auxk_loss(v, idx, Wr, res, backend=backend)
    loss.backward()
    ref_loss, ref_gv, ref_gW = oracle(vals.masked_fill(pad, 0.0), idx.clamp_min(0), W, res)
    tol = kernel_tol(dev, torch.float32, 1e-5, 1e-6)
    torch.testing.assert_close(loss.double(), ref_loss, **tol)
    assert (v.grad[pad] == 0).all()
    torch.testing.assert_close(v.grad[~pad].double(), ref_gv[~pad], **tol)
    torch.testing.assert_close(Wr.grad.double(), ref_gW, **tol)


def test_sparse_grad_sums_into_a_dense_decoder_gradient(monkeypatch):
    """sparse_grad=True (the SAE's training path): with another loss giving W_dec a dense gradient in
    the same backward, W_dec.grad is dense and equals the plain dense-rows path's gradient."""
    monkeypatch.setattr(kc, "DENSE_ROWS_FACTOR", 10**6)  # force the dense-rows decode
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    vals, idx, W, res = make(16, 5, 40, 12, torch.float32, g)
    grads = []
    for sparse in (True, False):
        Wp = W.clone().requires_grad_(True)
        v = vals.clone().requires_grad_(True)
        main = (Wp.sum(0) ** 2).sum()  # any loss with a dense W_dec gradient
        (main + auxk_loss(v, idx, Wp, res, sparse_grad=sparse)).backward()
        assert Wp.grad.layout == torch.strided
        grads.append((Wp.grad, v.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def scatter_oracle(values, indices, W_dec, residual):
    """`oracle` for shapes where the one-hot [B, k_aux, n] does not fit: the code matrix [B, n] by
    scatter_add (repeats add up, index -1 dropped), in float64."""
    v = values.detach().double().requires_grad_()
    W = W_dec.detach().double().requires_grad_()
    e = residual.detach().double()
    keep = indices >= 0
    Z = torch.zeros(v.shape[0], W.shape[0], dtype=torch.float64, device=v.device)
    Z = Z.scatter_add(1, indices.clamp_min(0), torch.where(keep, v, torch.zeros_like(v)))
    loss = ((e - Z @ W) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    gv, gW = torch.autograd.grad(loss, (v, W))
    return loss.detach(), gv, gW


# (B, k_aux, n, d, dead latents the codes are drawn from): "small" runs everywhere; the large one
# (k_aux 2048 as at d_in 4096, every code among 3,277 dead latents: ~2,500 atomic adds per W_dec row)
# on CUDA only.
LARGE_AUXK = [
    pytest.param((24, 16, 60, 40, 12), id="small"),
    pytest.param((4096, 2048, 65536, 768, 3277), id="B4096-kaux2048-n65536-d768", marks=requires_cuda),
]


@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", LARGE_AUXK)
def test_triton_auxk_against_fp64_oracle(shape, dtype, det, poison, kernel_device):
    """The Triton AuxK loss and its gradients against an fp64 oracle at scale, with -1 padding (fewer
    dead latents than k_aux in some rows); the deterministic path also bit-identical across two runs."""
    dev = kernel_device
    B, k_aux, n, d, n_dead = shape
    g = torch.Generator().manual_seed(zlib.crc32(f"auxlarge{shape}{dtype}{det}".encode()))
    dead = torch.randperm(n, generator=g)[:n_dead]
    idx = dead[torch.randint(0, n_dead, (B, k_aux), generator=g)]
    idx = idx.masked_fill(torch.rand(B, k_aux, generator=g) < 0.05, -1)
    vals = torch.relu(torch.randn(B, k_aux, generator=g)).to(dtype)
    W = (torch.randn(n, d, generator=g) / d**0.5).to(dtype)
    res = torch.randn(B, d, generator=g)
    vals, idx, W, res = _on(dev, vals, idx, W, res)
    outs = []
    for _ in range(2 if det else 1):
        v = vals.clone().requires_grad_()
        Wr = W.clone().requires_grad_()
        loss = auxk_loss(v, idx, Wr, res, backend="triton", deterministic=det)
        loss.backward()
        outs.append((loss.detach(), v.grad, Wr.grad))
    loss, gv, gW = outs[0]
    assert loss.dim() == 0 and loss.dtype == torch.float32 and gv.dtype == gW.dtype == dtype
    assert (gv[idx < 0] == 0).all(), "padding entries must get zero gradient"
    _assert_loss_and_grads(loss, gv, gW, scatter_oracle(vals, idx, W, res), dtype, dev)
    if det:
        for a, b in zip(*outs, strict=True):
            assert torch.equal(a, b)
