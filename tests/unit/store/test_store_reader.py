"""ActivationStore: epoch coverage, seeded order, dp split, exact resume, errors, normalisation, prefetch."""

import math
import threading

import numpy as np
import pytest
import torch
import zarr

from sae_dist.store import (
    ActivationStore,
    IncompleteStoreError,
    NonFiniteError,
    StoreError,
    create_store,
    mark_shard_done,
    open_store,
    write_block,
    write_store,
)

N, D, CHUNK, SHARD = 1100, 6, 32, 128  # 9 shards, the last one partial


def _id_store(path, n=N, dtype=torch.float32):
    """Store whose row i has x[i, 0] = i (exact in float32) and random other columns."""
    x = torch.randn(n, D)
    x[:, 0] = torch.arange(n, dtype=torch.float32)
    write_store(path, x.to(dtype), chunk_tokens=CHUNK, shard_tokens=SHARD)
    return x


def _ids(batch):
    return batch[:, 0].round().long().numpy()


def _naive_epoch_rows(seed, epoch, n, unit, per_group):
    """Independent re-implementation of the documented order (reader module docstring): read units of `unit`
    rows (an inner chunk; a shard in order version 1), `per_group` of them per shuffle group. The store's
    shards are whole chunks, so the units are rows [u * unit, (u + 1) * unit) cut at n."""
    n_units = math.ceil(n / unit)
    order = np.random.default_rng([seed, epoch, 0]).permutation(n_units)
    stream = []
    for g, i in enumerate(range(0, n_units, per_group)):
        rows = np.concatenate([np.arange(u * unit, min((u + 1) * unit, n)) for u in order[i : i + per_group]])
        stream.append(rows[np.random.default_rng([seed, epoch, 1, g]).permutation(len(rows))])
    return np.concatenate(stream)


def test_epoch_covers_every_row_once_and_matches_documented_order(tmp_path):
    _id_store(tmp_path / "s")
    B, seed = 100, int(np.random.default_rng(np.random.randint(2**31)).integers(1 << 30))
    with ActivationStore(tmp_path / "s", batch_tokens=B, seed=seed, shuffle_shards=3, normalize="none") as st:
        assert st.batches_per_epoch == N // B == 11 and st.tokens_per_epoch == N
        epochs = [np.concatenate([_ids(next(st)) for _ in range(st.batches_per_epoch)]) for _ in range(2)]
        assert st.epoch == 2 and st.batch_index == 0
    for e, seen in enumerate(epochs):
        assert len(np.unique(seen)) == len(seen) == N // B * B  # no repeats; only the tail is dropped
        np.testing.assert_array_equal(seen, _naive_epoch_rows(seed, e, N, CHUNK, 3 * SHARD // CHUNK)[: N // B * B])
    assert not np.array_equal(epochs[0], epochs[1])
    assert sorted(epochs[0][:128]) != list(range(128))  # rows really shuffled


def test_no_shuffle_is_store_order_and_batches_straddle_tail(tmp_path):
    _id_store(tmp_path / "s")
    with ActivationStore(tmp_path / "s", batch_tokens=300, shuffle=False, normalize="none", prefetch=0) as st:
        got = [_ids(next(st)) for _ in range(4)]
    np.testing.assert_array_equal(np.concatenate(got[:3]), np.arange(900))  # rows 900..1099 dropped
    np.testing.assert_array_equal(got[3], np.arange(300))  # next epoch


@pytest.mark.parametrize("dp_size", [2, 4])
def test_dp_ranks_disjoint_and_union_is_global_batch(tmp_path, dp_size):
    _id_store(tmp_path / "s")
    B = 120
    kw = dict(batch_tokens=B, seed=7, shuffle_shards=2, normalize="none")
    with ActivationStore(tmp_path / "s", **kw) as st:
        glob = [_ids(next(st)) for _ in range(12)]  # crosses an epoch boundary (9 batches/epoch)
    ranks = [ActivationStore(tmp_path / "s", dp_rank=r, dp_size=dp_size, **kw) for r in range(dp_size)]
    for j in range(12):
        parts = [_ids(next(s)) for s in ranks]
        assert all(len(p) == B // dp_size for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), glob[j])
        assert len(np.unique(np.concatenate(parts))) == B
    for s in ranks:
        s.close()
    with pytest.raises(ValueError, match="not divisible by dp_size=4"):
        ActivationStore(tmp_path / "s", batch_tokens=122, dp_size=4)


@pytest.mark.parametrize("k", [3, 10])  # mid-epoch and just after an epoch boundary
def test_resume_is_exact(tmp_path, k):
    _id_store(tmp_path / "s")
    kw = dict(batch_tokens=96, seed=11, shuffle_shards=2, normalize="layer_norm")
    with ActivationStore(tmp_path / "s", **kw) as st:
        ref = [next(st) for _ in range(k + 5)]
    a = ActivationStore(tmp_path / "s", **kw)
    for _ in range(k):
        next(a)
    state = a.state_dict()
    a.close()
    assert state["epoch"] * a.batches_per_epoch + state["batch"] == k
    b = ActivationStore(tmp_path / "s", **kw)
    b.load_state_dict(state)
    for j in range(5):
        assert torch.equal(next(b), ref[k + j])
    b.close()
    # resuming at another dp size gives that rank's part of the same global batch
    c = ActivationStore(tmp_path / "s", dp_rank=1, dp_size=2, **kw)
    c.load_state_dict(state)
    assert torch.equal(next(c), ref[k][48:])
    c.close()
    with pytest.raises(ValueError, match="seed"):
        ActivationStore(tmp_path / "s", **{**kw, "seed": 12}).load_state_dict(state)


def test_a_state_of_the_shard_order_resumes_in_that_order(tmp_path):
    """A reader state of order version 1 (whole shards as the read unit, before inner chunks) continues a
    run in that order; the current order is version 2."""
    _id_store(tmp_path / "s")
    kw = dict(batch_tokens=100, seed=5, shuffle_shards=2, normalize="none")
    with ActivationStore(tmp_path / "s", **kw) as st:
        state = st.state_dict()
        assert state["version"] == 2
        next(st)
    st = ActivationStore(tmp_path / "s", **kw)
    st.load_state_dict({**state, "version": 1, "batch": 3})
    got = np.concatenate([_ids(next(st)) for _ in range(2)])
    assert st.state_dict()["version"] == 1
    st.close()
    np.testing.assert_array_equal(got, _naive_epoch_rows(5, 0, N, SHARD, 2)[300:500])
    with pytest.raises(ValueError, match="version 3 is newer"):
        ActivationStore(tmp_path / "s", **kw).load_state_dict({**state, "version": 3})


def test_corrupt_and_missing_shard_errors_name_the_shard(tmp_path):
    _id_store(tmp_path / "s", dtype=torch.float16)
    f = tmp_path / "s" / "activations" / "c" / "4" / "0"
    good = f.read_bytes()
    kw = dict(batch_tokens=100, shuffle=False, normalize="none")

    def first_error():
        with ActivationStore(tmp_path / "s", **kw) as st:
            with pytest.raises(StoreError) as e:
                for _ in range(st.batches_per_epoch):
                    next(st)
        return str(e.value)

    for bad in (good[: len(good) // 2], np.random.bytes(len(good)), good[:100] + bytes(len(good) - 100)):
        f.write_bytes(bad)
        msg = first_error()
        assert "shard 4" in msg and str(f) in msg and "[512, 640)" in msg and "corrupt" in msg
        assert "sae-harvest" in msg
    f.unlink()
    msg = first_error()
    assert "shard 4" in msg and "missing" in msg and str(f) in msg


def test_nonfinite_error_names_rows_and_chunk(tmp_path):
    _id_store(tmp_path / "s")
    row = int(np.random.default_rng(np.random.randint(2**31)).integers(200, 1000))
    a = open_store(tmp_path / "s", "r+")["activations"]
    v = a[row : row + 1]
    v[0, 3] = np.inf
    a[row : row + 1] = v
    c0 = row // CHUNK * CHUNK
    with ActivationStore(tmp_path / "s", batch_tokens=100, seed=3, normalize="none") as st:
        with pytest.raises(NonFiniteError) as e:
            for _ in range(st.batches_per_epoch):
                next(st)
    msg = str(e.value)
    assert f"token row {row}" in msg and f"chunk rows [{c0}, {c0 + CHUNK})" in msg and f"shard {row // SHARD}" in msg
    with ActivationStore(tmp_path / "s", batch_tokens=100, seed=3, normalize="none", check_finite=False) as st:
        seen = np.concatenate([next(st).numpy() for _ in range(st.batches_per_epoch)])
    assert np.isinf(seen).sum() == (1 if row in _naive_epoch_rows(3, 0, N, SHARD, 4)[:1100] else 0)


def test_store_errors(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        ActivationStore(tmp_path / "missing", batch_tokens=8)
    (tmp_path / "notastore").mkdir()
    with pytest.raises(StoreError, match="not an activation store"):
        ActivationStore(tmp_path / "notastore", batch_tokens=8)
    _id_store(tmp_path / "s", n=300)
    with pytest.raises(ValueError, match="exceeds the 300 tokens"):
        ActivationStore(tmp_path / "s", batch_tokens=301)
    with pytest.raises(ValueError, match="valid modes"):
        ActivationStore(tmp_path / "s", batch_tokens=8, normalize="bogus")


def test_incomplete_store(tmp_path):
    p = tmp_path / "s"
    g = create_store(p, n_tokens=1024, d_in=D, dtype="float32", chunk_tokens=CHUNK, shard_tokens=256, attrs={})
    x = torch.randn(1024, D)
    x[:, 0] = torch.arange(1024, dtype=torch.float32)
    for s in (1, 3):
        write_block(g, s * 256, x[s * 256 : (s + 1) * 256])
        mark_shard_done(p, s, {"n_tokens": 256})
    with pytest.raises(IncompleteStoreError) as e:
        ActivationStore(p, batch_tokens=64)
    assert "unfinished" in str(e.value) and "sae-harvest" in str(e.value) and "allow_incomplete" in str(e.value)
    with ActivationStore(p, batch_tokens=64, allow_incomplete=True, normalize="none") as st:
        assert st.tokens_per_epoch == 512
        seen = np.concatenate([_ids(next(st)) for _ in range(st.batches_per_epoch)])
    np.testing.assert_array_equal(np.sort(seen), np.r_[256:512, 768:1024])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_normalised_batches_match_numpy(tmp_path, dtype):
    x = _id_store(tmp_path / "s", dtype=dtype).to(dtype)
    ref = x.float().numpy().astype(np.float64)  # exactly what is stored, widened
    with ActivationStore(tmp_path / "s", batch_tokens=64, seed=5, normalize="none") as st:
        rows = [st.global_batch_rows(0, j) for j in range(3)]
        raw = [next(st) for _ in range(3)]
    for r, b in zip(rows, raw, strict=True):
        assert b.dtype == torch.float32 and b.shape == (64, D)
        np.testing.assert_array_equal(b.numpy(), ref[r])
    with ActivationStore(tmp_path / "s", batch_tokens=64, seed=5, normalize="layer_norm") as st:
        ln = [next(st) for _ in range(3)]
    for r, b in zip(rows, ln, strict=True):
        c = ref[r] - ref[r].mean(1, keepdims=True)
        np.testing.assert_allclose(b.numpy(), c / np.linalg.norm(c, axis=1, keepdims=True) * math.sqrt(D),
                                   rtol=1e-4, atol=1e-5)
    with ActivationStore(tmp_path / "s", batch_tokens=64, seed=5, normalize="scalar") as st:
        sc = [next(st) for _ in range(3)]
        s = math.sqrt(D) / np.linalg.norm(ref, axis=1).mean()
        assert st.scale == pytest.approx(s, rel=1e-9)
    for r, b in zip(rows, sc, strict=True):
        np.testing.assert_allclose(b.numpy(), ref[r] * s, rtol=1e-6)


def test_prefetch_thread_exception_surfaces_and_close(tmp_path, monkeypatch):
    _id_store(tmp_path / "s")
    st = ActivationStore(tmp_path / "s", batch_tokens=100, prefetch=3)
    next(st)
    thread = st._thread
    assert thread is not None and thread.daemon and thread.is_alive()
    st.close()
    assert not thread.is_alive()

    class Boom(RuntimeError):
        pass

    calls = []

    def broken(self, u, out=None):
        calls.append(u)
        if len(calls) > 2:
            raise Boom(f"disk on fire reading unit {u}")
        return orig(self, u, out)

    orig = ActivationStore._read_unit
    monkeypatch.setattr(ActivationStore, "_read_unit", broken)
    st = ActivationStore(tmp_path / "s", batch_tokens=100, shuffle_shards=2, prefetch=2)
    with pytest.raises(Boom, match="disk on fire"):
        for _ in range(20):
            next(st)
    assert st._thread is None  # the failed thread was cleaned up
    assert not any(t.name.startswith("ActivationStore-prefetch") and t.is_alive() for t in threading.enumerate())


def test_store_written_by_plain_zarr_is_accepted(tmp_path):
    # CONTRACT: any tool writing the layout (here plain zarr, no harvest attribute) gives a usable store
    x = np.random.default_rng(np.random.randint(2**31)).standard_normal((700, D)).astype(np.float32)
    x[:, 0] = np.arange(700)
    g = zarr.open_group(tmp_path / "other.zarr", mode="w", zarr_format=3)
    g.attrs.update({"d_in": D, "n_tokens": 700, "dtype": "float32", "model": "m", "hook_name": "h"})
    a = g.create_array("activations", shape=x.shape, dtype="float32", chunks=(50, D), shards=(100, D))
    a[:] = x
    with ActivationStore(tmp_path / "other.zarr", batch_tokens=70, seed=1, normalize="none") as st:
        assert st.shard_tokens == 100 and st.chunk_tokens == 50
        seen = np.concatenate([_ids(next(st)) for _ in range(st.batches_per_epoch)])
    np.testing.assert_array_equal(np.sort(seen), np.arange(700))


def test_store_of_an_earlier_release_reads_old_attribute_names(tmp_path):
    # stores written before the rename carry d_model / hook: read as d_in / hook_name, with a FutureWarning
    x = np.random.default_rng(np.random.randint(2**31)).standard_normal((200, D)).astype(np.float32)
    g = zarr.open_group(tmp_path / "old.zarr", mode="w", zarr_format=3)
    g.attrs.update({"d_model": D, "n_tokens": 200, "dtype": "float32", "model": "m", "hook": "blocks.0.hook_mlp_out"})
    g.create_array("activations", shape=x.shape, dtype="float32", chunks=(50, D), shards=(100, D))[:] = x
    with pytest.warns(FutureWarning, match=r"\['d_model', 'hook'\].*\['d_in', 'hook_name'\]"):
        st = ActivationStore(tmp_path / "old.zarr", batch_tokens=50, seed=0, normalize="none")
    with st:
        assert st.attrs["d_in"] == D and st.attrs["hook_name"] == "blocks.0.hook_mlp_out"
        assert "d_model" not in st.attrs and "hook" not in st.attrs and st.d_in == D
    assert dict(zarr.open_group(tmp_path / "old.zarr", mode="r").attrs)["d_model"] == D  # the store is untouched


def test_scalar_mode_without_norm_stats_computes_them(tmp_path):
    x = np.random.default_rng(np.random.randint(2**31)).standard_normal((400, D)).astype(np.float32) * 3
    g = zarr.open_group(tmp_path / "o.zarr", mode="w", zarr_format=3)
    g.create_array("activations", shape=x.shape, dtype="float32", chunks=(100, D), shards=(200, D))[:] = x
    with pytest.warns(UserWarning, match="norm_stats"):
        st = ActivationStore(tmp_path / "o.zarr", batch_tokens=100, normalize="scalar")
    assert st.scale == pytest.approx(math.sqrt(D) / np.linalg.norm(x.astype(np.float64), axis=1).mean(), rel=1e-9)
    st.close()


def _document_store(path, n_shards: int, row_order: str, seed: int = 0) -> np.ndarray:
    """A store laid out as sae-harvest lays one out in `row_order`: sequences of 63 rows, 64 to a shard, inner
    chunks of 8; documents of 1 to 20 sequences; column 0 holds each row's document. Returns the rows per
    document."""
    from sae_dist.harvest.harvester import sequence_order, shard_row_permutation

    body, per_shard = 63, 64 * 63
    lens = np.random.default_rng(seed).integers(1, 21, size=n_shards * 64)
    seq_doc = np.repeat(np.arange(len(lens)), lens)[: n_shards * 64]
    if row_order == "shuffled_global":
        seq_doc = seq_doc[sequence_order(len(seq_doc))]
    doc = np.repeat(seq_doc, body)
    if row_order != "text":
        for s in range(n_shards):
            doc[s * per_shard : (s + 1) * per_shard] = doc[s * per_shard : (s + 1) * per_shard][
                shard_row_permutation(s, per_shard)]
    write_store(path, np.stack([doc, np.zeros_like(doc)], 1).astype(np.float32), chunk_tokens=8 * body,
                shard_tokens=per_shard)
    return np.bincount(doc)


def _same_document_ratio(path, rows_per_doc: np.ndarray, version: int, shuffle_shards: int = 8) -> float:
    """Mean over an epoch's batches of 4096 rows of the fraction of row pairs from one document, over the
    same fraction's expectation for a uniform sample of the store; the reader order `version` (state)."""
    n = int(rows_per_doc.sum())
    uniform = float((rows_per_doc * (rows_per_doc - 1)).sum()) / (n * (n - 1))
    with ActivationStore(path, batch_tokens=4096, seed=0, shuffle_shards=shuffle_shards, normalize="none") as st:
        st.load_state_dict({**st.state_dict(), "version": version})
        rates = []
        for _ in range(st.batches_per_epoch):
            k = np.bincount(_ids(next(st)))
            rates.append((k * (k - 1)).sum() / (4096 * 4095))
    return float(np.mean(rates)) / uniform


def test_batches_mix_documents_about_as_a_uniform_sample_does(tmp_path):
    """A 129,024-row harvest-like store (32 shards, documents of 63 to 1,260 rows) read with a buffer of 8
    shards' worth of rows: with rows shuffled within shards and random inner chunks, a batch holds pairs of
    rows of one document at most 2x as often as a uniform sample (the model in the reader's docstring:
    1 + N / (W G) = 1.5); the earlier layout (text order, whole shards) 3x or more."""
    rows = _document_store(tmp_path / "shuffled", 32, "shuffled_in_shard")
    assert _same_document_ratio(tmp_path / "shuffled", rows, 2) <= 2.0
    rows = _document_store(tmp_path / "text", 32, "text")
    assert _same_document_ratio(tmp_path / "text", rows, 1) >= 3.0


def test_a_global_sequence_order_mixes_documents_with_a_small_buffer(tmp_path):
    """The same store read with a buffer of one shard's worth of rows (G = 8 chunks), so that the store is 32
    buffers: sequences spread over the shards by the harvest's global permutation (row_order shuffled_global)
    keep the same-document rate within 2x of a uniform sample (model: 1 + N / (c W G) with c = 13.7 the
    length-weighted mean document length in sequences, 1.3), while rows shuffled only within their shard give
    3x or more (model 1 + N / (W G) = 5)."""
    rows = _document_store(tmp_path / "global", 32, "shuffled_global")
    glob = _same_document_ratio(tmp_path / "global", rows, 2, shuffle_shards=1)
    rows = _document_store(tmp_path / "in_shard", 32, "shuffled_in_shard")
    in_shard = _same_document_ratio(tmp_path / "in_shard", rows, 2, shuffle_shards=1)
    assert glob <= 2.0 and in_shard >= 3.0
