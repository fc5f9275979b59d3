"""Sharded export (sae_dist.parallel.export) against the single-process export_sae.

gloo meshes tp=2, tp=4 and tp=2 x dp=2: each rank holds its shard of fresh random global weights and
calls `export_sae_sharded`; the files must equal what `export_sae` writes for an unsharded `TopKSAE`
holding the global weights (cfg.json text, every tensor torch.equal, and here even the same bytes),
for normalize "layer_norm", "scalar" (random scale) and "none". During the export no gather-like
collective may run (they are replaced by functions that raise) and no torch op may allocate more than
the write buffer (a TorchDispatchMode records every non-view op's output bytes). `sae_dist.load_sae`
on the sharded export reproduces the unsharded model's reconstruction. A rank failing mid-write makes
every rank raise and leaves no file behind. The single-process fallback and the errors:
tests/unit/parallel/test_parallel_export.py.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from helpers.dist import NAMES, free_port
from helpers.export import BUF, MODES, AllocRecorder, assert_same_export, export_kwargs, global_weights, random_scale

import sae_dist
from sae_dist.sae.config import SAEConfig
from sae_dist.sae.export import export_sae
from sae_dist.sae.topk import TopKSAE
from sae_dist.store import denormalize, normalize

FORBIDDEN = ("all_gather", "all_gather_into_tensor", "_all_gather_base", "gather", "all_gather_object",
             "gather_object", "broadcast", "broadcast_object_list", "scatter", "reduce_scatter",
             "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv")


def _raiser(name):
    def f(*_a, **_k):
        raise AssertionError(f"torch.distributed.{name} called during the sharded export")
    return f


def _worker(rank, world, tp, port, cfg, weights, scale, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    import sae_dist.parallel.export as pexport
    from sae_dist.parallel.mesh import destroy_parallel, init_parallel
    from sae_dist.parallel.tp import build_sharded_sae

    torch.set_num_threads(1)
    ctx = init_parallel(tp=tp, device="cpu")
    model = build_sharded_sae(cfg, ctx)
    lo, hi = model.latent_start, model.latent_end
    with torch.no_grad():
        model.W_enc.copy_(weights["W_enc"][:, lo:hi])
        model.b_enc.copy_(weights["b_enc"][lo:hi])
        model.W_dec.copy_(weights["W_dec"][lo:hi])
        model.b_dec.copy_(weights["b_dec"])
    saved = {name: getattr(dist, name) for name in FORBIDDEN if hasattr(dist, name)}
    for name in saved:
        setattr(dist, name, _raiser(name))
        setattr(c10d, name, _raiser(name))
    rec = AllocRecorder()
    with rec:
        for mode in MODES:
            pexport.export_sae_sharded(model, ctx, os.path.join(out_dir, mode), max_buffer_bytes=BUF,
                                       **export_kwargs(mode, scale))
    # a writer failing mid-write: every rank must raise, rank 0 must remove the temporary file
    bad_rank = tp - 1  # a writer (dp_rank 0) that is not rank 0
    if rank == bad_rank:
        def broken(*_a, **_k):
            raise OSError("disk full (simulated)")
        pexport._write_strided = broken
    try:
        pexport.export_sae_sharded(model, ctx, os.path.join(out_dir, "failed"), max_buffer_bytes=BUF,
                                   **export_kwargs("none", None))
        failure = None
    except Exception as e:  # noqa: BLE001 - reported to the test process
        failure = (type(e).__name__, str(e))
    for name, fn in saved.items():
        setattr(dist, name, fn)
        setattr(c10d, name, fn)
    torch.save({"sizes": rec.sizes, "failure": failure, "bad_rank": bad_rank, "range": (lo, hi)},
               os.path.join(out_dir, f"rank{rank}.pt"))
    destroy_parallel(ctx)


def _check_reconstruction(out_dir, ref_sae, mode, scale, g):
    """load_sae(sharded export) on raw activations == the unsharded training model's x^."""
    d = ref_sae.cfg.d_in
    x = torch.randn(64, d, generator=g) * torch.rand(64, 1, generator=g) * 4 + torch.randn(d, generator=g)
    s = scale if mode == "scalar" else None
    x_n, nctx = normalize(x, mode, scale=s)
    with torch.no_grad():
        expected = denormalize(ref_sae(x_n), mode, nctx)
        got = sae_dist.load_sae(out_dir)(x)
    torch.testing.assert_close(got, expected, atol=2e-4 * float(x.abs().max()), rtol=1e-4)


@pytest.mark.usefixtures("worker_forkserver")  # tests/conftest.py
@pytest.mark.parametrize("tp,dp", [(2, 1), (4, 1), (2, 2)])
def test_sharded_export_equals_single_process_export(tp, dp, tmp_path):
    world = tp * dp
    d, n = 8, 64
    cfg = SAEConfig(d_in=d, d_sae=n, k=4)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    weights = global_weights(d, n, g)
    scale = random_scale(g)
    ref_sae = TopKSAE(cfg)
    with torch.no_grad():
        for name in NAMES:
            getattr(ref_sae, name).copy_(weights[name])
    for mode in MODES:
        export_sae(ref_sae, tmp_path / "ref" / mode, **export_kwargs(mode, scale))

    (tmp_path / "sharded").mkdir()
    args = (world, tp, free_port(), cfg, weights, scale, str(tmp_path / "sharded"))
    mp.start_processes(_worker, args=args, nprocs=world, join=True, start_method="forkserver")

    for mode in MODES:
        assert_same_export(tmp_path / "sharded" / mode, tmp_path / "ref" / mode, d, n)
        _check_reconstruction(tmp_path / "sharded" / mode, ref_sae, mode, scale, g)
    cfg_ln = json.loads((tmp_path / "sharded" / "layer_norm" / "cfg.json").read_text())
    assert cfg_ln["sae_dist"]["fold_factor"] == math.sqrt(d / (d - 1)) and cfg_ln["d_sae"] == n

    per_rank = [torch.load(tmp_path / "sharded" / f"rank{r}.pt") for r in range(world)]
    for r, got in enumerate(per_rank):
        # no op allocated more than the write buffer (a full [d, n] would be d * n * 4 = 2048 bytes)
        assert got["sizes"], "the recorder saw no op: it did not run"
        worst = max(s[2] for s in got["sizes"])
        assert worst <= BUF, f"rank {r} allocated {worst} bytes: {max(got['sizes'], key=lambda s: s[2])}"
        assert not [s for s in got["sizes"] if s[1] in ((d, n), (n, d))]
        # the simulated write failure: every rank raised, the failing one its own error
        name, msg = got["failure"]
        if r == got["bad_rank"]:
            assert (name, msg) == ("OSError", "disk full (simulated)")
        else:
            assert name == "RuntimeError" and f"[{got['bad_rank']}]" in msg and "writing" in msg
    assert os.listdir(tmp_path / "sharded" / "failed") == []
