"""Activation-store layout: write/read round trips, on-disk sharding, idempotent create, markers, finalize."""

import json
import math
import os
import threading

import ml_dtypes
import numpy as np
import pytest
import torch
import zarr

from sae_dist.store import (
    NonFiniteError,
    StoreError,
    create_store,
    done_shards,
    finalize_store,
    mark_shard_done,
    merge_norm_stats,
    norm_stats_partial,
    open_store,
    read_attrs,
    write_block,
    write_store,
)


def _bits(a):
    """Raw bit patterns of a numpy / torch float array (for bit-exact comparisons)."""
    if isinstance(a, torch.Tensor):
        return a.view({2: torch.int16, 4: torch.int32}[a.element_size()]).numpy()
    return a.view({2: np.int16, 4: np.int32}[a.dtype.itemsize])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_round_trip_bit_exact(tmp_path, dtype, kind):
    rng = np.random.default_rng(np.random.randint(2**31))
    n, d = 1000, 24  # n not a multiple of the shard size
    x = torch.from_numpy(rng.standard_normal((n, d), dtype=np.float32) * 3).to(getattr(torch, dtype))
    if kind == "numpy":
        x = x.float().numpy().astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    tok = rng.integers(0, 50_000, n)
    seq = np.arange(n) // 7
    pos = np.arange(n) % 7 + 1
    p = write_store(tmp_path / "s.zarr", x, tok, attrs={"model": "m", "hook_name": "h", "extra": [1, 2]},
                    chunk_tokens=64, shard_tokens=256, seq_index=seq, position=pos)
    g = open_store(p)
    y = g["activations"][:]
    assert y.shape == (n, d)
    assert str(y.dtype) == dtype
    np.testing.assert_array_equal(_bits(y), _bits(x))
    np.testing.assert_array_equal(g["token_ids"][:], tok)
    assert g["token_ids"].dtype == np.int32 and g["seq_index"].dtype == np.int64 and g["position"].dtype == np.int32
    np.testing.assert_array_equal(g["seq_index"][:], seq)
    np.testing.assert_array_equal(g["position"][:], pos)
    a = dict(g.attrs)
    assert a["dtype"] == dtype and a["d_in"] == d and a["n_tokens"] == n
    assert a["harvest"]["complete"] is True
    assert a["model"] == "m" and a["hook_name"] == "h" and a["extra"] == [1, 2]
    # the names of earlier releases are still written for one release; read_attrs gives today's only
    assert a["d_model"] == d and a["hook"] == "h"
    r = read_attrs(g)
    assert r["d_in"] == d and r["hook_name"] == "h" and "d_model" not in r and "hook" not in r
    for key in ("layer", "ctx_len", "dataset"):
        assert key in a
    # norm_stats against numpy in float64
    xf = y.astype(np.float64)
    norms = np.sqrt((xf ** 2).sum(1))
    assert a["norm_stats"]["n"] == n
    assert a["norm_stats"]["mean_norm"] == pytest.approx(norms.mean(), rel=1e-12)
    assert a["norm_stats"]["mean_sq_norm"] == pytest.approx((norms ** 2).mean(), rel=1e-12)
    # the on-disk data type name
    meta = json.loads((tmp_path / "s.zarr" / "activations" / "zarr.json").read_text())
    assert meta["data_type"] == dtype


def test_bfloat16_cast_matches_torch(tmp_path):
    x = torch.randn(300, 16) * 100
    write_store(tmp_path / "s", x, dtype="bfloat16", chunk_tokens=32, shard_tokens=128)
    y = open_store(tmp_path / "s")["activations"][:]
    np.testing.assert_array_equal(_bits(y), _bits(x.to(torch.bfloat16)))


def test_chunk_and_shard_grid_on_disk(tmp_path):
    n, d, chunk, shard = 1000, 12, 32, 256
    x = np.random.default_rng(np.random.randint(2**31)).standard_normal((n, d)).astype(np.float16)
    write_store(tmp_path / "s", x, np.arange(n), chunk_tokens=chunk, shard_tokens=shard)
    meta = json.loads((tmp_path / "s" / "activations" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [shard, d]
    (codec,) = meta["codecs"]
    assert codec["name"] == "sharding_indexed"
    assert codec["configuration"]["chunk_shape"] == [chunk, d]
    # one file per shard: activations/c/<i>/0
    n_shards = math.ceil(n / shard)
    cdir = tmp_path / "s" / "activations" / "c"
    assert sorted(int(p) for p in os.listdir(cdir)) == list(range(n_shards))
    for i in range(n_shards):
        assert os.listdir(cdir / str(i)) == ["0"]
    # closed-form size of a full shard: chunks * (chunk*d*2 bytes + 4 crc) + index (16 B/chunk + 4 crc)
    k = shard // chunk
    assert os.path.getsize(cdir / "0" / "0") == k * (chunk * d * 2 + 4) + 16 * k + 4
    tok_meta = json.loads((tmp_path / "s" / "token_ids" / "zarr.json").read_text())
    assert tok_meta["chunk_grid"]["configuration"]["chunk_shape"] == [shard]
    assert tok_meta["codecs"][0]["configuration"]["chunk_shape"] == [chunk]


def test_all_zero_shard_file_exists(tmp_path):
    # write_empty_chunks: a shard of zeros is still written, so a missing file means a missing shard
    g = create_store(tmp_path / "s", n_tokens=512, d_in=4, dtype="float32", chunk_tokens=64,
                     shard_tokens=256, attrs={}, with_text_arrays=False)
    write_block(g, 0, np.zeros((256, 4), np.float32))
    assert os.path.isfile(tmp_path / "s" / "activations" / "c" / "0" / "0")


def test_create_idempotent_and_mismatch(tmp_path):
    p = tmp_path / "s"
    kw = dict(n_tokens=2048, d_in=16, dtype="bfloat16", chunk_tokens=128, shard_tokens=512,
              attrs={"model": "tiny", "hook_name": "blocks.1.hook_resid_post", "layer": 1})
    g1 = create_store(p, **kw)
    write_block(g1, 0, torch.ones(512, 16), token_ids=torch.arange(512))
    g2 = create_store(p, **kw)  # returns the existing store, keeps data
    assert g2["activations"].shape == (2048, 16)
    assert float(g2["activations"][3, 3]) == 1.0
    assert g2.attrs["harvest"]["complete"] is False
    with pytest.raises(StoreError) as e:
        create_store(p, **{**kw, "dtype": "float16"})
    assert "'bfloat16'" in str(e.value) and "'float16'" in str(e.value)
    with pytest.raises(StoreError) as e:
        create_store(p, **{**kw, "shard_tokens": 1024})
    assert "512" in str(e.value) and "1024" in str(e.value)
    with pytest.raises(StoreError) as e:
        create_store(p, **{**kw, "attrs": {"hook_name": "blocks.0.hook_resid_post"}})
    assert "blocks.0.hook_resid_post" in str(e.value) and "blocks.1.hook_resid_post" in str(e.value)
    with pytest.raises(ValueError, match="multiple of chunk_tokens"):
        create_store(tmp_path / "t", **{**kw, "chunk_tokens": 100})
    with pytest.raises(ValueError, match="bfloat8"):
        create_store(tmp_path / "t", **{**kw, "dtype": "bfloat8"})


def test_create_into_empty_directory(tmp_path):
    (tmp_path / "s").mkdir()
    g = create_store(tmp_path / "s", n_tokens=64, d_in=4, dtype="float16", chunk_tokens=16,
                     shard_tokens=32, attrs={"model": "m"})
    assert g["activations"].shape == (64, 4) and g.attrs["model"] == "m"


def test_concurrent_create(tmp_path):
    p = tmp_path / "s"
    kw = dict(n_tokens=4096, d_in=8, dtype="float16", chunk_tokens=256, shard_tokens=1024, attrs={"x": 1})
    errors, barrier = [], threading.Barrier(4)

    def work():
        try:
            barrier.wait()
            create_store(p, **kw)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert errors == []
    assert sorted(os.listdir(tmp_path)) == ["s"]  # no temporary directories left
    assert open_store(p)["activations"].shape == (4096, 8)


def test_write_block_validation(tmp_path):
    g = create_store(tmp_path / "s", n_tokens=100, d_in=4, dtype="float32", chunk_tokens=16,
                     shard_tokens=32, attrs={}, with_text_arrays=False)
    with pytest.raises(ValueError, match=r"\[m, d_in=4\]"):
        write_block(g, 0, np.zeros((10, 5), np.float32))
    with pytest.raises(ValueError, match="exceed"):
        write_block(g, 95, np.zeros((10, 4), np.float32))
    with pytest.raises(StoreError, match="token_ids"):
        write_block(g, 0, np.zeros((10, 4), np.float32), token_ids=np.arange(10))
    write_block(str(tmp_path / "s"), 32, np.full((32, 4), 2.5, np.float64))  # path + float64 input
    np.testing.assert_array_equal(open_store(tmp_path / "s")["activations"][32:64], 2.5)


def test_progress_markers(tmp_path):
    p = tmp_path / "s"
    assert done_shards(p) == {}
    mark_shard_done(p, 12, {"n_tokens": 256, "rank": 3})
    mark_shard_done(p, 0, {"n_tokens": 256})
    mark_shard_done(p, 12, {"n_tokens": 100})  # rewrite replaces
    assert done_shards(p) == {0: {"n_tokens": 256}, 12: {"n_tokens": 100}}
    assert sorted(os.listdir(p / "_progress")) == ["shard_00000000.json", "shard_00000012.json"]
    # a half-written temp file from a killed writer is not a marker
    (p / "_progress" / "shard_00000005.json.tmp-1-abc").write_text("{")
    assert set(done_shards(p)) == {0, 12}


def test_finalize_trims_and_merges(tmp_path):
    p = tmp_path / "s"
    rng = np.random.default_rng(np.random.randint(2**31))
    n_alloc, d, shard = 1024, 8, 256
    g = create_store(p, n_tokens=n_alloc, d_in=d, dtype="float32", chunk_tokens=64, shard_tokens=shard,
                     attrs={"model": "m", "ctx_len": 17})
    data = rng.standard_normal((700, d)).astype(np.float32)
    for s in range(0, 700, shard):
        blk = data[s : s + shard]
        write_block(g, s, blk, token_ids=np.arange(s, s + len(blk)), seq_index=np.zeros(len(blk)),
                    position=np.ones(len(blk)))
        mark_shard_done(p, s // shard, {"n_tokens": len(blk), "norm_stats": norm_stats_partial(blk)})
    finalize_store(p, 700, {"dataset": "stdlib", "harvest": {"workers": 2}})
    g = open_store(p)
    for name in ("activations", "token_ids", "seq_index", "position"):
        assert g[name].shape[0] == 700
    np.testing.assert_array_equal(g["activations"][:], data)
    a = dict(g.attrs)
    assert a["n_tokens"] == 700 and a["dataset"] == "stdlib" and a["model"] == "m" and a["ctx_len"] == 17
    assert a["harvest"]["complete"] is True and a["harvest"]["workers"] == 2
    norms = np.linalg.norm(data.astype(np.float64), axis=1)
    assert a["norm_stats"]["n"] == 700
    assert a["norm_stats"]["mean_norm"] == pytest.approx(norms.mean(), rel=1e-12)
    assert a["norm_stats"]["mean_sq_norm"] == pytest.approx((norms ** 2).mean(), rel=1e-12)
    finalize_store(p, 700, {"dataset": "stdlib", "harvest": {"workers": 2}})  # idempotent
    assert dict(open_store(p).attrs) == a
    # resuming the harvest command on a finished, trimmed store is accepted
    create_store(p, n_tokens=n_alloc, d_in=d, dtype="float32", chunk_tokens=64, shard_tokens=shard,
                 attrs={"model": "m"})
    with pytest.raises(StoreError, match="n_tokens=2000"):
        finalize_store(p, 2000, {})


def test_finalize_computes_norm_stats_without_markers(tmp_path):
    p = tmp_path / "s"
    x = np.random.default_rng(np.random.randint(2**31)).standard_normal((300, 5)).astype(np.float16)
    g = create_store(p, n_tokens=512, d_in=5, dtype="float16", chunk_tokens=64, shard_tokens=128, attrs={})
    write_block(g, 0, x)
    finalize_store(p, 300, {})
    ns = open_store(p).attrs["norm_stats"]
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    assert ns["n"] == 300 and ns["mean_norm"] == pytest.approx(norms.mean(), rel=1e-12)


def test_norm_stats_partial_and_merge():
    rng = np.random.default_rng(np.random.randint(2**31))
    x = rng.standard_normal((5000, 33)) * rng.uniform(0.1, 10, (5000, 1))
    norms = np.sqrt((x ** 2).sum(1))
    parts = [norm_stats_partial(x[:1234]), norm_stats_partial(torch.from_numpy(x[1234:4000])),
             norm_stats_partial(x[4000:4000]), norm_stats_partial(x[4000:])]
    m = merge_norm_stats(parts)
    assert m["n"] == 5000
    assert m["mean_norm"] == pytest.approx(norms.mean(), rel=1e-12)
    assert m["mean_sq_norm"] == pytest.approx((norms ** 2).mean(), rel=1e-12)
    assert merge_norm_stats([]) == {"mean_norm": 0.0, "mean_sq_norm": 0.0, "n": 0}


def test_write_store_rejects_bad_input(tmp_path):
    x = np.random.default_rng(np.random.randint(2**31)).standard_normal((500, 4)).astype(np.float32)
    x[321, 2] = np.nan
    with pytest.raises(NonFiniteError, match="row 321"):
        write_store(tmp_path / "nan", x, chunk_tokens=16, shard_tokens=64)
    assert not os.path.exists(tmp_path / "nan")
    y = torch.randn(100, 4)
    y[77, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="row 77"):
        write_store(tmp_path / "inf", y)
    with pytest.raises(ValueError, match=r"\[n_tokens, d_in\]"):
        write_store(tmp_path / "a", np.zeros(10, np.float32))
    with pytest.raises(ValueError, match=r"token_ids must have shape \[100\]"):
        write_store(tmp_path / "b", torch.randn(100, 4), token_ids=np.arange(99))
    with pytest.raises(ValueError, match="float"):
        write_store(tmp_path / "c", np.zeros((10, 4), np.int64))
    # overwrite replaces a store, never a foreign directory
    p = write_store(tmp_path / "d", torch.ones(10, 4))
    write_store(p, torch.full((20, 4), 2.0))
    assert open_store(p)["activations"].shape == (20, 4)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("x")
    with pytest.raises(StoreError, match="refusing"):
        write_store(tmp_path / "foreign", torch.ones(10, 4))
    assert (tmp_path / "foreign" / "keep.txt").exists()


def test_open_store_errors(tmp_path):
    with pytest.raises(StoreError, match="does not exist") as e:
        open_store(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    (tmp_path / "dir").mkdir()
    with pytest.raises(StoreError, match="not an activation store"):
        open_store(tmp_path / "dir")
    zarr.open_group(tmp_path / "g", mode="w")
    with pytest.raises(StoreError, match="no 'activations' array"):
        open_store(tmp_path / "g")
