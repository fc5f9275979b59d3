"""The harvester in this process on the tiny LM + tiny corpus: values, layout, attrs, float16/bfloat16
rounding, two workers (run one after the other) against one, exhaustion, several hooks from one forward,
non-finite activations, bad arguments. A harvest killed mid-run then resumed and two worker processes
meeting at a gloo barrier: tests/integration/harvest/test_harvest_processes.py."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from helpers.harvest import BODY, CTX, EVAL, HOOK, SMALL, assert_same_store, read_store, run_harvest
from helpers.synthetic import tiny_corpus

from sae_dist.harvest import HarvestError, packed_sequences, run_to_hook, splice_hook
from sae_dist.harvest.harvester import shard_row_permutation
from sae_dist.store import StoreError


def test_harvest_values_layout_and_attrs(lm, tmp_path):
    model, tok = lm
    docs = tiny_corpus()
    tokens = 2000 + int(np.random.randint(0, 1000))
    out = run_harvest(lm, tmp_path / "s", docs, tokens, dtype="float32")
    n_seqs = -(-tokens // BODY)
    n = n_seqs * BODY
    assert out["complete"] and out["n_tokens"] == n and out["tokens_written"] == n
    assert out["shards_written"] == out["shards_total"] == -(-n_seqs // 16)
    arrays, attrs = read_store(tmp_path / "s")
    acts = arrays["activations"]
    assert acts.shape == (n, model.config.hidden_size) and acts.dtype == np.float32
    # independent reference: the packed stream, and the LM run directly on a few sequences
    ref = list(packed_sequences(docs, tok, CTX, eval_fraction=EVAL, split="train"))[:n_seqs]
    np.testing.assert_array_equal(arrays["token_ids"], np.array(ref, dtype=np.int32)[:, 1:].reshape(-1))
    np.testing.assert_array_equal(arrays["seq_index"], np.repeat(np.arange(n_seqs), BODY))
    np.testing.assert_array_equal(arrays["position"], np.tile(np.arange(1, CTX), n_seqs))
    pick = np.random.choice(n_seqs, size=4, replace=False)
    with torch.inference_mode():
        direct = run_to_hook(model, HOOK, torch.tensor([ref[i] for i in pick]))[:, 1:].numpy()
    for j, i in enumerate(pick):
        np.testing.assert_allclose(acts[i * BODY : (i + 1) * BODY], direct[j], rtol=1e-5, atol=1e-6)
    x = acts.astype(np.float64)
    norms = np.linalg.norm(x, axis=1)
    assert attrs["norm_stats"]["n"] == n
    np.testing.assert_allclose(attrs["norm_stats"]["mean_norm"], norms.mean(), rtol=1e-9)
    np.testing.assert_allclose(attrs["norm_stats"]["mean_sq_norm"], (norms**2).mean(), rtol=1e-9)
    assert attrs["d_in"] == model.config.hidden_size and attrs["n_tokens"] == n
    assert attrs["hook_name"] == HOOK and attrs["layer"] == 1 and attrs["ctx_len"] == CTX
    assert attrs["dataset"] == "tiny" and attrs["dtype"] == "float32" and attrs["model"]
    assert attrs["harvest"]["complete"] is True and attrs["harvest"]["end_of_data"] is False
    # a rerun of a complete harvest is a no-op that says so and touches nothing
    shard_files = sorted((tmp_path / "s" / "activations").rglob("*"))
    mtimes = [p.stat().st_mtime_ns for p in shard_files]
    again = run_harvest(lm, tmp_path / "s", docs, tokens, dtype="float32")
    assert again["already_complete"] and again["tokens_written"] == 0
    assert [p.stat().st_mtime_ns for p in shard_files] == mtimes


def test_harvest_float16_and_bfloat16_round_the_fp32_values(lm, tmp_path):
    docs = tiny_corpus(**SMALL)
    run_harvest(lm, tmp_path / "f32", docs, 600, dtype="float32")
    ref = read_store(tmp_path / "f32")[0]["activations"]
    for dt in ("float16", "bfloat16"):
        run_harvest(lm, tmp_path / dt, docs, 600, dtype=dt)
        arrays, attrs = read_store(tmp_path / dt)
        assert attrs["dtype"] == dt
        got = arrays["activations"].astype(np.float32)
        exp = torch.from_numpy(ref).to(getattr(torch, dt)).float().numpy()
        np.testing.assert_allclose(got, exp, rtol=0, atol=1e-6 * np.abs(ref).max())


@pytest.mark.slow
def test_two_workers_equal_one_worker_and_exhaustion_trims(lm, tmp_path):
    docs = tiny_corpus(**SMALL)
    _, tok = lm
    available = len(list(packed_sequences(docs, tok, CTX, eval_fraction=EVAL, split="train")))
    assert available % 16 != 0  # the corpus ends inside a shard
    tokens = (available + 40) * BODY  # more than the corpus holds: the last shards are short/empty
    one = run_harvest(lm, tmp_path / "one", docs, tokens)
    assert one["complete"] and one["n_tokens"] == available * BODY
    arrays, attrs = read_store(tmp_path / "one")
    assert arrays["activations"].shape[0] == available * BODY
    np.testing.assert_array_equal(arrays["seq_index"], np.repeat(np.arange(available), BODY))
    assert attrs["harvest"]["end_of_data"] is True and attrs["n_tokens"] == available * BODY

    r0 = run_harvest(lm, tmp_path / "two", docs, tokens, rank=0, world_size=2)
    assert not r0["complete"]  # rank 1's shards are still missing
    r1 = run_harvest(lm, tmp_path / "two", docs, tokens, rank=1, world_size=2)
    assert r1["complete"] and r0["shards_written"] + r1["shards_written"] == r1["shards_total"]
    assert_same_store(tmp_path / "one", tmp_path / "two")


HOOKS = ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_mid", HOOK, "blocks.0.hook_resid_pre"]


def _single_hook_stores(lm, tmp_path, docs, tokens) -> dict:
    """{hook: the store of a harvest of that hook alone} for every hook of HOOKS."""
    for h in HOOKS:
        run_harvest(lm, tmp_path / "single" / h, docs, tokens, hook_name=h)
    return {h: tmp_path / "single" / h for h in HOOKS}


def test_several_hooks_from_one_forward_equal_single_hook_harvests(lm, tmp_path):
    """hook_name=[3 hooks]: one store per hook under store_path, each identical to that hook's own harvest
    (values, token ids, attributes), from as many LM forwards as one hook alone (counted at the embedding)."""
    model, _ = lm
    docs = tiny_corpus(**SMALL)
    tokens = 40 * BODY  # 40 sequences: shards of 16, 16 and 8
    forwards = []
    h = model.get_input_embeddings().register_forward_hook(lambda *_a: forwards.append(1))
    try:
        out = run_harvest(lm, tmp_path / "multi", docs, tokens, hook_name=HOOKS)
        n_multi = len(forwards)
        run_harvest(lm, tmp_path / "one", docs, tokens)
    finally:
        h.remove()
    assert n_multi == len(forwards) - n_multi == 4 + 4 + 2  # batches of 5 sequences within each shard
    assert out["complete"] and out["n_tokens"] == tokens and out["tokens_written"] == tokens
    assert out["stores"] == {h: os.path.join(tmp_path / "multi", h) for h in HOOKS}
    for h, ref in _single_hook_stores(lm, tmp_path, docs, tokens).items():
        assert_same_store(tmp_path / "multi" / h, ref)
    again = run_harvest(lm, tmp_path / "multi", docs, tokens, hook_name=HOOKS)
    assert again["already_complete"] and again["tokens_written"] == 0


def test_several_hooks_resume_where_any_store_lacks_a_shard(lm, tmp_path):
    """A store that is already complete is left alone; a shard marked in some stores but not all (a worker
    killed between them) is redone in all; two workers run one after the other finish every store."""
    docs = tiny_corpus(**SMALL)
    tokens = 40 * BODY
    refs = _single_hook_stores(lm, tmp_path, docs, tokens)
    run_harvest(lm, tmp_path / "m" / HOOK, docs, tokens)  # this hook's store exists, complete
    files = sorted(p for p in (tmp_path / "m" / HOOK).rglob("*") if p.is_file())
    mtimes = [p.stat().st_mtime_ns for p in files]
    r0 = run_harvest(lm, tmp_path / "m", docs, tokens, hook_name=HOOKS, rank=0, world_size=2)
    assert not r0["complete"] and r0["shards_written"] == 2  # shards 0 and 2
    os.remove(tmp_path / "m" / HOOKS[0] / "_progress" / "shard_00000002.json")
    r0 = run_harvest(lm, tmp_path / "m", docs, tokens, hook_name=HOOKS, rank=0, world_size=2)
    assert r0["shards_written"] == 1 and r0["tokens_written"] == 8 * BODY  # shard 2 again, in both stores
    r1 = run_harvest(lm, tmp_path / "m", docs, tokens, hook_name=HOOKS, rank=1, world_size=2)
    assert r1["complete"] and r1["shards_written"] == 1
    for h, ref in refs.items():
        assert_same_store(tmp_path / "m" / h, ref)
    assert [p.stat().st_mtime_ns for p in files] == mtimes


def _logged_bytes(line: str, key: str) -> float:
    """The size in a harvest log line just before `key`, e.g. "... 1.50 MiB per store ..." -> 1572864.0."""
    value, unit = line.split(key)[0].split()[-2:]
    return float(value.replace(",", "")) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]


def test_disk_space_is_stated_and_checked_before_any_work(lm, tmp_path, capsys, monkeypatch):
    """Before the LM runs the log states the size of each store (that of the finished store's files, plus a
    small allowance for metadata) and of what is left to write; a harvest that does not fit stops with both
    sizes named, writing nothing."""
    import shutil
    from collections import namedtuple

    docs = tiny_corpus(**SMALL)
    run_harvest(lm, tmp_path / "s", docs, 40 * BODY, hook_name=[HOOK, "blocks.0.hook_mlp_out"])
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "per store" in x]
    real = sum(p.stat().st_size for p in (tmp_path / "s" / HOOK).rglob("*") if p.is_file())
    per_store = _logged_bytes(line, " per store")
    # shard files exactly, plus an upper-bound allowance of 8.5 KiB for the zarr.json files and the 3 markers
    assert real <= per_store <= real + 8.5 * 2**10, (line, real)
    assert abs(_logged_bytes(line, " still to write") - 2 * per_store) <= 0.005 * 2**20, line  # 2 decimals of MiB
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10**6, 10**6 - 5000, 5000))
    with pytest.raises(HarvestError, match=r"still has .* to write .* has 4.88 KiB free"):
        run_harvest(lm, tmp_path / "full", docs, 40 * BODY)
    assert not (tmp_path / "full").exists()


def test_rows_are_shuffled_within_each_shard(lm, tmp_path):
    """By default shard s holds the rows of the text-order harvest's shard s in the order
    shard_row_permutation(s, rows), the same permutation for every array; row_order="text" keeps text order;
    a store is neither resumed nor reused in the other order."""
    docs = tiny_corpus(**SMALL)
    tokens = 40 * BODY  # shards of 16, 16 and 8 sequences
    run_harvest(lm, tmp_path / "text", docs, tokens, row_order="text")
    run_harvest(lm, tmp_path / "shuf", docs, tokens)
    (text, at), (shuf, ash) = read_store(tmp_path / "text", False), read_store(tmp_path / "shuf", False)
    assert at["row_order"] == "text" and ash["row_order"] == "shuffled_in_shard"
    for s, lo in enumerate(range(0, tokens, 16 * BODY)):
        hi = min(lo + 16 * BODY, tokens)
        back = np.lexsort((shuf["position"][lo:hi], shuf["seq_index"][lo:hi]))  # text order, found from the rows
        perm = shard_row_permutation(s, hi - lo)
        for k in text:
            np.testing.assert_array_equal(shuf[k][lo:hi][back], text[k][lo:hi], err_msg=k)
            np.testing.assert_array_equal(shuf[k][lo:hi], text[k][lo:hi][perm], err_msg=k)
        assert not np.array_equal(back, np.arange(hi - lo))
    with pytest.raises(StoreError, match="row_order"):
        run_harvest(lm, tmp_path / "shuf", docs, tokens, row_order="text")
    run_harvest(lm, tmp_path / "half", docs, tokens, rank=0, world_size=2)
    with pytest.raises(StoreError, match="row_order: store has 'shuffled_in_shard', requested 'text'"):
        run_harvest(lm, tmp_path / "half", docs, tokens, rank=1, world_size=2, row_order="text")


def test_nonfinite_activations_raise_naming_sequences(lm, tmp_path):
    model, _ = lm
    with splice_hook(model, "blocks.0.hook_mlp_out", lambda a: a * float("nan")):
        with pytest.raises(HarvestError, match=r"non-finite .* sequences \[0, 1, 2, 3, 4\] \(bad: \[0, 1, 2, 3, 4\]\)"):
            run_harvest(lm, tmp_path / "nan", tiny_corpus(**SMALL), 300)


def test_bad_arguments(lm, tmp_path):
    with pytest.raises(ValueError, match="multiple of seqs_per_chunk"):
        run_harvest(lm, tmp_path / "x", [], 100, seqs_per_chunk=5)
    with pytest.raises(ValueError, match="unknown store dtype 'int8'"):
        run_harvest(lm, tmp_path / "x", [], 100, dtype="int8")
    with pytest.raises(ValueError, match=r"row_order='random': use one of \['text', 'shuffled_in_shard', "):
        run_harvest(lm, tmp_path / "x", [], 100, row_order="random")
    with pytest.raises(ValueError, match="row_order='shuffled_global' .* needs them pretokenised: run sae-pretokenize"):
        run_harvest(lm, tmp_path / "x", [], 100, row_order="shuffled_global")
    with pytest.raises(ValueError, match="blocks.9.hook_resid_post"):
        run_harvest(lm, tmp_path / "x", [], 100, hook_name="blocks.9.hook_resid_post")
    with pytest.raises(HarvestError, match="no train sequence"):
        run_harvest(lm, tmp_path / "empty", ["too short"], 100)
    with pytest.raises(ValueError, match="none twice"):
        run_harvest(lm, tmp_path / "x", [], 100, hook_name=[HOOK, HOOK])
    with pytest.raises(ValueError, match="at least one"):
        run_harvest(lm, tmp_path / "x", [], 100, hook_name=[])
    assert not (tmp_path / "x").exists()  # nothing written for bad arguments
