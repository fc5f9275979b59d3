"""The latent sharding (`sae_dist.parallel.tp`) in this process: `init_rows` independent of the mesh, shard
shapes of a meta-device build (and the planner's, `sae-plan`'s parameter memory), a shard refusing
inference, `compact_kept` against the full-width decode, the all-gather fallback's chunk sizes. Sharded
training steps over gloo against the dense single-process oracle and the chunked all-gather across ranks:
tests/integration/parallel/test_parallel_tp_gloo.py."""

from __future__ import annotations

import pytest
import torch
from helpers.dist import NAMES

from sae_dist.parallel.tp import build_sharded_sae, compact_kept
from sae_dist.sae.config import SAEConfig
from sae_dist.sae.init import init_rows


def test_init_rows_is_mesh_independent():
    seed = int(torch.randint(0, 2**31 - 1, ()))
    full = init_rows(0, 10000, 8, seed)
    torch.testing.assert_close(full.norm(dim=-1), torch.ones(10000))
    for lo, hi in ((0, 5000), (5000, 10000), (4090, 4100), (8191, 8193)):
        assert torch.equal(init_rows(lo, hi, 8, seed), full[lo:hi])
    assert not torch.equal(init_rows(0, 10, 8, seed + 1), full[:10])


def test_meta_build_has_shard_shapes():
    cfg = SAEConfig(d_in=4096, d_sae=2**24, k=32)
    m = build_sharded_sae(cfg, tp=64, tp_rank=63, device="meta")
    per = 2**24 // 64
    assert (m.latent_start, m.latent_end) == (63 * per, 64 * per)
    shapes = {n: tuple(getattr(m, n).shape) for n in NAMES}
    assert shapes == {"W_enc": (4096, per), "b_enc": (per,), "W_dec": (per, 4096), "b_dec": (4096,)}
    with pytest.raises(ValueError, match="not divisible by parallel.tp=3"):
        build_sharded_sae(SAEConfig(d_in=8, d_sae=64, k=2), tp=3, tp_rank=0, device="meta")


def test_inference_on_a_shard_refuses():
    """A latent shard trains but does not run inference (it would silently use its own latents only)."""
    shard = build_sharded_sae(SAEConfig(d_in=8, d_sae=16, k=2), tp=2, tp_rank=1)
    x = torch.randn(3, 8)
    for call in (lambda: shard(x), lambda: shard.encode(x), lambda: shard.decode(torch.zeros(3, 16)),
                 lambda: shard.decode_sparse(torch.ones(3, 2), torch.zeros(3, 2, dtype=torch.long))):
        with pytest.raises(NotImplementedError, match="one latent shard"):
            call()
    whole = build_sharded_sae(SAEConfig(d_in=8, d_sae=16, k=2), tp=1, tp_rank=0)
    assert whole(x).shape == (3, 8)


def test_meta_shards_agree_with_sae_plan():
    """The 2^24 x 4096 SAE built on the meta device at tp=64: every rank's parameters have the
    planner's shard shapes, and `sae-plan`'s parameter memory equals 4 bytes x the module's count."""
    from sae_dist.plan import plan, shard_shapes

    d, n, tp = 4096, 2**24, 64
    cfg = SAEConfig(d_in=d, d_sae=n, k=32)
    planned = shard_shapes(d, n, tp)
    for r in (0, int(torch.randint(1, tp - 1, ())), tp - 1):
        m = build_sharded_sae(cfg, tp=tp, tp_rank=r, device="meta")
        assert {name: tuple(p.shape) for name, p in m.named_parameters()} == planned
        n_params = sum(p.numel() for p in m.parameters())
    res = plan(d_in=d, d_sae=n, k=32, batch_tokens=131072, tp=tp, cluster={"nodes": 8, "gpus_per_node": 8})
    assert res["memory_bytes"]["params"] == 4 * n_params


def test_compact_kept_matches_full_width_decode():
    """`compact_kept` keeps only the kept entries, in a width cut to the largest per-row count, and their
    decode equals the full-width decode with the others as padding; a rank keeping nothing gets one slot
    of padding, which decodes to 0."""
    from sae_dist.kernels.sparse_decode import sparse_decode

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    W_dec = torch.randn(64, 8, generator=g)
    B, w = 6, 20
    vals = torch.randn(B, w, generator=g).abs()
    idx = torch.randint(0, 64, (B, w), generator=g)
    keep = torch.rand(B, w, generator=g) < 0.2
    keep[0, :7] = True  # the widest row keeps 7 (or more)
    v, i = compact_kept(vals, idx, keep)
    assert v.shape[1] == int(keep.sum(1).max()) < w
    assert torch.equal((i >= 0).sum(1), keep.sum(1)) and bool((v[i < 0] == 0).all())
    ref = sparse_decode(vals * keep, torch.where(keep, idx, -1), W_dec, None, backend="torch")
    torch.testing.assert_close(sparse_decode(v, i, W_dec, None, backend="torch"), ref)
    none = torch.zeros(B, w, dtype=torch.bool)
    v0, i0 = compact_kept(vals, idx, none)
    assert v0.shape == (B, 1) and bool((i0 == -1).all())
    assert torch.equal(sparse_decode(v0, i0, W_dec, None, backend="torch"), torch.zeros(B, 8))


def test_gather_chunk_rows_bounds():
    from sae_dist.parallel.tp import GATHER_CHUNK_BYTES, gather_chunk_rows

    assert GATHER_CHUNK_BYTES == 2**28
    # tp = 64, w = k_aux = 2048: 512 KiB of fp32 candidates per token, 512 tokens per 256 MiB chunk
    assert gather_chunk_rows(131071, 64, 2048) == 512
    assert gather_chunk_rows(100, 64, 2048) == 100  # never more than the batch
    assert gather_chunk_rows(100, 64, 2048, 1) == 1  # one row even when it alone exceeds the cap
    for tp in (2, 8, 64, 512):  # the gathered chunk stays under the cap at any tp
        assert gather_chunk_rows(10**6, tp, 2048) * tp * 2048 * 4 <= GATHER_CHUNK_BYTES
    with pytest.raises(ValueError, match="tp=0"):
        gather_chunk_rows(10, 0, 4)
