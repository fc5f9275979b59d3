"""ActivationStore under tensor parallelism (gloo, 4 and 2 processes): the ranks of a tp group get the batches a
single-process reader of their dp rank gets, bit for bit, in the store's dtype up to the broadcast, while only
the group's first rank reads the store; their positions (state_dict) stay equal; a read error on the reading
rank raises there and, naming it, on the others instead of a hang."""

import datetime

import pytest
import torch
from helpers.dist import free_port

from sae_dist.store import ActivationStore, write_store
from sae_dist.store.layout import dtype_name

N, D, CHUNK, SHARD, B = 1024, 8, 32, 128, 96  # 8 shards; 10 global batches of 96 per epoch
KW = dict(batch_tokens=B, dp_size=2, seed=3, shuffle_shards=2, normalize="layer_norm")


def _store(path, dtype):
    g = torch.Generator().manual_seed(0)
    write_store(path, (3 * torch.randn(N, D, generator=g)).to(dtype), chunk_tokens=CHUNK, shard_tokens=SHARD)
    return path


def _shared_reader_worker(rank, world, port, path, out, steps):
    """Rank r (tp = 2 innermost: dp rank r // 2) reads `steps` batches through a store shared over its tp
    group; its batches, its store reads (`_load_group` calls), its state_dict or its error go to rank<r>.pt."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    groups = [dist.new_group([g, g + 1]) for g in range(0, world, 2)]  # every rank creates every group
    reads, sent = [], []
    real = ActivationStore._load_group
    ActivationStore._load_group = lambda self, units: reads.append(len(units)) or real(self, units)
    real_bcast = dist.broadcast
    dist.broadcast = lambda t, *a, **kw: sent.append(t.numel() * t.element_size()) or real_bcast(t, *a, **kw)
    st = ActivationStore(path, dp_rank=rank // 2, **{**KW, "dp_size": world // 2}, share_group=groups[rank // 2],
                         share_src=rank - rank % 2)
    got = {"xs": []}
    try:
        for _ in range(steps):
            got["xs"].append(next(st))
    except Exception as e:  # noqa: BLE001 (the test checks it)
        got["error"] = f"{type(e).__name__}: {e}"
    got.update(state=st.state_dict(), reads=len(reads), computes=st.computes, broadcast_bytes=sent)
    st.close()
    torch.save(got, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _run(path, out, world, steps):
    import torch.multiprocessing as mp

    mp.start_processes(_shared_reader_worker, args=(world, free_port(), str(path), str(out), steps), nprocs=world,
                       join=True, start_method="forkserver")
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.mark.usefixtures("worker_forkserver")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_tp_group_reads_the_store_once_and_gets_its_dp_ranks_batches(tmp_path, dtype):
    path = _store(tmp_path / "s", dtype)
    steps = 13  # past the end of the first epoch
    ranks = _run(path, tmp_path, 4, steps)
    for r, got in enumerate(ranks):
        assert "error" not in got, got.get("error")
        with ActivationStore(path, dp_rank=r // 2, **KW) as ref:  # one process, no group
            want = [next(ref) for _ in range(steps)]
            assert got["state"] == ref.state_dict()
        assert len(got["xs"]) == steps
        for a, b in zip(got["xs"], want, strict=True):
            assert a.dtype == torch.float32 and torch.equal(a, b)
        assert got["computes"] == (r % 2 == 0)
        assert (got["reads"] > 0) == (r % 2 == 0), (r, got["reads"])  # the other tp rank reads nothing
    assert not torch.equal(ranks[0]["xs"][0], ranks[2]["xs"][0])  # two dp ranks: different rows
    # what sae-plan counts for it: per step a 4-byte status, then the [B/dp, d] batch in the store's dtype
    from sae_dist.plan import plan

    r = plan(d_in=D, d_sae=64, k=4, batch_tokens=B, tp=2, cluster={"nodes": 1, "gpus_per_node": 4},
             store_dtype=dtype_name(dtype),
             suggest=False)
    planned = {c["name"]: c["size_bytes"] for c in r["comm"]}
    for got in ranks:
        assert got["broadcast_bytes"] == [planned["batch_status_broadcast"], planned["batch_broadcast"]] * steps


@pytest.mark.usefixtures("worker_forkserver")
def test_a_read_error_on_the_reading_rank_stops_its_whole_group(tmp_path):
    path = _store(tmp_path / "s", torch.float16)
    shard = path / "activations" / "c" / "4" / "0"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated: the read of the group holding it fails
    r0, r1 = _run(path, tmp_path, 2, 12)
    assert r0["error"].startswith("StoreError: ") and "shard 4" in r0["error"] and str(shard) in r0["error"]
    assert r1["error"] == (f"RuntimeError: reading a batch of store {str(path)!r} failed on global rank 0, which "
                           "produces it for this rank's group (share_group): see that rank's error")
    assert len(r0["xs"]) == len(r1["xs"]) and r0["state"] == r1["state"]  # stopped at the same batch
