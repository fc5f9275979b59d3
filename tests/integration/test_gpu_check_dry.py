"""`make gpu-check DRY=1`: the GPU check's script (sae_dist/gpu_check.py) at tiny shapes on the CPU, in a
subprocess: every step and both outputs. Its pure parts: tests/unit/test_gpu_check.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sae_dist import gpu_check as gc
from sae_dist.kernels.encoder_topk import encoder_candidates

ROOT = Path(__file__).resolve().parents[2]


# the plan runs right after the benchmarks (its record keeps that place) and again at the end
STEPS = ["env", "kernel_tests", "encoder_matmul", "bench_n2048", "bench_n2048_dead0", "bench_n1024", "plan",
         "synthetic_store", "train_kernels_on", "train_kernels_off", "train_curves", "encoder_tune"]


def _gpu_check(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "sae_dist.gpu_check", "--dry", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=540)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry check for the module: (its output directory, the process, its wall time in s)."""
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    t0 = time.perf_counter()
    p = _gpu_check("--out", str(out))
    return out, p, time.perf_counter() - t0


@pytest.mark.slow
def test_dry_run_every_step_and_both_outputs(dry_run, capsys):
    out, p, wall = dry_run
    rec = json.loads((out / "gpu_check.json").read_text())
    assert p.returncode == (0 if rec["ok"] else 1), p.stderr[-3000:]
    assert list(rec["steps"]) == STEPS and rec["mode"] == "dry"
    for name, st in rec["steps"].items():
        # kernel test failures are the kernel tests' own (they fail `make test` themselves); every other
        # step must have run: an error, timeout or skip here is a bug of the script
        allowed = ("pass", "fail") if name == "kernel_tests" else ("pass", "ok")
        assert st["status"] in allowed, (name, st)
    assert rec["steps"]["kernel_tests"]["tests"] > 0 and (out / "kernel_tests.xml").is_file()
    assert rec["steps"]["train_curves"]["curves"]["points"] >= 3
    big = rec["steps"]["bench_n2048"]["bench"]
    assert big["n"] == 2048 and big["step_ms"] > 0 and big["speedup_vs_sparsify"] > 0
    assert rec["steps"]["bench_n2048_dead0"]["bench"]["dead_latents"] == 0
    assert [g["name"] for g in rec["goals"]] == [g[0] for g in gc.GOALS]
    by_goal = {g["name"]: g for g in rec["goals"]}
    assert by_goal["dead_frac_ratio"]["measured"] == pytest.approx(
        big["step_ms"] / rec["steps"]["bench_n2048_dead0"]["bench"]["step_ms"])
    assert by_goal["gemm_fraction_of_peak"]["status"] == "n/a"  # a CPU has no bf16 peak in the table
    assert [r["n"] for r in rec["plan_comparison"]] == [2048, 1024]
    assert rec["recalibration"]["constants"]["hbm_efficiency"] == 1.0  # no table entry: measured copy
    for name in ("train_log_kernels_on.jsonl", "train_log_kernels_off.jsonl", "gpu_check.log", gc.TUNE_FILE):
        assert (out / name).stat().st_size > 0
    # the encoder's launch candidates for k and 4k, each checked against the default's selection and timed
    tune = json.loads((out / gc.TUNE_FILE).read_text())
    assert [c["k"] for c in tune["classes"]] == [8, 32] and tune["device"] == "cpu (interpreter)"
    for c in tune["classes"]:
        assert c["complete"] and c["all_correct"] and {r["status"] for r in c["results"]} == {"timed"}
        assert len(c["results"]) == len(encoder_candidates(c["k"], "ieee")) and c["best"] in encoder_candidates(
            c["k"], "ieee")
    assert rec["steps"]["encoder_tune"]["classes"] == tune["classes"]
    md = (out / "gpu_check.md").read_text()
    assert "| step | status | seconds | budget s | result |" in md and "**Goals**" in md
    assert "**Fused-encoder launch configurations**" in md and md.count("| timed |") == sum(
        len(c["results"]) for c in tune["classes"])
    assert all(f"| {name} |" in md for name in STEPS)
    assert wall < gc.DRY.total_budget_s
    # --recalibrate reads the record back
    assert gc.main(["--recalibrate", str(out / "gpu_check.json")]) in (0, 1)
    printed = capsys.readouterr().out  # mfu is fitted unless a loaded machine's copy rate makes it meaningless
    assert "cluster.bf16_tflops" in printed and ("cluster.mfu" in printed or "mfu not fitted" in printed)


@pytest.mark.slow
def test_resume_runs_only_what_did_not_pass(dry_run, tmp_path):
    # the earlier check as a lease cut short would leave it: a benchmark that errored, a training run
    # that timed out (statuses edited into a copy of the dry run's record)
    out, _, _ = dry_run
    before = tmp_path / "before"
    shutil.copytree(out, before)
    rec = json.loads((before / "gpu_check.json").read_text())
    rec["steps"]["bench_n1024"]["status"] = "error"
    rec["steps"]["train_kernels_off"]["status"] = "timeout"
    (before / "gpu_check.json").write_text(json.dumps(rec))
    after = tmp_path / "after"
    p = _gpu_check("--resume", str(before / "gpu_check.json"), "--out", str(after))
    new = json.loads((after / "gpu_check.json").read_text())
    assert p.returncode == (0 if new["ok"] else 1), p.stderr[-3000:]
    kept = ["kernel_tests", "encoder_matmul", "bench_n2048", "bench_n2048_dead0", "train_kernels_on",
            "encoder_tune"]
    assert new["resumed_from"]["kept"] == kept and list(new["steps"]) == STEPS
    for name in kept:  # copied, not run: the earlier record plus where it came from
        assert new["steps"][name] == {**rec["steps"][name], "kept_from": rec["started"]}
    for name in ("bench_n1024", "synthetic_store", "train_kernels_off", "train_curves"):
        assert new["steps"][name]["status"] in ("ok", "pass"), (name, new["steps"][name])
    log = (after / "gpu_check.log").read_text()
    ran = {line.split(":")[0][6:] for line in log.splitlines() if line.startswith("===== ") and ": rc=" in line}
    assert ran == {"bench_n1024", "synthetic_store", "train_kernels_off"}
    # the kept run's log came along and was compared with the new one
    assert (after / "train_log_kernels_on.jsonl").read_bytes() == (out / "train_log_kernels_on.jsonl").read_bytes()
    assert new["steps"]["train_curves"]["curves"]["points"] >= 3
    assert (after / "kernel_tests.xml").is_file()
    assert (after / gc.TUNE_FILE).read_bytes() == (out / gc.TUNE_FILE).read_bytes()
    assert "Resumed from the check of" in (after / "gpu_check.md").read_text()
    # resumed again, in place: a step kept twice still names the check that ran it
    again = _gpu_check("--resume", str(after / "gpu_check.json"), "--out", str(after), "--rerun", "bench_n1024")
    third = json.loads((after / "gpu_check.json").read_text())
    assert again.returncode == (0 if third["ok"] else 1), again.stderr[-3000:]
    assert third["steps"]["bench_n2048"]["kept_from"] == rec["started"]
    assert third["steps"]["train_kernels_off"]["kept_from"] == new["started"]
    assert third["steps"]["bench_n1024"].get("kept_from") is None
    assert (after / "gpu_check.log").read_text().startswith(log)  # appended to
