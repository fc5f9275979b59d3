"""The harvester on the tiny LM + tiny corpus: values, layout, attrs, workers, exhaustion, resume after kill."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from helpers.synthetic import tiny_corpus

from sae_dist.harvest import HarvestError, harvest, packed_sequences, run_to_hook, splice_hook
from sae_dist.harvest.lm import load_lm

HOOK = "blocks.1.hook_resid_post"
CTX = 16
BODY = CTX - 1
EVAL = 0.1
SMALL = dict(n_files=3, max_chars=4000)  # ~ a few hundred sequences of 16 tokens


@pytest.fixture(scope="module")
def lm_dir(tiny_lm_dir):
    return tiny_lm_dir


@pytest.fixture(scope="module")
def lm(lm_dir):
    return load_lm(lm_dir)


def _run(lm, path, docs, tokens, **kw):
    model, tok = lm
    args = dict(model=model, tokenizer=tok, hook=HOOK, docs=docs, store_path=str(path), tokens=tokens,
                ctx_len=CTX, batch_size=5, seqs_per_chunk=4, seqs_per_shard=16, eval_fraction=EVAL,
                progress=False, attrs={"dataset": "tiny"})
    args.update(kw)
    return harvest(**args)


def _read(path):
    g = zarr.open_group(str(path), mode="r")
    arrays = {k: g[k][:] for k in ("activations", "token_ids", "seq_index", "position")}
    return arrays, dict(g.attrs)


def _assert_same_store(a, b):
    (arr_a, at_a), (arr_b, at_b) = _read(a), _read(b)
    for k in arr_a:
        assert arr_a[k].dtype == arr_b[k].dtype and arr_a[k].shape == arr_b[k].shape, k
        np.testing.assert_array_equal(arr_a[k], arr_b[k], err_msg=k)
    at_a["norm_stats"] = {k: round(v, 9) for k, v in at_a["norm_stats"].items()}
    at_b["norm_stats"] = {k: round(v, 9) for k, v in at_b["norm_stats"].items()}
    assert at_a == at_b


def test_harvest_values_layout_and_attrs(lm, tmp_path):
    model, tok = lm
    docs = tiny_corpus()
    tokens = 2000 + int(np.random.randint(0, 1000))
    out = _run(lm, tmp_path / "s", docs, tokens, dtype="float32")
    n_seqs = -(-tokens // BODY)
    n = n_seqs * BODY
    assert out["complete"] and out["n_tokens"] == n and out["tokens_written"] == n
    assert out["shards_written"] == out["shards_total"] == -(-n_seqs // 16)
    arrays, attrs = _read(tmp_path / "s")
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
    assert attrs["d_model"] == model.config.hidden_size and attrs["n_tokens"] == n
    assert attrs["hook"] == HOOK and attrs["layer"] == 1 and attrs["ctx_len"] == CTX
    assert attrs["dataset"] == "tiny" and attrs["dtype"] == "float32" and attrs["model"]
    assert attrs["harvest"]["complete"] is True and attrs["harvest"]["end_of_data"] is False
    # a rerun of a complete harvest is a no-op that says so and touches nothing
    shard_files = sorted((tmp_path / "s" / "activations").rglob("*"))
    mtimes = [p.stat().st_mtime_ns for p in shard_files]
    again = _run(lm, tmp_path / "s", docs, tokens, dtype="float32")
    assert again["already_complete"] and again["tokens_written"] == 0
    assert [p.stat().st_mtime_ns for p in shard_files] == mtimes


def test_harvest_float16_and_bfloat16_round_the_fp32_values(lm, tmp_path):
    docs = tiny_corpus(**SMALL)
    _run(lm, tmp_path / "f32", docs, 600, dtype="float32")
    ref = _read(tmp_path / "f32")[0]["activations"]
    for dt in ("float16", "bfloat16"):
        _run(lm, tmp_path / dt, docs, 600, dtype=dt)
        arrays, attrs = _read(tmp_path / dt)
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
    one = _run(lm, tmp_path / "one", docs, tokens)
    assert one["complete"] and one["n_tokens"] == available * BODY
    arrays, attrs = _read(tmp_path / "one")
    assert arrays["activations"].shape[0] == available * BODY
    np.testing.assert_array_equal(arrays["seq_index"], np.repeat(np.arange(available), BODY))
    assert attrs["harvest"]["end_of_data"] is True and attrs["n_tokens"] == available * BODY

    r0 = _run(lm, tmp_path / "two", docs, tokens, rank=0, world_size=2)
    assert not r0["complete"]  # rank 1's shards are still missing
    r1 = _run(lm, tmp_path / "two", docs, tokens, rank=1, world_size=2)
    assert r1["complete"] and r0["shards_written"] + r1["shards_written"] == r1["shards_total"]
    _assert_same_store(tmp_path / "one", tmp_path / "two")


def test_nonfinite_activations_raise_naming_sequences(lm, tmp_path):
    model, _ = lm
    with splice_hook(model, "blocks.0.hook_mlp_out", lambda a: a * float("nan")):
        with pytest.raises(HarvestError, match=r"non-finite activations .* sequences \[0, 5\)"):
            _run(lm, tmp_path / "nan", tiny_corpus(**SMALL), 300)


def test_bad_arguments(lm, tmp_path):
    with pytest.raises(ValueError, match="multiple of seqs_per_chunk"):
        _run(lm, tmp_path / "x", [], 100, seqs_per_chunk=5)
    with pytest.raises(ValueError, match="unknown store dtype 'int8'"):
        _run(lm, tmp_path / "x", [], 100, dtype="int8")
    with pytest.raises(ValueError, match="blocks.9.hook_resid_post"):
        _run(lm, tmp_path / "x", [], 100, hook="blocks.9.hook_resid_post")
    with pytest.raises(HarvestError, match="no train sequence"):
        _run(lm, tmp_path / "empty", ["too short"], 100)


def _harvest_worker(lm_dir, store, tokens, rank, world, delay, env, result_file):
    """A harvest of tiny_corpus(**SMALL) in a process of its own; writes its result (or traceback) to
    `result_file`."""
    try:
        os.environ.update(env)
        model, tok = load_lm(lm_dir)
        if delay:  # slow each LM forward down so that the parent can kill us mid-harvest
            model.get_input_embeddings().register_forward_hook(lambda *a: time.sleep(delay))
        out = harvest(model=model, tokenizer=tok, hook=HOOK, docs=tiny_corpus(**SMALL), store_path=store,
                      tokens=tokens, ctx_len=CTX, batch_size=5, seqs_per_chunk=4, seqs_per_shard=16,
                      eval_fraction=EVAL, rank=rank, world_size=world, progress=False, attrs={"dataset": "tiny"})
        Path(result_file).write_text(f"RESULT {out}")
    except BaseException:
        Path(result_file).write_text(traceback.format_exc())
        raise


def _launch(lm_dir, store, tokens, rank=0, world=1, delay=0.0, env=None):
    """`_harvest_worker` in a new process, forked from the forkserver that has imported torch,
    transformers and sae_dist once (`worker_forkserver`, tests/conftest.py). `.result` is its result file."""
    result = Path(f"{store}.rank{rank}.txt")
    proc = multiprocessing.get_context("forkserver").Process(
        target=_harvest_worker, args=(lm_dir, str(store), tokens, rank, world, delay, env or {}, str(result)))
    proc.start()
    proc.result = result
    return proc


def _output(proc) -> str:
    return proc.result.read_text() if proc.result.exists() else "(no result file)"


@pytest.mark.slow
@pytest.mark.usefixtures("worker_forkserver")
def test_kill_and_resume_equals_uninterrupted(lm, lm_dir, tmp_path):
    """SIGKILL a real harvest after its first shard marker; the rerun completes it bit-identically."""
    docs = tiny_corpus(**SMALL)
    tokens = 200 * BODY  # 200 sequences = 13 shards (the last one partial)
    store = tmp_path / "killed"
    proc = _launch(lm_dir, store, tokens, delay=0.05)
    progress = store / "_progress"
    deadline = time.time() + 120
    try:
        while not (progress.is_dir() and any(p.suffix == ".json" for p in progress.iterdir())):
            assert proc.is_alive(), _output(proc)
            assert time.time() < deadline, "no shard marker appeared"
            time.sleep(0.02)
        assert proc.is_alive()  # still running: killed mid-harvest
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert proc.exitcode == -signal.SIGKILL
    n_marked = len([p for p in progress.iterdir() if p.suffix == ".json"])
    assert 1 <= n_marked < 13
    assert zarr.open_group(str(store), mode="r").attrs["harvest"]["complete"] is False

    resumed = _run(lm, store, docs, tokens)
    assert resumed["complete"] and resumed["shards_written"] == 13 - n_marked
    _run(lm, tmp_path / "clean", docs, tokens)
    _assert_same_store(store, tmp_path / "clean")
    arrays, _ = _read(store)  # no duplicates, no holes
    np.testing.assert_array_equal(arrays["seq_index"], np.repeat(np.arange(200), BODY))


@pytest.mark.slow
@pytest.mark.usefixtures("worker_forkserver")
def test_two_worker_processes_with_gloo_barrier(lm, lm_dir, tmp_path):
    """Two real worker processes (torchrun-style env): rank 0 finalises after the gloo barrier."""
    tokens = 100 * BODY
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [_launch(lm_dir, tmp_path / "dist", tokens, rank=r, world=2, env={**env, "RANK": str(r)})
             for r in range(2)]
    for p in procs:
        p.join(timeout=300)
    outs = [_output(p) for p in procs]
    assert [p.exitcode for p in procs] == [0, 0], outs
    assert all("'complete': True" in o for o in outs), outs
    _run(lm, tmp_path / "single", tiny_corpus(**SMALL), tokens)
    _assert_same_store(tmp_path / "dist", tmp_path / "single")
