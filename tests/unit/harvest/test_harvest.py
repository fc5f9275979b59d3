"""The harvester in this process on the tiny LM + tiny corpus: values, layout, attrs, float16/bfloat16
rounding, two workers (run one after the other) against one, exhaustion, non-finite activations, bad
arguments. A harvest killed mid-run then resumed and two worker processes meeting at a gloo barrier:
tests/integration/harvest/test_harvest_processes.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.harvest import BODY, CTX, EVAL, HOOK, SMALL, assert_same_store, read_store, run_harvest
from helpers.synthetic import tiny_corpus

from sae_dist.harvest import HarvestError, packed_sequences, run_to_hook, splice_hook


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


def test_nonfinite_activations_raise_naming_sequences(lm, tmp_path):
    model, _ = lm
    with splice_hook(model, "blocks.0.hook_mlp_out", lambda a: a * float("nan")):
        with pytest.raises(HarvestError, match=r"non-finite activations .* sequences \[0, 5\)"):
            run_harvest(lm, tmp_path / "nan", tiny_corpus(**SMALL), 300)


def test_bad_arguments(lm, tmp_path):
    with pytest.raises(ValueError, match="multiple of seqs_per_chunk"):
        run_harvest(lm, tmp_path / "x", [], 100, seqs_per_chunk=5)
    with pytest.raises(ValueError, match="unknown store dtype 'int8'"):
        run_harvest(lm, tmp_path / "x", [], 100, dtype="int8")
    with pytest.raises(ValueError, match="blocks.9.hook_resid_post"):
        run_harvest(lm, tmp_path / "x", [], 100, hook_name="blocks.9.hook_resid_post")
    with pytest.raises(HarvestError, match="no train sequence"):
        run_harvest(lm, tmp_path / "empty", ["too short"], 100)
