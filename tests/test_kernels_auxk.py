"""AuxK loss kernel (torch path and Triton through TRITON_INTERPRET=1) against a dense float64 oracle
written here: one-hot code matrix @ W_dec, then sum ||e - e^||^2 / sum ||e - mean(e)||^2."""

from __future__ import annotations

import zlib

import pytest
import torch

import sae_dist.kernels._common as kc
import sae_dist.kernels.auxk as ak
import sae_dist.kernels.sparse_decode as sd
from sae_dist.kernels.auxk import auxk_loss, auxk_loss_reference


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
def test_auxk_matches_dense_oracle(shape, dtype, path, poison, monkeypatch):
    backend = use_path(monkeypatch, path)
    B, k_aux, n, d, rep = shape
    g = torch.Generator().manual_seed(zlib.crc32(f"{shape}{dtype}{path}".encode()))
    vals, idx, W, res = make(B, k_aux, n, d, dtype, g, rep)
    v = vals.clone().requires_grad_()
    Wr = W.clone().requires_grad_()
    r = res.clone().requires_grad_()  # must NOT receive a gradient
    loss = auxk_loss(v, idx, Wr, r, backend=backend)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    loss.backward()
    ref_loss, ref_gv, ref_gW = oracle(vals, idx, W, res)
    assert r.grad is None
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss.double(), ref_loss, rtol=tol, atol=tol)
    for name, a, b in (("grad aux_values", v.grad, ref_gv), ("grad W_dec", Wr.grad, ref_gW)):
        assert torch.isfinite(a).all(), name
        scale = b.abs().max().item()
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * scale, msg=name)


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
def test_nan_and_inf_become_zero_with_finite_grads(path, monkeypatch):
    backend = use_path(monkeypatch, path)
    g = torch.Generator().manual_seed(5)
    vals, idx, W, _ = make(8, 3, 20, 16, torch.float32, g)
    # zero-variance residual (every row the same): denominator 0 -> inf -> 0
    const = torch.randn(1, 16, generator=g).expand(8, 16).contiguous()
    # all-zero residual and all-zero aux values: 0 / 0 = NaN -> 0
    for res, v0 in ((const, vals), (torch.zeros(8, 16), torch.zeros_like(vals))):
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
def test_empty_aux_gives_differentiable_zero(path, monkeypatch):
    backend = use_path(monkeypatch, path)
    W = torch.randn(10, 8, requires_grad=True)
    res = torch.randn(4, 8)
    for vals, idx in ((None, None), (torch.zeros(4, 0), torch.zeros(4, 0, dtype=torch.long))):
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


def test_triton_deterministic_bit_identical_and_correct(poison):
    g = torch.Generator().manual_seed(23)
    vals, idx, W, res = make(20, 6, 9, 72, torch.float32, g, repeats=True)
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
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_padding_index_minus_one_is_ignored(path, monkeypatch, poison):
    backend = use_path(monkeypatch, path)
    g = torch.Generator().manual_seed(zlib.crc32(f"auxpad{path}".encode()))
    vals, idx, W, res = make(20, 6, 37, 72, torch.float32, g)
    vals = vals + 0.5  # padded entries carry a non-zero value that must be ignored
    pad = torch.rand(idx.shape, generator=g) < 0.3
    idx = idx.masked_fill(pad, -1)
    v = vals.clone().requires_grad_()
    Wr = W.clone().requires_grad_()
    loss = auxk_loss(v, idx, Wr, res, backend=backend)
    loss.backward()
    ref_loss, ref_gv, ref_gW = oracle(vals.masked_fill(pad, 0.0), idx.clamp_min(0), W, res)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    assert (v.grad[pad] == 0).all()
    torch.testing.assert_close(v.grad[~pad].double(), ref_gv[~pad], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(Wr.grad.double(), ref_gW, rtol=1e-5, atol=1e-6)


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
