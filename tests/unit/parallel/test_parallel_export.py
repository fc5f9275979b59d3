"""Sharded export (`sae_dist.parallel.export`) in this process: a ctx without a mesh and a tp=1 shard (the
whole SAE, float32 and bfloat16) write the same files as the single-process `export_sae`, with every torch
op's allocation within the write buffer (and with the default buffer); the errors (no scale for
normalize "scalar", a buffer too small, a shard that disagrees with ctx, meta tensors) leave no file
behind; the safetensors layout helper on an odd header length. The export over gloo meshes:
tests/integration/parallel/test_parallel_export_gloo.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers.dist import NAMES
from helpers.export import BUF, MODES, AllocRecorder, assert_same_export, export_kwargs, global_weights, random_scale

import sae_dist
from sae_dist.parallel.mesh import ParallelContext
from sae_dist.sae.config import SAEConfig
from sae_dist.sae.export import export_sae
from sae_dist.sae.topk import TopKSAE


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_single_process_fallback_equals_export_sae(dtype, tmp_path):
    """ctx without a mesh, a tp=1 shard (the whole SAE): same files as export_sae; bounded allocations."""
    from sae_dist.parallel.export import export_sae_sharded
    from sae_dist.parallel.tp import build_sharded_sae

    d, n = 12, 40
    cfg = SAEConfig(d_in=d, d_sae=n, k=3, dtype=dtype)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    weights = global_weights(d, n, g)
    scale = random_scale(g)
    ref_sae, shard = TopKSAE(cfg), build_sharded_sae(cfg, tp=1, tp_rank=0)
    with torch.no_grad():
        for name in NAMES:
            getattr(ref_sae, name).copy_(weights[name])
            getattr(shard, name).copy_(weights[name])
    ctx = ParallelContext()
    for mode in MODES:
        export_sae(ref_sae, tmp_path / "ref" / mode, **export_kwargs(mode, scale))
        rec = AllocRecorder()
        with rec:
            out = export_sae_sharded(shard, ctx, tmp_path / "got" / mode, max_buffer_bytes=BUF,
                                     **export_kwargs(mode, scale))
        assert out == tmp_path / "got" / mode
        assert_same_export(out, tmp_path / "ref" / mode, d, n)
        # bf16 chunks are converted to float32 (BUF bytes) from at most BUF / 4 bf16 elements
        assert rec.sizes and max(s[2] for s in rec.sizes) <= BUF
    # with the default buffer too
    export_sae_sharded(shard, ctx, tmp_path / "default", **export_kwargs("scalar", scale))
    assert_same_export(tmp_path / "default", tmp_path / "ref" / "scalar", d, n)


def test_errors(tmp_path):
    from sae_dist.parallel.export import export_sae_sharded, safetensors_f32_layout
    from sae_dist.parallel.tp import build_sharded_sae

    cfg = SAEConfig(d_in=8, d_sae=16, k=2)
    shard = build_sharded_sae(cfg, tp=1, tp_rank=0)
    sae_dist.sae.init.tied_init_rows_(shard, 0)
    kw = export_kwargs("none", None)
    with pytest.raises(ValueError, match="scale"):
        export_sae_sharded(shard, ParallelContext(), tmp_path / "a", **export_kwargs("scalar", None))
    with pytest.raises(ValueError, match=r"max_buffer_bytes=2"):
        export_sae_sharded(shard, ParallelContext(), tmp_path / "a", max_buffer_bytes=2, **kw)
    other = build_sharded_sae(cfg, tp=2, tp_rank=1)
    with pytest.raises(ValueError, match=r"holds latents \[8, 16\) but ctx"):
        export_sae_sharded(other, ParallelContext(), tmp_path / "a", **kw)
    meta = build_sharded_sae(cfg, tp=2, tp_rank=1, device="meta")
    ctx = dataclasses.replace(ParallelContext(), tp=2, tp_rank=1, world_size=2, rank=1)
    with pytest.raises(ValueError, match="meta device"):
        export_sae_sharded(meta, ctx, tmp_path / "a", **kw)
    assert not (tmp_path / "a").exists()
    # the layout helper agrees with safetensors on an odd header length
    lay = safetensors_f32_layout({"x": (3,), "a_long_name": (2, 5)})
    assert len(lay.header) % 8 == 0 and lay.size == len(lay.header) + 4 * 13
