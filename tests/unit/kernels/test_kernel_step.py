"""A full TopK SAE training step (the one training path, through sae_dist.kernels) equals the dense
torch step.

One step = `training_step_losses` -> backward -> decoder-gradient projection -> Adam step -> W_dec
row renormalisation (the trainer's order, Gao et al. 2024 section 2.4.1). The oracle is the same SAE
stepped on `topk_losses_reference` (dense pre-activations, torch.topk, embedding_bag); the losses of
that oracle are themselves checked against an independent dense re-implementation here. Both SAEs start from
the same random parameters (b_dec and b_enc made non-zero so every gradient path is exercised).

Adam's first update is lr * g / (|g| + eps): with the trainer's eps = 6.25e-10 it is lr * sign(g), so a
gradient entry that is 0 up to rounding would flip between +lr and -lr on float noise alone. The
comparison therefore uses eps = 1e-4, which keeps the update a smooth function of the gradient
(|d update / d g| <= lr / eps) while still exercising Adam's state and the renormalisation.

The backend="triton" steps run on the `kernel_device` fixture's device (conftest.py): the compiled
kernels on CUDA when torch sees a CUDA device (both SAEs and the batch moved there), else Triton's
interpreter on CPU. The other steps (backend "auto"/"torch" on CPU) test the torch path and stay on CPU.
"""

from __future__ import annotations

import pytest
import torch
from _kernel_tol import kernel_tol, requires_cuda

from sae_dist.sae.config import SAEConfig
from sae_dist.sae.topk import TopKSAE, topk_losses_reference

LR, EPS = 1e-3, 1e-4
NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


def _pair(cfg_kw: dict, backend: str = "auto", device: torch.device | str = "cpu"):
    """Two SAEs with identical random parameters: the training path's (with `backend`) and the oracle's
    (stepped by `_step(..., oracle=True)`); built on CPU (the same numbers on every device), then moved
    to `device`."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    a = TopKSAE(SAEConfig(**cfg_kw, kernel_backend=backend), generator=torch.Generator().manual_seed(seed))
    b = TopKSAE(SAEConfig(**cfg_kw), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        a.b_dec.normal_(0.0, 0.3)
        a.b_enc.normal_(0.0, 0.1)
        b.b_dec.copy_(a.b_dec)
        b.b_enc.copy_(a.b_enc)
    a, b = a.to(device), b.to(device)
    for n in NAMES:
        assert torch.equal(getattr(a, n), getattr(b, n))
    return a, b


def _step(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor | None, oracle: bool = False):
    opt = torch.optim.Adam(sae.parameters(), lr=LR, eps=EPS)
    res = topk_losses_reference(sae, x, dead) if oracle else sae.training_step_losses(x, dead)
    opt.zero_grad(set_to_none=True)
    res.loss.backward()
    sae.remove_parallel_grads_()
    grads = {n: getattr(sae, n).grad.detach().clone() for n in NAMES}
    opt.step()
    sae.normalize_decoder_()
    params = {n: getattr(sae, n).detach().clone() for n in NAMES}
    return res, grads, params


def _independent_losses(sae: TopKSAE, x, dead, k_aux):
    """Dense re-implementation of the paper's losses (section 2.2, 2.4.1, 5.3) from the parameters."""
    cfg = sae.cfg
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc

        def recon(kk):
            v, i = pre.topk(kk, dim=-1)
            z = torch.zeros_like(pre).scatter_(-1, i, v.clamp_min(0))
            return z @ sae.W_dec + sae.b_dec

        def nmse(t, r):
            return float(((t - r) ** 2).sum() / ((t - t.mean(0)) ** 2).sum())

        x_hat = recon(cfg.k)
        main = nmse(x, x_hat)
        mt = nmse(x, recon(cfg.multi_topk_factor * cfg.k)) if cfg.multi_topk else None
        aux = 0.0
        if dead is not None and int(dead.sum()) > 0:
            ke = min(k_aux, int(dead.sum()))
            v, i = pre.masked_fill(~dead, float("-inf")).topk(ke, dim=-1)
            z = torch.zeros_like(pre).scatter_(-1, i, v.clamp_min(0))
            aux = nmse(x - x_hat, z @ sae.W_dec)
    return main, mt, aux


def _check_equal_steps(cfg_kw, B, dead_fn, backend="auto", tol=2e-5, device="cpu"):
    a, b = _pair(cfg_kw, backend, device)
    n = cfg_kw["d_sae"]
    x = (torch.randn(B, cfg_kw["d_in"]) * 1.5 + 0.5).to(device)
    dead = dead_fn(n)
    dead = None if dead is None else dead.to(device)
    main, mt, aux = _independent_losses(b, x, dead, b.cfg.k_aux)
    ra, ga, pa = _step(a, x, dead)
    rb, gb, pb = _step(b, x, dead, oracle=True)
    # the oracle path agrees with the independent dense losses
    assert float(rb.fvu) == pytest.approx(main, rel=1e-4)
    assert float(rb.auxk_loss) == pytest.approx(aux, rel=1e-4, abs=1e-7)
    if mt is not None:
        assert float(rb.multi_topk_fvu) == pytest.approx(mt, rel=1e-4)
    # same selection, same losses (fp32, TF32 off on CUDA: kernel_device)
    f32 = torch.float32
    assert torch.equal(ra.indices, rb.indices)
    torch.testing.assert_close(ra.values, rb.values, **kernel_tol(device, f32, tol, tol))
    torch.testing.assert_close(ra.x_hat, rb.x_hat, **kernel_tol(device, f32, tol, tol))
    for name in ("loss", "fvu", "auxk_loss"):
        torch.testing.assert_close(getattr(ra, name), getattr(rb, name), **kernel_tol(device, f32, tol, 1e-7))
    if cfg_kw.get("multi_topk"):
        torch.testing.assert_close(ra.multi_topk_fvu, rb.multi_topk_fvu, **kernel_tol(device, f32, tol, 1e-7))
    else:
        assert ra.multi_topk_fvu is None and rb.multi_topk_fvu is None
    if dead is not None and int(dead.sum()) > 0:
        assert float(rb.auxk_loss) > 0  # AuxK really active in this comparison
    # gradients (after the decoder projection), then parameters after one Adam step + renorm
    for nme in NAMES:
        scale = float(gb[nme].abs().max()) + 1e-12
        assert float(gb[nme].abs().sum()) > 0, f"{nme} got no gradient"
        torch.testing.assert_close(ga[nme], gb[nme], **kernel_tol(device, f32, 1e-4, tol * scale, scale=scale),
                                   msg=f"grad {nme}")
        torch.testing.assert_close(pa[nme], pb[nme], **kernel_tol(device, f32, 1e-5, 1e-6), msg=f"param {nme}")
    return ra, rb


def _some_dead(frac):
    def f(n):
        m = torch.rand(n) < frac
        m[torch.randint(0, n, (1,))] = True
        return m
    return f


@pytest.mark.parametrize("multi_topk", [False, True])
def test_kernel_step_equals_torch_step_with_auxk(multi_topk):
    _check_equal_steps(dict(d_in=24, d_sae=160, k=5, multi_topk=multi_topk, normalize="none"),
                       B=48, dead_fn=_some_dead(0.3))


def test_kernel_step_fewer_dead_than_k_aux_and_chunked_latents():
    # k_aux = 8 (d_in 16) but only 3 dead latents: both paths use min(k_aux, n_dead). d_sae is
    # larger than the encoder's default latent chunk, so the running top-k crosses chunks.
    def three_dead(n):
        m = torch.zeros(n, dtype=torch.bool)
        m[torch.randperm(n)[:3]] = True
        return m

    _check_equal_steps(dict(d_in=16, d_sae=4096 + 77, k=3, auxk_coef=0.5, normalize="none"),
                       B=20, dead_fn=three_dead)


def test_kernel_step_without_auxk():
    # no dead mask, and a mask with no dead latent: AuxK term exactly 0 in both paths
    ra, rb = _check_equal_steps(dict(d_in=16, d_sae=64, k=4, multi_topk=True, normalize="none"),
                                B=32, dead_fn=lambda n: None)
    assert float(ra.auxk_loss) == 0.0 == float(rb.auxk_loss)
    ra, rb = _check_equal_steps(dict(d_in=16, d_sae=64, k=4, normalize="none"),
                                B=32, dead_fn=lambda n: torch.zeros(n, dtype=torch.bool))
    assert float(ra.auxk_loss) == 0.0 == float(rb.auxk_loss)


@pytest.mark.parametrize("multi_topk", [False, True])
def test_kernel_step_triton_backend_equals_torch_step(multi_topk, kernel_device):
    # The Triton kernels themselves (compiled on CUDA, or Triton's CPU interpreter: tests/conftest.py
    # chooses) inside the full step, at a tiny shape; the torch step runs on the same device.
    _check_equal_steps(dict(d_in=16, d_sae=48, k=2, multi_topk=multi_topk, normalize="none"),
                       B=18, dead_fn=_some_dead(0.4), backend="triton", tol=5e-5, device=kernel_device)


def test_kernel_step_bad_dead_mask_and_backend():
    a, _ = _pair(dict(d_in=8, d_sae=32, k=2, normalize="none"))
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="dead_mask"):
        a.training_step_losses(x, torch.ones(32))  # float, not bool
    with pytest.raises(ValueError, match="dead_mask"):
        a.training_step_losses(x, torch.ones(31, dtype=torch.bool))
    with pytest.raises(ValueError, match="kernel_backend"):
        SAEConfig(d_in=8, d_sae=32, k=2, kernel_backend="cuda")
    with pytest.raises(ValueError, match="kernels"):
        SAEConfig(d_in=8, d_sae=32, k=2, kernels="yes")


def test_kernels_switch_is_deprecated_and_ignored():
    """`sae.kernels=false` warns (FutureWarning naming the replacement) and changes nothing: the training
    path is the same with either value."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    with pytest.warns(FutureWarning, match="kernel_backend=torch"):
        off = SAEConfig(d_in=12, d_sae=40, k=3, kernels=False, normalize="none")
    a = TopKSAE(off, generator=torch.Generator().manual_seed(seed))
    b = TopKSAE(SAEConfig(d_in=12, d_sae=40, k=3, normalize="none"), generator=torch.Generator().manual_seed(seed))
    x = torch.randn(10, 12)
    torch.testing.assert_close(a.training_step_losses(x).loss, b.training_step_losses(x).loss, rtol=0, atol=0)


def test_fused_encoder_runs_in_the_autocast_dtype(monkeypatch):
    """Under bf16 autocast the fused encoder selects on bf16 operands (autocast cannot see the custom op),
    holds no bf16 copy of W_enc for the backward, and the fp32 master parameters get fp32 gradients close
    to the fp32 step's."""
    _check_autocast_step(monkeypatch, "torch", torch.device("cpu"))


def test_autocast_step_through_triton_kernels(monkeypatch, kernel_device):
    """The same mixed-precision step through the Triton kernels on the kernel tests' device (on CUDA:
    the bf16 tensor-core encoder that bf16 training runs)."""
    _check_autocast_step(monkeypatch, "triton", kernel_device)


def _check_autocast_step(monkeypatch, backend, dev):
    import sae_dist.kernels.encoder_topk as enc_mod
    import sae_dist.kernels.sparse_decode as dec_mod

    cfg = dict(d_in=32, d_sae=128, k=4, k_aux=8)
    a, b = _pair(cfg, backend=backend, device=dev)
    mms, atomic = [], []
    addmm, launch, enc_launch = torch.addmm, dec_mod.grad_wdec_atomic_launch, enc_mod.encoder_launch

    def spy_addmm(bias, m1, m2, *args, **kw):  # the torch path's chunks and the Triton path's dead pass
        mms.append((bias.dtype, m1.dtype, m2.dtype))
        return addmm(bias, m1, m2, *args, **kw)

    def spy_encoder(xc, W, b_enc, *args):  # the Triton kernel's operands
        mms.append((b_enc.dtype, xc.dtype, W.dtype))
        return enc_launch(xc, W, b_enc, *args)

    def spy_launch(x, idx, g, gw):
        if gw.stride() == (1, gw.shape[0]):  # the [d_in, d_sae] W_enc gradient (the decoders' are [d_sae, d_in])
            atomic.append((x.dtype, tuple(gw.shape)))
        return launch(x, idx, g, gw)

    monkeypatch.setattr(torch, "addmm", spy_addmm)
    monkeypatch.setattr(enc_mod, "encoder_launch", spy_encoder)
    monkeypatch.setattr(dec_mod, "grad_wdec_atomic_launch", spy_launch)
    x = torch.randn(64, 32).to(dev)
    dead = (torch.rand(128) < 0.3).to(dev)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype, t.data_ptr()))
        return t

    with torch.autocast(dev.type, dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        res_a = a.training_step_losses(x, dead)
    res_a.loss.backward()
    assert mms and set(mms) == {(torch.bfloat16,) * 3}  # every encoder product on bf16 operands
    # the only [d_in, d_sae] tensor the graph keeps is the fp32 parameter itself
    assert [s for s in saved if s[0] == (32, 128)] == [((32, 128), torch.float32, a.W_enc.data_ptr())]
    # bf16 training takes the CSR W_enc gradient, not the atomic kernel of fp32 training
    assert atomic == []
    res_b = topk_losses_reference(b, x, dead)  # the dense oracle, fp32
    res_b.loss.backward()
    # bf16 rounding may change which latents win near-ties, so compare directions, not entries
    assert abs(float(res_a.loss.detach()) - float(res_b.loss.detach())) < 0.03 * float(res_b.loss.detach())
    for n in NAMES:
        g = getattr(a, n).grad
        assert g.dtype == torch.float32 and bool(torch.isfinite(g).all()), n
        ref = getattr(b, n).grad
        cos = float((g * ref).sum() / (g.norm() * ref.norm()))
        assert cos > 0.9, (n, cos)


@requires_cuda
def test_bench_counts_the_host_syncs_of_a_step():
    """`sae_dist.bench.host_syncs` (the benchmark's host_syncs_per_step) counts one wait per .item() and none for
    work that stays on the device, and leaves torch's sync debug mode off."""
    from sae_dist.bench import host_syncs

    dev = torch.device("cuda")
    x = torch.randn(64, 64, device=dev)
    assert host_syncs(lambda i: [float((x * j).sum()) for j in range(3)], 0, dev) == 3
    assert host_syncs(lambda i: x @ x + i, 0, dev) == 0
    assert torch.cuda.get_sync_debug_mode() == 0
    assert host_syncs(lambda i: x.sum().item(), 0, torch.device("cpu")) is None
