"""Sparse TopK decode kernel (torch path and Triton, the latter through TRITON_INTERPRET=1 on CPU)
against an independent dense oracle: a one-hot code matrix Z [B, n] times W_dec, in float64."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import torch

import sae_dist.kernels.sparse_decode as sd
from sae_dist.kernels._common import resolve_backend
from sae_dist.kernels.sparse_decode import sparse_decode


def dense_oracle(values, indices, W_dec, b_pre, grad_out):
    """x = onehot-code @ W_dec + b_pre in float64 and its gradients by autograd (dense)."""
    v = values.detach().double().requires_grad_()
    W = W_dec.detach().double().requires_grad_()
    b = b_pre.detach().double().requires_grad_()
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


@pytest.mark.parametrize("kind", ["general", "k1", "small_d", "repeats", "zeros"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend,det", [("torch", False), ("triton", False), ("triton", True)])
def test_decode_matches_dense_oracle(kind, dtype, backend, det, poison):
    g = torch.Generator().manual_seed(zlib.crc32(f"{kind}{dtype}{backend}{det}".encode()))
    vals, idx, W, b, go = make_case(kind, dtype, g)
    got = run_decode(vals, idx, W, b, go, backend, det)
    ref = dense_oracle(vals, idx, W, b, go)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == dtype
    names = ["x_hat", "grad_values", "grad_W_dec", "grad_b_pre"]
    for name, a, r in zip(names, got, ref, strict=True):
        assert a.shape == r.shape, name
        assert torch.isfinite(a).all(), f"{name} has non-finite entries (unwritten output?)"
        scale = r.abs().max().item() + 1.0
        if dtype == torch.float32:
            torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-5 * scale, msg=name)
        else:
            torch.testing.assert_close(a.double(), r, rtol=2e-2, atol=2e-2 * scale, msg=name)
    # Rows of W_dec never selected get exactly zero gradient.
    unused = torch.ones(W.shape[0], dtype=torch.bool)
    unused[idx.reshape(-1)] = False
    assert (got[2][unused] == 0).all()


def test_deterministic_grads_bit_identical(poison):
    g = torch.Generator().manual_seed(7)
    vals, idx, W, b, go = make_case("repeats", torch.float32, g)
    a = run_decode(vals, idx, W, b, go, "triton", deterministic=True)
    c = run_decode(vals, idx, W, b, go, "triton", deterministic=True)
    for x, y in zip(a, c, strict=True):
        assert torch.equal(x, y)
    # and it sums in sorted-pair order, which matches the oracle
    ref = dense_oracle(vals, idx, W, b, go)
    torch.testing.assert_close(a[2].double(), ref[2], rtol=1e-5, atol=1e-5)


def test_no_b_pre_and_partial_grads():
    g = torch.Generator().manual_seed(3)
    vals, idx, W, b, go = make_case("general", torch.float32, g)
    for backend in ("torch", "triton"):
        Wr = W.clone().requires_grad_()
        x = sparse_decode(vals, idx, Wr, None, backend=backend)  # values need no grad
        (gW,) = torch.autograd.grad(x, (Wr,), go)
        ref = dense_oracle(vals, idx, W, torch.zeros_like(b), go)
        torch.testing.assert_close(x.double(), ref[0], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(gW.double(), ref[2], rtol=1e-5, atol=1e-4)


def test_bad_inputs_raise_clear_errors():
    W = torch.randn(10, 8)
    v = torch.rand(4, 3)
    i = torch.randint(0, 10, (4, 3))
    with pytest.raises(ValueError, match="n_latents=10"):
        sparse_decode(v, torch.full((4, 3), 10), W)
    with pytest.raises(ValueError, match=r"\[B, k\]"):
        sparse_decode(v, i[:, :2], W)
    with pytest.raises(ValueError, match="int64"):
        sparse_decode(v, i.float(), W)
    with pytest.raises(ValueError, match="b_pre"):
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


def test_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from sae_dist.kernels.sparse_decode import sparse_decode\n"
        "from sae_dist.kernels.auxk import auxk_loss\n"
        "W = torch.randn(6, 4); v = torch.rand(2, 2); i = torch.tensor([[0, 5], [1, 1]])\n"
        "x = sparse_decode(v, i, W, backend='auto')\n"
        "assert torch.allclose(x[1], v[1].sum() * W[1])\n"
        "try:\n"
        "    sparse_decode(v, i, W, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e)\n"
        "else:\n"
        "    raise SystemExit('forced triton without triton did not raise')\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_kernels_compile_for_sm90_without_gpu(tmp_path):
    """The interpreter accepts code the real compiler rejects; compile every kernel ahead of time for
    an H100 (sm_90, Triton's bundled ptxas) in a process without TRITON_INTERPRET."""
    code = r'''
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import sae_dist.kernels.sparse_decode as sd
_, fwd, gv, gwa, gwr = sd._kernels()
def comp(fn, sig, const):
    full = dict(sig); full.update({k: "constexpr" for k in const})
    cx = {(fn.arg_names.index(k),): v for k, v in const.items()}
    k = triton.compile(ASTSource(fn=fn, signature=full, constexprs=cx), target=GPUTarget("cuda", 90, 32))
    assert k.asm["cubin"] and ".entry" in k.asm["ptx"]
i32 = "i32"
for dt in ("fp32", "bf16"):
    p = "*" + dt
    comp(fwd, dict(V=p, IDX="*i64", W=p, BP=p, OUT=p, B=i32, K=i32, D=i32, N=i32, s_vb=i32, s_ib=i32,
                   s_wn=i32, s_ob=i32), dict(HAS_BP=True, BB=sd.BLOCK_B, BD=sd.BLOCK_D))
    comp(gv, dict(GO=p, IDX="*i64", W=p, GV=p, B=i32, K=i32, D=i32, N=i32, s_gb=i32, s_ib=i32, s_wn=i32,
                  s_vb=i32), dict(BB=sd.BLOCK_B, BK=sd.BLOCK_K, BD=sd.BLOCK_D))
    comp(gwa, dict(GO=p, IDX="*i64", V=p, GW="*fp32", B=i32, K=i32, D=i32, N=i32, s_gb=i32, s_ib=i32, s_vb=i32,
                   s_wn=i32), dict(BB=sd.BLOCK_B, BD=sd.BLOCK_D))
    comp(gwr, dict(GO=p, TOK="*i64", WT=p, OFFS="*i64", GW=p, D=i32, s_gb=i32, s_wn=i32),
         dict(BP=sd.BLOCK_P, BD=sd.BLOCK_D))
    # the AuxK path: no b_pre, fp32 output whatever W_dec's dtype
    comp(fwd, dict(V=p, IDX="*i64", W=p, BP=p, OUT="*fp32", B=i32, K=i32, D=i32, N=i32, s_vb=i32, s_ib=i32,
                   s_wn=i32, s_ob=i32), dict(HAS_BP=False, BB=sd.BLOCK_B, BD=sd.BLOCK_D))
print("ok")
'''
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_global_deterministic_switch_selects_sorted_path(monkeypatch):
    seen = []
    real = sd.triton_grad_wdec
    monkeypatch.setattr(sd, "triton_grad_wdec", lambda *a: seen.append(a[-1]) or real(*a))
    g = torch.Generator().manual_seed(29)
    vals, idx, W, b, go = make_case("small_d", torch.float32, g)
    run_decode(vals, idx, W, b, go, "triton")
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = run_decode(vals, idx, W, b, go, "triton")
    finally:
        torch.use_deterministic_algorithms(prev)
    assert seen == [False, True]
    torch.testing.assert_close(got[2].double(), dense_oracle(vals, idx, W, b, go)[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,det", [("torch", False), ("triton", False), ("triton", True)])
def test_padding_index_minus_one_is_ignored(backend, det, poison):
    """-1 marks "no latent" (the encoder pads AuxK candidates with it): the value is ignored and gets
    zero gradient; the oracle drops those entries."""
    g = torch.Generator().manual_seed(zlib.crc32(f"pad{backend}{det}".encode()))
    vals, idx, W, b, go = make_case("general", torch.float32, g)
    pad = torch.rand(idx.shape, generator=g) < 0.3
    pad[0] = True  # a token with no latent at all
    idx = idx.masked_fill(pad, -1)
    got = run_decode(vals, idx, W, b, go, backend, det)
    ref = dense_oracle(vals.masked_fill(pad, 0.0), idx.clamp_min(0), W, b, go)
    torch.testing.assert_close(got[0].double(), ref[0], rtol=1e-5, atol=1e-5)
    assert (got[1][pad] == 0).all()
    torch.testing.assert_close(got[1][~pad].double(), ref[1][~pad], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2].double(), ref[2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="-1 for padding"):
        sparse_decode(vals, idx.masked_fill(pad, -2), W, b, backend=backend)
