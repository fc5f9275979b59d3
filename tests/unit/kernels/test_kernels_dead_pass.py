"""The fused encoder's AuxK side on the kernel device (CUDA tensors on a GPU machine, Triton's interpreter on
a CPU; `make gpu-check` runs this file): a bounded number of compiled variants while the dead count sweeps
0..k_aux (no data-dependent constexpr), the W_enc gradient's atomic and CSR paths against the dense oracle, and
the dead-latent pass in several chunks against the reference."""

import math
from collections import Counter

import pytest
import torch

from sae_dist.kernels._common import record_variants
from sae_dist.kernels.encoder_topk import encode_topk
from sae_dist.kernels.sparse_decode import auxk_loss


@pytest.mark.parametrize("k_aux", [16, 24])
def test_dead_count_sweep_compiles_a_bounded_number_of_variants(k_aux, kernel_device):
    """As the dead count sweeps every value 0..k_aux + 2, the fused encoder launches one variant and no
    kernel of the step more than log2(k_aux) + 2 (Triton's compile-cache key: argument specialisation,
    constexprs and launch options, recorded at each launch)."""
    B, d, n, k = 8, 16, 96, 4
    g = torch.Generator().manual_seed(0)
    dev = kernel_device
    x = torch.randn(B, d, generator=g).to(dev)
    W_enc = torch.randn(d, n, generator=g).to(dev).requires_grad_()
    W_dec = torch.randn(n, d, generator=g).to(dev).requires_grad_()
    b_enc, b_dec = torch.zeros(n, device=dev), torch.zeros(d, device=dev)
    with record_variants() as seen:
        for n_dead in range(k_aux + 3):
            dead = torch.zeros(n, dtype=torch.bool)
            dead[torch.randperm(n, generator=g)[:n_dead]] = True
            dead = dead.to(dev)
            v, i, av, ai = encode_topk(x, W_enc, b_enc, b_dec, k, dead_mask=dead, k_aux=k_aux, backend="triton")
            loss = auxk_loss(av, ai, W_dec, x, backend="triton") if av is not None else W_dec.sum() * 0
            (loss + v.sum()).backward()
    counts = Counter(key[0] for key in seen)  # variants per kernel name
    assert counts["encoder_topk"] == 1, counts
    assert counts["fwd"] >= 2  # the AuxK decode did run at several widths
    assert max(counts.values()) <= math.log2(k_aux) + 2, counts


@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_w_enc_gradient_atomic_and_csr_paths_equal_the_reference(deterministic, kernel_device):
    """fp32 W_enc on the Triton backend: the atomic-scatter W_enc gradient (default) and the CSR path
    (deterministic algorithms on) both equal the dense autograd oracle, AuxK codes included, among them
    latents that are both in a token's top-k and among its AuxK candidates (a CSR row with one token twice,
    which the product must add up: on CUDA, cuSPARSE's)."""
    from sae_dist.kernels.encoder_topk import encode_topk_reference

    B, d, n, k, k_aux = 24, 16, 80, 4, 6
    g = torch.Generator().manual_seed(1)
    dev = kernel_device
    x = torch.randn(B, d, generator=g).to(dev)
    dead = (torch.rand(n, generator=g) < 0.3).to(dev)
    grads = []
    for fn, backend in ((encode_topk, "triton"), (encode_topk_reference, "torch")):
        W = torch.randn(d, n, generator=torch.Generator().manual_seed(2)).to(dev).requires_grad_()
        b_enc = torch.zeros(n, device=dev, requires_grad=True)
        b_dec = torch.zeros(d, device=dev, requires_grad=True)
        prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic and backend == "triton")
        try:
            v, i, av, ai = fn(x, W, b_enc, b_dec, k, dead_mask=dead, k_aux=k_aux, backend=backend)
            (v.pow(2).sum() + 0.5 * av.sum()).backward()
            assert (i[:, :, None] == ai[:, None, :]).any(), "no (token, latent) in both sets"
        finally:
            torch.use_deterministic_algorithms(prev)
        grads.append((W.grad, b_enc.grad, b_dec.grad))
    for got, want in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_dead_latent_pass_in_several_chunks_equals_the_reference(monkeypatch, kernel_device):
    """The AuxK candidates of the Triton path come from a pass over the dead latents' columns; with a
    tiny latent_chunk and block budget it runs in many column chunks and token blocks and still gives
    the reference's candidates."""
    import sae_dist.kernels.encoder_topk as et

    B, d, n, k, k_aux = 16, 8, 120, 3, 5
    g = torch.Generator().manual_seed(3)
    dev = kernel_device
    x, W = torch.randn(B, d, generator=g).to(dev), torch.randn(d, n, generator=g).to(dev)
    b_enc, b_dec = torch.randn(n, generator=g).to(dev), torch.zeros(d, device=dev)
    dead = (torch.rand(n, generator=g) < 0.5).to(dev)
    # chunks of max(latent_chunk, 2 k_aux) = 10 dead latents, blocks of 7 * 15 // (5 + 10) = 7 tokens
    monkeypatch.setattr(et, "DEAD_PASS_ELEMENTS", 7 * 15)
    _, _, av, ai = et.encode_topk(x, W, b_enc, b_dec, k, dead_mask=dead, k_aux=k_aux, backend="triton",
                                  latent_chunk=4)
    _, _, rav, rai = et.encode_topk_reference(x, W, b_enc, b_dec, k, dead_mask=dead, k_aux=k_aux)
    torch.testing.assert_close(av.sort(1).values, rav.sort(1).values)
    assert torch.equal(ai.sort(1).values, rai.sort(1).values)
