"""Latent-sharded TopK SAE over gloo (2 and 4 CPU processes) against the dense single-process oracle.

For each mesh, 20 Adam steps (AuxK on against a fixed random dead mask, decoder projection and
renormalisation as the trainer does) of a `TopKSAE` under `parallelize_sae` are compared with the same
steps of the unsharded SAE's dense torch losses (`topk_losses_reference`) computed in this process:
per-step global loss, gradients of steps 1 and 20 and the final weights, all within 1e-5 (fp32). The
all-gather fallback (B % tp != 0) over 3 processes: its chunked gathers give the unchunked, dense
global top-m masks bit for bit, each gather within the cap. Fresh random data and seed every run. The
sharding's in-process tests: tests/unit/parallel/test_parallel_tp.py.
"""

from __future__ import annotations

import os
from functools import partial

import pytest
import torch
import torch.multiprocessing as mp
from helpers.dist import NAMES, free_port, prefixed, tp_shard

from sae_dist.parallel.mesh import shard_range
from sae_dist.parallel.tp import build_sharded_sae, keep_from_topk
from sae_dist.sae.config import SAEConfig
from sae_dist.sae.init import init_rows, tied_init_rows_
from sae_dist.sae.topk import TopKSAE, topk_losses_reference

STEPS, LR = 20, 3e-3


def _cfg(multi_topk: bool) -> SAEConfig:
    return SAEConfig(d_in=16, d_sae=64, k=4, k_aux=6, multi_topk=multi_topk, multi_topk_factor=2)


def _run(model, xs, dead, step_fn_rows, sync=None, losses_fn=None):
    """STEPS trainer-like steps; returns (per-step local losses, grads at steps 1 and STEPS, weights).
    losses_fn(x, dead): the step's losses (default: the model's training path)."""
    opt = torch.optim.Adam(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=6.25e-10)
    losses_fn = losses_fn or model.training_step_losses
    losses, grads = [], {}
    for s in range(STEPS):
        res = losses_fn(step_fn_rows(xs[s]), dead)
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        if sync is not None:
            sync()
        model.remove_parallel_grads_()
        if s in (0, STEPS - 1):
            grads[s] = {n: getattr(model, n).grad.detach().clone() for n in NAMES}
        opt.step()
        model.normalize_decoder_()
        losses.append(res.loss.detach().clone())
    return torch.stack(losses), grads, {n: getattr(model, n).detach().clone() for n in NAMES}


def _worker(rank, world, tp, port, cfg, xs, dead, b_dec, seed, out_dir, gather_cap=None):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from sae_dist.parallel import tp as tpmod
    from sae_dist.parallel.comm import all_reduce_
    from sae_dist.parallel.mesh import destroy_parallel, init_parallel
    from sae_dist.train.engine import sync_grads_over_dp

    torch.set_num_threads(1)
    if gather_cap is not None:  # the all-gather fallback in chunks of a few tokens
        tpmod.GATHER_CHUNK_BYTES = gather_cap
    ctx = init_parallel(tp=tp, device="cpu")
    model = build_sharded_sae(cfg, ctx)
    tied_init_rows_(model, seed, model.latent_start)
    with torch.no_grad():
        model.b_dec.copy_(b_dec)
    lo, hi = model.latent_start, model.latent_end
    b = xs.shape[1] // ctx.dp
    rows = lambda x: x[ctx.dp_rank * b:(ctx.dp_rank + 1) * b]  # noqa: E731
    losses, grads, weights = _run(model, xs, dead[lo:hi], rows, sync=lambda: sync_grads_over_dp(model))
    all_reduce_(losses, ctx.dp_group)  # the per-rank losses are shares of the global loss
    torch.save({"rank": rank, "tp_rank": ctx.tp_rank, "dp_rank": ctx.dp_rank, "range": (lo, hi),
                "losses": losses, "grads": grads, "weights": weights},
               os.path.join(out_dir, f"rank{rank}.pt"))
    destroy_parallel(ctx)


@pytest.mark.usefixtures("worker_forkserver")  # tests/conftest.py
@pytest.mark.parametrize("tp,dp,multi_topk,B,gather_cap", [
    (2, 1, False, 32, None), (1, 2, False, 32, None), (2, 2, True, 32, None), (4, 1, True, 34, None),
    (4, 1, True, 34, 640)])
def test_sharded_steps_match_single_process(tp, dp, multi_topk, B, gather_cap, tmp_path):
    """B divisible by tp: the token-sharded all_to_all selection; B=34 at tp=4: the all-gather one,
    in one chunk, and with gather_cap=640 bytes in chunks of 5 (TopK, 4 x 8 fp32 candidates per token)
    and 6 tokens (AuxK, at most 4 x 6)."""
    world = tp * dp
    cfg = _cfg(multi_topk)
    seed = int(torch.randint(0, 2**31 - 1, ()))
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(STEPS, B, cfg.d_in, generator=g) * 2.0 + 0.3
    dead = torch.rand(cfg.d_sae, generator=g) < 0.3
    b_dec = 0.1 * torch.randn(cfg.d_in, generator=g)

    ref = TopKSAE(cfg)
    w = init_rows(0, cfg.d_sae, cfg.d_in, seed)
    with torch.no_grad():
        ref.W_dec.copy_(w)
        ref.W_enc.copy_(w.T)
        ref.b_dec.copy_(b_dec)
    ref_losses, ref_grads, ref_weights = _run(ref, xs, dead, lambda x: x,
                                              losses_fn=lambda x, d: topk_losses_reference(ref, x, d))

    mp.start_processes(_worker, args=(world, tp, free_port(), cfg, xs, dead, b_dec, seed, str(tmp_path),
                                      gather_cap), nprocs=world, join=True, start_method="forkserver")
    worst = 0.0
    for r in range(world):
        got = torch.load(tmp_path / f"rank{r}.pt")
        lo, hi = got["range"]
        assert (lo, hi) == shard_range(cfg.d_sae, tp, got["tp_rank"])
        torch.testing.assert_close(got["losses"], ref_losses, rtol=1e-5, atol=1e-5)
        worst = max(worst, float((got["losses"] - ref_losses).abs().max()))
        for s in (0, STEPS - 1):
            for n in NAMES:
                exp = tp_shard(ref_grads[s][n], n, lo, hi)
                torch.testing.assert_close(got["grads"][s][n], exp, rtol=1e-5, atol=1e-5,
                                           msg=partial(prefixed, f"grad {n} step {s + 1}, rank {r}"))
                worst = max(worst, float((got["grads"][s][n] - exp).abs().max()))
        for n in NAMES:
            exp = tp_shard(ref_weights[n], n, lo, hi)
            torch.testing.assert_close(got["weights"][n], exp, rtol=1e-5, atol=1e-5,
                                       msg=partial(prefixed, f"weight {n}, rank {r}"))
            worst = max(worst, float((got["weights"][n] - exp).abs().max()))
    print(f"tp={tp} dp={dp}: max abs difference over losses, grads, weights = {worst:.3g}")
    # AuxK must really have run in the compared steps
    assert ref_grads[0]["W_dec"][dead].abs().sum() > 0


# ------------------------------------------------------------------ the all-gather fallback, chunked
GATHER_TP, GATHER_B, GATHER_W = 3, 29, 5  # 29 % 3 != 0: the fallback
#: per-chunk byte caps: None (the default, all 29 tokens in one chunk), 7 tokens, one token (the cap
#: is below one row's tp * w * 4 = 60 bytes)
GATHER_CAPS = (None, 7 * GATHER_TP * GATHER_W * 4, 1)


def _gather_worker(rank, world, port, full, ms, out_dir):
    """Rank `rank` of a tp group of `world`: `global_keep` on its slice of `full` [B, world * w] under
    each cap of GATHER_CAPS, recording the bytes of every all-gather; also the unchunked selection as
    the code did it before the chunking (one all-gather of every token)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from sae_dist.parallel import tp as tpmod
    from sae_dist.parallel.comm import all_gather_cat
    from sae_dist.parallel.mesh import destroy_parallel, init_parallel

    torch.set_num_threads(1)
    ctx = init_parallel(tp=world, device="cpu")
    mine = full[:, rank * GATHER_W:(rank + 1) * GATHER_W].contiguous()
    gathered = []

    def spy(t, group, dim=1):
        out = all_gather_cat(t, group, dim)
        gathered.append((t.shape[0], out.numel() * out.element_size()))
        return out

    tpmod.all_gather_cat = spy
    res = {}
    for cap in GATHER_CAPS:
        tpmod.GATHER_CHUNK_BYTES = tpmod.GATHER_CHUNK_BYTES if cap is None else cap
        gathered.clear()
        res[cap] = {"masks": tpmod.global_keep(mine, ms, ctx.tp_group, ctx.tp, ctx.tp_rank),
                    "gathered": list(gathered)}
    unchunked = keep_from_topk(all_gather_cat(mine, ctx.tp_group), ms, rank * GATHER_W, GATHER_W)
    torch.save({"res": res, "unchunked": [m.clone() for m in unchunked]}, os.path.join(out_dir, f"rank{rank}.pt"))
    destroy_parallel(ctx)


@pytest.mark.usefixtures("worker_forkserver")  # tests/conftest.py
def test_allgather_fallback_is_chunked_and_exact(tmp_path):
    """B % tp != 0: `global_keep` all-gathers the candidates in chunks of tokens. At every chunk size
    the masks equal the unchunked gather bit for bit and the dense global top-m of the [B, n] values;
    every gather holds at most the cap (or one token's row when the cap is below it)."""
    from sae_dist.parallel.tp import GATHER_CHUNK_BYTES, gather_chunk_rows

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    n = GATHER_TP * GATHER_W
    full = torch.randn(GATHER_B, n, generator=g)
    full[::4, 1] = float("-inf")  # AuxK pads: never selected
    ms = (6, 2)  # Multi-TopK-like: the top 6 and the top 2 among them
    mp.start_processes(_gather_worker, args=(GATHER_TP, free_port(), full, ms, str(tmp_path)),
                       nprocs=GATHER_TP, join=True, start_method="forkserver")
    row = GATHER_TP * GATHER_W * 4
    for r in range(GATHER_TP):
        got = torch.load(tmp_path / f"rank{r}.pt")
        lo, hi = r * GATHER_W, (r + 1) * GATHER_W
        for i, m in enumerate(ms):
            dense = torch.zeros(GATHER_B, n, dtype=torch.bool)
            dense.scatter_(1, full.topk(m, dim=1).indices, True)
            assert torch.equal(got["unchunked"][i], dense[:, lo:hi])
            for cap, res in got["res"].items():
                assert res["masks"][i].dtype == torch.bool and res["masks"][i].is_contiguous()
                assert torch.equal(res["masks"][i], got["unchunked"][i]), (cap, m, r)
        for cap, res in got["res"].items():
            c = GATHER_CHUNK_BYTES if cap is None else cap
            rows = gather_chunk_rows(GATHER_B, GATHER_TP, GATHER_W, c)
            assert [t for t, _ in res["gathered"]] == [min(rows, GATHER_B - s) for s in range(0, GATHER_B, rows)]
            assert max(b for _, b in res["gathered"]) <= max(c, row)
        assert len(got["res"][None]["gathered"]) == 1 and len(got["res"][1]["gathered"]) == GATHER_B
        assert [t for t, _ in got["res"][GATHER_CAPS[1]]["gathered"]] == [7, 7, 7, 7, 1]
