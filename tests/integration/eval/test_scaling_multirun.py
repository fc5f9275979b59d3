"""Hydra sweeps with failing points (sae_dist.sweep): a real `sae-train -m` multirun in a subprocess on
a synthetic store in which some points fail, reported, and sharing a wandb group. The scaling-law fits
of sae-scaling: tests/unit/eval/test_scaling.py."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from helpers.seeds import numpy_rng_seed

from sae_dist.eval.scaling import (
    run_scaling,
)


def _wandb_records(path: Path):
    """Minimal reader of wandb's record log (a LevelDB-style log: a 7-byte file header ':W&B' + magic +
    version, then 32 KiB blocks of records: crc32c (4) | length (2, LE) | type (1) | data; type 1 =
    full, 2/3/4 = first/middle/last fragment). Yields wandb_internal_pb2.Record messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


@pytest.mark.slow
def test_multirun_failed_points_are_reported_and_share_a_wandb_group(tmp_path, console_script, monkeypatch):
    """A real `sae-train -m` sweep where half the points fail (k > d_sae): the others complete,
    every point has job_status.json, sweep_summary.json lists the failures, the command exits 1, and
    the completed points' wandb runs carry the sweep dir's name as their group and, in the offline run's own
    file, SAELens' metric names with train_log.jsonl's values. The command line runs in
    this process (conftest.py's console_script; Hydra's basic launcher runs the points in it, as it does
    in a `sae-train -m` process), on one thread, with wandb offline."""
    from sae_dist.store import write_store

    seed = numpy_rng_seed()
    rng = np.random.default_rng(seed)
    acts = rng.normal(size=(6000, 16)).astype(np.float32)
    store = write_store(tmp_path / "acts.zarr", acts, attrs={"model": "synthetic", "hook_name": "none"})
    sweep = tmp_path / f"grid{seed % 10_000}"
    monkeypatch.setenv("WANDB_MODE", "offline")
    proc = console_script("sae-train", "-m", f"run_dir={sweep}", f"store.path={store}", "sae.d_sae=32,64",
                          "sae.k=4,100", "trainer.tokens=6000", "trainer.batch_tokens=1000", "device=cpu",
                          f"seed={seed % 1000}", threads=1)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "2/4 points completed, 2 failed" in proc.stderr, proc.stderr[-3000:]
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert summary["points"] == 4 and summary["completed"] == 2 and summary["missing_job_nums"] == []
    failed = {f["job_num"]: f for f in summary["failed"]}
    assert set(failed) == {1, 3}, failed
    assert all("k=100 > d_sae" in f["error"] for f in failed.values()), failed
    for job, name in ((0, "0_n32_k4"), (2, "2_n64_k4")):
        st = json.loads((sweep / name / "job_status.json").read_text())
        assert st["status"] == "completed" and st["job_num"] == job, st
        assert (sweep / name / "sae" / "sae_weights.safetensors").is_file()
        runs = list((sweep / name / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1, runs
        records = list(_wandb_records(runs[0]))
        groups = [r.run.run_group for r in records if r.WhichOneof("record_type") == "run"]
        assert groups and set(groups) == {sweep.name}, groups
        # the run's own file holds SAELens' names, with the values train_log.jsonl has under ours
        history = {}
        for r in records:
            if r.WhichOneof("record_type") == "history":
                items = {it.key or "/".join(it.nested_key): it.value_json for it in r.history.item}
                history.setdefault(r.history.step.num, {}).update(items)
        log = [json.loads(line) for line in (sweep / name / "train_log.jsonl").read_text().splitlines()]
        assert [rec["step"] for rec in log] == sorted(history), (list(history), log)
        last, h = log[-1], history[log[-1]["step"]]
        assert json.loads(h["losses/mse_loss"]) == pytest.approx(last["train/fvu"], rel=1e-12)
        assert json.loads(h["metrics/l0"]) == pytest.approx(last["train/l0"], rel=1e-12)
        assert json.loads(h["details/current_learning_rate"]) == pytest.approx(last["train/lr"], rel=1e-12)
        assert json.loads(h["metrics/explained_variance"]) == pytest.approx(1 - last["train/fvu"], rel=1e-12)
        assert json.loads(h["sparsity/dead_features"]) == round(last["train/dead_fraction"] * (32 if job == 0 else 64))
    # sae-scaling over it lists the failed points and fits nothing from 2 points without failing
    res = run_scaling(sweep, tmp_path / "sc", metric="train/fvu", plots=False)
    assert len(res["points"]) == 2 and {p["n"] for p in res["points"]} == {32, 64}
    assert sum("k=100 > d_sae" in s["reason"] for s in res["skipped"]) == 2, res["skipped"]
    assert res["fits"]["L(n,k)"] is None and res["fits"]["notes"]
