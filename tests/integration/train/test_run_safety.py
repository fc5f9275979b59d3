"""Trustworthy runs with real processes: one writer per run directory and per store (an OS lock that a
SIGKILL releases), SIGTERM as a normal stop (checkpoint, exit 75, exact resume), finished runs that check
their inputs, and user errors reported first (one message, no traceback)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sae_dist.lock import DirectoryBusyError, DirectoryLock
from sae_dist.sae import SAEConfig
from sae_dist.store import write_store
from sae_dist.train import TrainerConfig, train

BIN = Path(sys.executable).parent
ENV = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")

TRAIN_SCRIPT = """
import json, sys
from sae_dist.sae import SAEConfig
from sae_dist.train import TrainerConfig, train
store, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
res = train(store_path=store, out_dir=out, sae_cfg=SAEConfig(d_in=32, d_sae=2048, k=8),
            trainer_cfg=TrainerConfig(tokens=512 * steps, batch_tokens=512, log_every_steps=1,
                                      checkpoint_every_steps=25),
            progress=False, wandb_cfg={"enabled": False})
print(json.dumps({"steps": res["steps"], "already_finished": res["already_finished"]}))
"""


def _store(path: Path, n_tokens=8192, d=32, seed=0) -> str:
    g = np.random.default_rng(seed)
    x = g.normal(size=(n_tokens, d)).astype(np.float32)
    return str(write_store(path, x, attrs={"model": "synthetic", "hook_name": "blocks.0.hook_resid_post"},
                           chunk_tokens=512, shard_tokens=2048))


def _log_lines(run: Path) -> int:
    log = run / "train_log.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.communicate()[1][-3000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def _train_script_here(monkeypatch, capsys, *argv: str) -> dict:
    """TRAIN_SCRIPT run in this process (on one thread, as ENV's OMP_NUM_THREADS=1 runs it): the second
    trainer and the rerun below, which need another process only as the lock's holder (the first)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with monkeypatch.context() as m:
            m.setattr(sys, "argv", ["train.py", *argv])
            exec(compile(TRAIN_SCRIPT, "train.py", "exec"), {"__name__": "__main__"})
    finally:
        torch.set_num_threads(n)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow
def test_second_trainer_is_refused_and_a_killed_holder_frees_the_run_dir(tmp_path, monkeypatch, capsys):
    store = _store(tmp_path / "acts.zarr")
    run = tmp_path / "run"
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    cmd = [sys.executable, str(script), store, str(run)]
    first = subprocess.Popen([*cmd, "200"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        _wait_for(lambda: _log_lines(run) >= 3, first)
        first.send_signal(signal.SIGSTOP)  # frozen mid-run, lock held, while a second trainer starts
        # the second trainer (this process) meets the first process's lock
        with pytest.raises(DirectoryBusyError) as busy:
            _train_script_here(monkeypatch, capsys, store, str(run), "200")
        assert f"{run} is in use by sae-train" in str(busy.value) and f"pid {first.pid}" in str(busy.value)
        assert first.poll() is None, "the first trainer must be unaffected"
        holder = json.loads((run / ".sae-dist.lock.json").read_text())
        assert holder["pid"] == first.pid
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(60)
    # the kernel dropped the killed holder's lock: the rerun (this process) takes the directory and resumes
    assert _train_script_here(monkeypatch, capsys, store, str(run), "200")["steps"] == 200
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 201)), "one writer: no duplicated or out-of-order log lines"
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(("step_", ".tmp"))) == [
        "step_00000175", "step_00000200"]


def test_lock_is_exclusive_across_processes_and_released_by_sigkill(tmp_path):
    """The store's harvest lock, held by another process the way sae-harvest holds it."""
    from sae_dist.harvest.harvester import harvest_lock_file

    store = tmp_path / "acts.zarr"
    holder_code = (
        "import sys, time\nfrom sae_dist.lock import DirectoryLock\nfrom sae_dist.harvest.harvester import "
        "harvest_lock_file\nlock = DirectoryLock(sys.argv[1], 'sae-harvest worker 0 of 1', "
        "lock_file=harvest_lock_file(sys.argv[1], 0)).acquire()\nprint('locked', flush=True)\ntime.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", holder_code, str(store)], stdout=subprocess.PIPE, text=True,
                              env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        mine = DirectoryLock(store, "test", lock_file=harvest_lock_file(store, 0))
        with pytest.raises(DirectoryBusyError, match=rf"in use by sae-harvest worker 0 of 1 .*pid {holder.pid}"):
            mine.acquire()
        # another worker's lock is a different file: workers of one harvest do not block each other
        with DirectoryLock(store, "test", lock_file=harvest_lock_file(store, 1)):
            pass
    finally:
        holder.kill()
        holder.wait(60)
    with mine:
        assert mine.is_locked
    assert not store.exists(), "the lock lives beside the store, which create_store makes by a rename"


def _train_cli(run: Path, store: str, *extra: str) -> list[str]:
    return [str(BIN / "sae-train"), f"run_dir={run}", f"store.path={store}", "sae.d_sae=2048", "sae.k=8",
            "trainer.tokens=102400", "trainer.batch_tokens=512", "trainer.log_every_steps=1",
            "trainer.checkpoint_every_steps=1000", "device=cpu", "seed=0", "wandb.enabled=false", *extra]


def _log(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in rows]


@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_the_rerun_resumes_exactly(tmp_path, console_script):
    store = _store(tmp_path / "acts.zarr", n_tokens=16384)
    run = tmp_path / "run"
    marker = tmp_path / "launcher" / ".preempted"  # what launch/slurm.sbatch reads (torchrun exits 1)
    proc = subprocess.Popen(_train_cli(run, store), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, "SAE_DIST_PREEMPTED_MARKER": str(marker)})
    _wait_for(lambda: _log_lines(run) >= 5, proc)
    seen = _log_lines(run)
    assert not marker.exists()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert marker.exists()
    assert "SIGTERM" in err and "rerun the same command to resume" in err
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1
    ck_step = int(ckpts[0].name.split("_")[1])
    assert seen <= ck_step <= seen + 2 and ck_step < 200, (seen, ck_step)  # the step in flight, then stop
    assert _log_lines(run) == ck_step and not (run / "sae").exists()
    # the rerun resumes from that checkpoint and matches an uninterrupted run bit for bit
    rerun = console_script("sae-train", *_train_cli(run, store)[1:], threads=1)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    ref = tmp_path / "ref"
    assert console_script("sae-train", *_train_cli(ref, store)[1:], threads=1).returncode == 0
    assert [r["step"] for r in _log(run)] == list(range(1, 201))
    assert _log(run) == _log(ref)


def test_finished_run_checks_its_inputs(tmp_path, capsys):
    store = _store(tmp_path / "a.zarr")
    kw = dict(progress=False, wandb_cfg={"enabled": False})
    cfg = SAEConfig(d_in=32, d_sae=64, k=4)
    tcfg = TrainerConfig(tokens=512 * 6, batch_tokens=512, checkpoint_every_steps=3)
    out = tmp_path / "run"
    train(store_path=store, out_dir=out, sae_cfg=cfg, trainer_cfg=tcfg, **kw)
    capsys.readouterr()
    same = train(store_path=store, out_dir=out, sae_cfg=cfg, trainer_cfg=tcfg, **kw)
    assert same["already_finished"] and "same store and configuration" in capsys.readouterr().err
    # a store of another width, with the SAE width taken from it (as sae-train does)
    narrow = _store(tmp_path / "narrow.zarr", d=16)
    with pytest.raises(ValueError, match=r"d_in: recorded 32 != now 16") as e:
        train(store_path=narrow, out_dir=out, sae_cfg=SAEConfig(d_in=16, d_sae=64, k=4), trainer_cfg=tcfg, **kw)
    assert "d_in" in str(e.value) and "Use a new run_dir" in str(e.value)
    # same width, other data (norm statistics and path differ)
    other = _store(tmp_path / "b.zarr", seed=1)
    with pytest.raises(ValueError, match=r"store: recorded .*a\.zarr.* != now .*b\.zarr"):
        train(store_path=other, out_dir=out, sae_cfg=cfg, trainer_cfg=tcfg, **kw)
    # a result-shaping trainer option, and a smaller token budget
    with pytest.raises(ValueError, match=r"lr: recorded None != now 0\.01"):
        train(store_path=store, out_dir=out, sae_cfg=cfg, trainer_cfg=TrainerConfig(
            tokens=512 * 6, batch_tokens=512, checkpoint_every_steps=3, lr=0.01), **kw)
    with pytest.raises(ValueError, match=r"the run trained 3072 tokens, now 1024 asks for 1024"):
        train(store_path=store, out_dir=out, sae_cfg=cfg, trainer_cfg=TrainerConfig(
            tokens=1024, batch_tokens=512, checkpoint_every_steps=3), **kw)
    # operational options may change; a larger budget continues the run from its last checkpoint
    more = train(store_path=store, out_dir=out, sae_cfg=cfg, trainer_cfg=TrainerConfig(
        tokens=512 * 9, batch_tokens=512, checkpoint_every_steps=3, log_every_steps=1), **kw)
    assert not more["already_finished"] and more["steps"] == 9


def test_user_errors_come_first_and_bugs_keep_their_traceback(tmp_path, console_script, monkeypatch):
    missing = tmp_path / "nowhere.zarr"
    proc = console_script("sae-train", f"run_dir={tmp_path / 'r'}", f"store.path={missing}", "device=cpu")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("sae-train: error: activation store") and str(missing) in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) == 2, proc.stderr
    # run_dir naming a file: a message naming it, before Hydra tries to create its output directory
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = console_script("sae-train", f"run_dir={afile}", f"store.path={missing}")
    assert proc.returncode == 2 and f"run_dir={afile} is an existing file" in proc.stderr.splitlines()[0]
    assert afile.read_text() == "x"
    # the traceback on request
    monkeypatch.setenv("SAE_DIST_DEBUG", "1")
    proc = console_script("sae-train", f"run_dir={tmp_path / 'r'}", f"store.path={missing}", "device=cpu")
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    monkeypatch.delenv("SAE_DIST_DEBUG")
    # a programming error is not dressed up as a user error
    import sae_dist.cli as cli

    def bug(cfg, out, **kw):
        raise KeyError("bug")

    monkeypatch.setattr(cli, "run_train", bug)
    proc = console_script("sae-train", f"run_dir={tmp_path / 'r2'}", f"store.path={missing}")
    assert proc.returncode == 1 and "KeyError" in proc.stderr and "Traceback" in proc.stderr
    assert "sae-train: error:" not in proc.stderr


def test_checkpoint_temporaries_are_cleaned_only_under_the_lock(tmp_path):
    """A leftover `.tmp_step_*` of a dead process is removed by the next save (its writer's lock is free);
    while a live process holds the run directory nobody else gets to save at all."""
    store = _store(tmp_path / "acts.zarr")
    out = tmp_path / "run"
    (out / "checkpoints" / ".tmp_step_00000007").mkdir(parents=True)
    with DirectoryLock(out, "another sae-train"):
        with pytest.raises(DirectoryBusyError, match="another sae-train"):
            train(store_path=store, out_dir=out, sae_cfg=SAEConfig(d_in=32, d_sae=64, k=4),
                  trainer_cfg=TrainerConfig(tokens=1024, batch_tokens=512), progress=False,
                  wandb_cfg={"enabled": False})
        assert (out / "checkpoints" / ".tmp_step_00000007").exists()
    train(store_path=store, out_dir=out, sae_cfg=SAEConfig(d_in=32, d_sae=64, k=4),
          trainer_cfg=TrainerConfig(tokens=1024, batch_tokens=512, checkpoint_every_steps=1), progress=False,
          wandb_cfg={"enabled": False})
    assert not (out / "checkpoints" / ".tmp_step_00000007").exists()


def _harvest_cli(run: Path, lm: str) -> list[str]:
    return [str(BIN / "sae-harvest"), f"run_dir={run}", f"model.name={lm}", "device=cpu", "data.ctx_len=32",
            "harvest.tokens=20000", "harvest.seqs_per_chunk=8", "harvest.seqs_per_shard=8", "harvest.batch_size=8"]


@pytest.mark.slow
def test_sigterm_ends_a_harvest_between_shards_and_the_rerun_completes_it(tmp_path, tiny_lm_dir, console_script):
    import zarr

    run = tmp_path / "run"
    progress = run / "activations.zarr" / "_progress"
    proc = subprocess.Popen(_harvest_cli(run, tiny_lm_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    _wait_for(lambda: progress.is_dir() and len(list(progress.iterdir())) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    summary = json.loads(out[out.index("{"):])
    assert summary["preempted"] and not summary["complete"] and summary["shards_written"] >= 3
    n_done = len(list(progress.iterdir()))
    assert n_done == summary["shards_written"] < summary["shards_total"]
    rerun = console_script("sae-harvest", *_harvest_cli(run, tiny_lm_dir)[1:], threads=1)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming: %d/" % n_done in rerun.stdout + rerun.stderr
    ref = tmp_path / "ref"
    assert console_script("sae-harvest", *_harvest_cli(ref, tiny_lm_dir)[1:], threads=1).returncode == 0
    a, b = (zarr.open_group(p / "activations.zarr", mode="r") for p in (run, ref))
    assert a.attrs["n_tokens"] == b.attrs["n_tokens"] and a.attrs["harvest"]["complete"]
    for name in ("activations", "token_ids", "seq_index"):
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)  # nothing lost or repeated
