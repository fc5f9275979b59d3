"""The harvester in processes of its own (forked from the forkserver) on the tiny LM + tiny corpus: a
harvest SIGKILLed after its first shard then resumed equals an uninterrupted one; two worker processes
(torchrun-style env) meet at a gloo barrier and equal one worker. The in-process harvester tests:
tests/unit/harvest/test_harvest.py."""

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
import zarr
from helpers.harvest import BODY, CTX, EVAL, HOOK, SMALL, assert_same_store, read_store, run_harvest
from helpers.synthetic import tiny_corpus

from sae_dist.harvest import harvest
from sae_dist.harvest.lm import load_lm


def _harvest_worker(lm_dir, store, tokens, rank, world, delay, env, result_file):
    """A harvest of tiny_corpus(**SMALL) in a process of its own; writes its result (or traceback) to
    `result_file`."""
    try:
        os.environ.update(env)
        model, tok = load_lm(lm_dir)
        if delay:  # slow each LM forward down so that the parent can kill us mid-harvest
            model.get_input_embeddings().register_forward_hook(lambda *a: time.sleep(delay))
        out = harvest(model=model, tokenizer=tok, hook_name=HOOK, docs=tiny_corpus(**SMALL), store_path=store,
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
def test_kill_and_resume_equals_uninterrupted(lm, tiny_lm_dir, tmp_path):
    """SIGKILL a real harvest after its first shard marker; the rerun completes it bit-identically."""
    docs = tiny_corpus(**SMALL)
    tokens = 200 * BODY  # 200 sequences = 13 shards (the last one partial)
    store = tmp_path / "killed"
    proc = _launch(tiny_lm_dir, store, tokens, delay=0.05)
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

    resumed = run_harvest(lm, store, docs, tokens)
    assert resumed["complete"] and resumed["shards_written"] == 13 - n_marked
    run_harvest(lm, tmp_path / "clean", docs, tokens)
    assert_same_store(store, tmp_path / "clean")
    arrays, _ = read_store(store)  # no duplicates, no holes
    np.testing.assert_array_equal(arrays["seq_index"], np.repeat(np.arange(200), BODY))


@pytest.mark.slow
@pytest.mark.usefixtures("worker_forkserver")
def test_two_worker_processes_with_gloo_barrier(lm, tiny_lm_dir, tmp_path):
    """Two real worker processes (torchrun-style env): rank 0 finalises after the gloo barrier."""
    tokens = 100 * BODY
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [_launch(tiny_lm_dir, tmp_path / "dist", tokens, rank=r, world=2, env={**env, "RANK": str(r)})
             for r in range(2)]
    for p in procs:
        p.join(timeout=300)
    outs = [_output(p) for p in procs]
    assert [p.exitcode for p in procs] == [0, 0], outs
    assert all("'complete': True" in o for o in outs), outs
    run_harvest(lm, tmp_path / "single", tiny_corpus(**SMALL), tokens)
    assert_same_store(tmp_path / "dist", tmp_path / "single")
