"""The harvester, the LM stream and `load_sae` on a CUDA device against the same work on the CPU (skipped
without CUDA; `make gpu-check` runs this file with the kernel tests). What only CUDA exercises: the harvest's
pinned host buffers, filled by non_blocking device-to-host copies that are synchronised before a shard is
written, and its per-sequence finiteness flags computed on the device and copied out the same way."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers.harvest import BODY, CTX, EVAL, HOOK, SMALL, read_store, run_harvest
from helpers.synthetic import tiny_corpus

import sae_dist
from sae_dist.harvest import HarvestError, splice_hook

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 matmuls in IEEE precision (torch's default) for the comparisons' tolerances, whatever ran before."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.fixture(scope="module")
def lm_cuda(lm):
    """The tiny LM (float32) on the first CUDA device, with the CPU one's weights."""
    model, tok = lm
    return copy.deepcopy(model).to("cuda"), tok


def _slow_stream(a: torch.Tensor) -> torch.Tensor:
    """A pass-through hook that keeps a CUDA stream busy for ~50 ms before the rest of the forward: the
    harvest's device-to-host copies of this batch then land long after Python has moved on, so a read of the
    host buffers without waiting for them would see stale or zero rows."""
    if a.is_cuda:
        torch.cuda._sleep(100_000_000)
    return a


@requires_cuda
@pytest.mark.parametrize(("dtype", "ulps"), [("float32", 0.0), ("float16", 2.0**-10)])
def test_cuda_harvest_stores_what_the_cpu_harvest_stores(dtype, ulps, lm, lm_cuda, tmp_path):
    """Nine shards of 16 sequences in forwards of 5 (the pinned buffers reused across batches and shards), the
    device held busy before each batch's copies: the same rows, ids and positions, activations equal to float
    rounding (fp32 compute, no TF32; a float16 store may round a value the other way), the same norm stats."""
    docs = tiny_corpus(**SMALL)
    tokens = 140 * BODY
    run_harvest(lm, tmp_path / "cpu", docs, tokens, dtype=dtype)
    with splice_hook(lm_cuda[0], "blocks.0.hook_mlp_out", _slow_stream):
        run_harvest(lm_cuda, tmp_path / "cuda", docs, tokens, dtype=dtype)
    (cpu, at_cpu), (gpu, at_gpu) = read_store(tmp_path / "cpu"), read_store(tmp_path / "cuda")
    for k in ("token_ids", "seq_index", "position"):
        np.testing.assert_array_equal(gpu[k], cpu[k], err_msg=k)
    ref = cpu["activations"].astype(np.float32)
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(gpu["activations"].astype(np.float32), ref, rtol=1e-4 + ulps, atol=1e-5 * scale)
    assert at_gpu["n_tokens"] == at_cpu["n_tokens"] == tokens and at_gpu["dtype"] == dtype
    for k in ("mean_norm", "mean_sq_norm"):
        np.testing.assert_allclose(at_gpu["norm_stats"][k], at_cpu["norm_stats"][k], rtol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_a_non_finite_activation_names_its_sequence(device, request, tmp_path):
    """A NaN in one sequence of the third forward (sequences 10..14, batches of 5) names that sequence alone:
    the flags are per sequence and, on CUDA, read after their copy has landed."""
    pair = request.getfixturevalue("lm" if device == "cpu" else "lm_cuda")
    calls = []

    def poison(a):
        calls.append(1)
        if len(calls) == 3:
            a = a.clone()
            a[1, 4, 0] = float("nan")
        return _slow_stream(a)  # on CUDA the flags' copies land late

    with splice_hook(pair[0], "blocks.0.hook_mlp_out", poison):
        with pytest.raises(HarvestError, match=r"batch of sequences \[10, 11, 12, 13, 14\] \(bad: \[11\]\)"):
            run_harvest(pair, tmp_path / "nan", tiny_corpus(**SMALL), 40 * BODY, dtype="float32")


@requires_cuda
def test_cuda_lm_stream_batches_equal_the_cpu_stream(lm, lm_cuda):
    from sae_dist.harvest.stream import LMStream

    docs = tiny_corpus(**SMALL)

    def batches(pair):
        model, tok = pair
        dev = next(model.parameters()).device  # the stream's window buffer on the LM's device
        s = LMStream(model=model, tokenizer=tok, hook_name=HOOK, batch_tokens=60, docs=lambda: docs, ctx_len=CTX,
                     eval_fraction=EVAL, buffer_tokens=8 * BODY, lm_batch_size=3, dtype="float32", seed=3,
                     normalize="layer_norm", device=dev)
        try:
            out = [next(s) for _ in range(6)]  # three windows
        finally:
            s.close()
        assert {b.device.type for b in out} == {dev.type}
        return [b.float().cpu() for b in out]

    for got, ref in zip(batches(lm_cuda), batches(lm), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@requires_cuda
def test_load_sae_on_cuda_reconstructs_as_on_the_cpu(tmp_path):
    from sae_dist.sae.config import SAEConfig
    from sae_dist.sae.export import export_sae
    from sae_dist.sae.topk import TopKSAE

    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=32, d_sae=256, k=8, normalize="layer_norm"))
    export_sae(sae, tmp_path / "sae", hook_name=HOOK, model_name="tiny", normalize="layer_norm")
    cpu, gpu = sae_dist.load_sae(tmp_path / "sae"), sae_dist.load_sae(tmp_path / "sae", device="cuda")
    assert gpu.W_enc.device.type == "cuda" and gpu.W_enc.dtype == torch.float32
    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(1)) * 3 + 1
    with torch.no_grad():
        ref, got = cpu(x), gpu(x.cuda()).cpu()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
