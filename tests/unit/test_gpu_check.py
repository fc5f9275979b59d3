"""The pure parts of the GPU check (sae_dist/gpu_check.py: curve comparison, junit parsing, goals,
recalibration, timeouts) on hand-made inputs. Its script at tiny shapes (`make gpu-check DRY=1`):
tests/integration/test_gpu_check_dry.py."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from pathlib import Path

import pytest

from sae_dist import gpu_check as gc


def test_full_check_needs_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="DRY=1"):
        gc.sizes_for(False, None)
    with pytest.raises(ValueError, match="--device cuda"):
        gc.sizes_for(True, "cuda")
    assert gc.sizes_for(True, None) is gc.DRY


def test_full_sizes_fit_eight_minutes():
    # every step but the tuning has its whole budget; the tuning gets what they leave (never past the deadline)
    before_tune = {k: v for k, v in gc.FULL.budgets_s.items() if k != "encoder_tune"}
    assert sum(before_tune.values()) <= gc.FULL.total_budget_s <= 8 * 60 - 10
    assert gc.step_names(gc.FULL)[-1] == "encoder_tune"
    assert set(gc.FULL.budgets_s) == set(gc.DRY.budgets_s)
    assert (gc.FULL.d_in, gc.FULL.k, gc.FULL.batch, gc.FULL.n_small, gc.FULL.n_large) == (768, 32, 32768, 2**17, 2**20)
    with pytest.raises(KeyError, match="no budget for step 'nope'"):
        gc.FULL.budget("nope")


def test_wgrad_paths_agree():
    """The encoder_matmul step's W_enc-gradient comparison: both paths of `_grad_w_enc` run on the same
    codes (the atomic kernel under Triton's interpreter here) and agree to fp32 rounding."""
    w = gc.measure_wgrad(d=8, n=64, batch=16, slots=5, device="cpu", iters=1)
    assert w["slots"] == 5 and w["atomic_ms"] > 0 and w["csr_ms"] > 0
    assert w["max_rel_diff"] < 1e-5


def test_a_failing_wgrad_measurement_keeps_the_matmul_numbers(monkeypatch):
    """The goals need the matmul: an error in the W_enc-gradient timing is recorded beside it."""
    def boom(*args):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(gc, "measure_wgrad", boom)
    m = gc.measure_matmul(d=8, n=64, batch=16, dtype="fp32", device="cpu", iters=1, copy_mib=1, wgrad_slots=5)
    assert m["matmul_ms"] > 0 and m["tflops"] > 0
    assert m["wgrad"] == {"slots": 5, "error": "RuntimeError: no kernel"}


def test_chip_peaks():
    assert gc.chip_peak("NVIDIA H100 80GB HBM3") == gc.ChipPeak("H100", 989.0, 3350.0)
    assert gc.chip_peak("NVIDIA H200").hbm_gbytes_per_s == 4800.0
    assert gc.chip_peak("NVIDIA H100 PCIe").bf16_tflops == 756.0
    assert gc.chip_peak("AMD EPYC 7B13") is None


def test_command_timeout_kills_the_process_group():
    t0 = time.perf_counter()
    res = gc.run_command(["sh", "-c", "echo started; sleep 30 & sleep 30"], timeout_s=1.0, env=dict(os.environ))
    assert res.timed_out and res.rc is None and "started" in res.stdout
    assert time.perf_counter() - t0 < 10


def test_step_past_the_deadline_is_skipped(tmp_path):
    sizes = dataclasses.replace(gc.DRY, total_budget_s=0.0)
    c = gc.Check(sizes, tmp_path, tmp_path)
    assert c.run("kernel_tests", ["true"], "kernel_tests") is None
    assert c.record["steps"]["kernel_tests"]["status"] == "skipped"
    assert json.loads((tmp_path / "gpu_check.json").read_text())["ok"] is False
    c.log.close()


def _log(values, every=10):
    return [{"step": every * (i + 1), "train/fvu": v} for i, v in enumerate(values)]


def test_compare_curves():
    base = [1.0 - 0.01 * i for i in range(30)]
    same = gc.compare_curves(_log(base), _log(base), skip_steps=30, window=5, rtol=0.02)
    assert same["ok"] and same["max_rel_dev"] == 0 and same["points"] == 27
    # 3 % noise alternating in sign: smoothed away below the tolerance, not below it raw
    noisy = [v * (1 + 0.03 * (-1) ** i) for i, v in enumerate(base)]
    r = gc.compare_curves(_log(noisy), _log(base), skip_steps=30, window=5, rtol=0.02)
    assert r["ok"] and r["max_rel_dev"] < 0.02 < r["max_rel_dev_raw"]
    drift = [v * 1.05 for v in base]
    r = gc.compare_curves(_log(drift), _log(base), skip_steps=30, window=5, rtol=0.02)
    assert not r["ok"] and r["max_rel_dev"] == pytest.approx(0.05)
    # a run cut short (timeout) is compared on the steps both logged
    r = gc.compare_curves(_log(base[:10]), _log(base), skip_steps=30, window=5, rtol=0.02)
    assert r["ok"] and r["last_step"] == 100 and r["points"] == 7
    r = gc.compare_curves(_log(base[:3]), _log(base), skip_steps=30, window=5, rtol=0.02)
    assert not r["ok"] and "< 3" in r["reason"]
    r = gc.compare_curves(_log(base[:-1] + [math.nan]), _log(base), skip_steps=30, window=5, rtol=0.02)
    assert not r["ok"] and "non-finite" in r["reason"]


def test_parse_junit_and_verbose_counts(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1" time="2.5">'
                   '<testcase classname="t" name="a"/><testcase classname="t" name="b"><failure/></testcase>'
                   '<testcase classname="t" name="c"><skipped/></testcase><testcase classname="t" name="d"/>'
                   '</testsuite></testsuites>')
    assert gc.parse_junit(xml) == {"tests": 4, "passed": 2, "failed": 1, "errors": 0, "skipped": 1,
                                   "time_s": 2.5, "failing": ["t::b"]}
    out = ("tests/a.py::x PASSED [ 50%]\n[gw0] [ 60%] FAILED tests/a.py::y\ntests/a.py::z SKIPPED (no)\n"
           "FAILED tests/a.py::y - assert\n")
    assert gc._count_verbose(out) == {"passed": 1, "failed": 1, "errors": 0, "skipped": 1}


def _full_record(step_ms=100.0, dead0_ms=90.0, matmul_ms=80.0, sparsify_ms=400.0):
    """A hand-made full-mode record on an H100 (what the GPU run would write)."""
    s = gc.FULL
    flops = 2 * s.batch * s.d_in * s.n_large
    peak = dataclasses.asdict(gc.chip_peak("NVIDIA H100 80GB HBM3"))
    mem_bytes = 3350e9 * 0.7 * 0.030  # 30 ms of memory-bound work at the default efficiency
    row = {"n": s.n_large, "plan_step_ms": 0.0, "plan_mem_gib": 30.0, "fits": True, "plan_matmul_flops": flops,
           "plan_memory_bytes": mem_bytes, "plan_other_time_s": 0.0, "cluster": {},
           "measured_step_ms": step_ms, "measured_mem_gib": 32.0}
    small = {**row, "n": s.n_small, "plan_matmul_flops": flops / 8, "plan_memory_bytes": mem_bytes / 8,
             "measured_step_ms": step_ms / 8}
    bench = {"step_ms": step_ms, "speedup_vs_sparsify": sparsify_ms / step_ms}
    return {"mode": "full", "sizes": dataclasses.asdict(s), "env": {"peak": peak},
            "steps": {"encoder_matmul": {"status": "ok", "matmul_ms": matmul_ms, "tflops": flops / matmul_ms / 1e9,
                                         "fraction_of_peak": flops / matmul_ms / 1e9 / 989.0,
                                         "copy_gbytes_per_s": 3000.0, "device_info": {"memory_gib": 79.2}},
                      f"bench_n{s.n_large}": {"status": "ok", "bench": bench},
                      f"bench_n{s.n_large}_dead0": {"status": "ok", "bench": {"step_ms": dead0_ms}}},
            "plan_comparison": [row, small]}


def test_goals_from_a_full_record():
    goals = {g["name"]: g for g in gc.evaluate_goals(_full_record())}
    assert goals["step_vs_matmul"]["measured"] == pytest.approx(1.25) and goals["step_vs_matmul"]["status"] == "pass"
    assert goals["speedup_vs_sparsify"]["measured"] == pytest.approx(4.0)
    assert goals["gemm_fraction_of_peak"]["status"] == "pass"  # 52.8 TFLOP in 80 ms = 660 TFLOP/s, 67 %
    assert goals["dead_frac_ratio"]["measured"] == pytest.approx(100 / 90)
    slow = {g["name"]: g for g in gc.evaluate_goals(_full_record(step_ms=200.0, dead0_ms=100.0, matmul_ms=120.0))}
    assert [slow[n]["status"] for n in ("step_vs_matmul", "speedup_vs_sparsify", "gemm_fraction_of_peak",
                                        "dead_frac_ratio")] == ["fail", "pass", "fail", "fail"]
    rec = _full_record()
    rec["steps"][f"bench_n{gc.FULL.n_large}"]["bench"] = {"step_ms": 100.0, "sparsify_error": "sparsify: CUDA oom"}
    g = {g["name"]: g for g in gc.evaluate_goals(rec)}["speedup_vs_sparsify"]
    assert g["status"] == "n/a" and "oom" in g["note"]


def test_recalibrate_fits_mfu_to_the_measured_step():
    rc = gc.recalibrate(_full_record(step_ms=100.0))
    c = rc["constants"]
    assert rc["ok"] and c["bf16_tflops"] == 989.0 and c["hbm_gbytes_per_s"] == 3350.0
    assert c["hbm_efficiency"] == pytest.approx(3000 / 3350, abs=1e-3)
    # the plan's memory-bound bytes take 30 ms * 0.7 / 0.896 at the measured efficiency; the rest is matmul
    mem_s = 0.030 * 0.7 / (3000 / 3350)
    flops = 2 * 32768 * 768 * 2**20
    assert c["mfu"] == pytest.approx(flops / (989e12 * (0.100 - mem_s)), rel=1e-3)
    assert rc["defaults"]["mfu"] == 0.5 and "cluster.mfu=" in rc["sae_plan_args"]
    assert rc["validation"][0]["predicted_step_ms"] == pytest.approx(100.0 / 8, rel=1e-2)
    # a step shorter than the plan's memory-bound time: mfu is not fitted, and says why
    short = gc.recalibrate(_full_record(step_ms=20.0))
    assert not short["ok"] and short["constants"]["mfu"] is None and "overestimated" in short["notes"][0]
    assert gc.recalibrate({"sizes": dataclasses.asdict(gc.FULL), "steps": {}})["ok"] is False


def test_render_markdown_of_a_partial_record():
    rec = _full_record()
    rec.update(started="2026-12-04T00:00:00Z", wall_s=12.0, goals=gc.evaluate_goals(rec),
               recalibration=gc.recalibrate(rec))
    rec["steps"] = {"env": {"status": "ok", "summary": "H100", "duration_s": 0.1, "budget_s": None},
                    "kernel_tests": {"status": "timeout", "summary": "ran past | its budget", "duration_s": 100.0,
                                     "budget_s": 100.0}}
    md = gc.render_markdown(rec)
    assert "| kernel_tests | timeout | 100.0 | 100 | ran past \\| its budget |" in md
    assert "did not pass: kernel_tests" in md and "cluster.mfu" in md


def test_failed_and_timed_out_commands_are_recorded(tmp_path):
    sizes = dataclasses.replace(gc.DRY, budgets_s={**gc.DRY.budgets_s, "encoder_matmul": 1.0})
    c = gc.Check(sizes, tmp_path, tmp_path)
    res = c.run("kernel_tests", ["sh", "-c", "echo boom >&2; exit 3"], "kernel_tests")
    assert c.failed_cmd("kernel_tests", res, "kernel_tests")["status"] == "error"
    res = c.run("encoder_matmul", ["sleep", "20"], "encoder_matmul")
    rec = c.failed_cmd("encoder_matmul", res, "encoder_matmul")
    c.log.close()
    assert rec["status"] == "timeout" and "(budget 1 s)" in rec["summary"]
    saved = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert saved["kernel_tests"]["status"] == "error" and "boom" in saved["kernel_tests"]["stderr_tail"]
    assert "exit 3" in (tmp_path / "gpu_check.log").read_text()


def test_the_kernel_test_step_names_every_file_of_tests_on_the_kernel_device():
    """Every test file with a test taking the `kernel_device` fixture (CUDA on a GPU machine) is in the kernel_tests
    step, except the tuner's (gpu-check's encoder_tune step runs the tuner itself); and each file exists."""
    assert all((gc.ROOT / f).is_file() for f in gc.KERNEL_TEST_FILES)
    on_device = {str(f.relative_to(gc.ROOT)) for f in (gc.ROOT / "tests").rglob("test_*.py")
                 if re.search(r"^def test_\w+\([^)]*\bkernel_device\b", f.read_text(), flags=re.M)}
    assert on_device - set(gc.KERNEL_TEST_FILES) == {"tests/unit/kernels/test_kernel_tune.py"}


def test_encoder_tuning_is_skipped_without_time_for_it(tmp_path):
    # 10 s before the deadline: less than the tuner's margin plus a step's minimum, so it does not start
    c = gc.Check(dataclasses.replace(gc.DRY, total_budget_s=gc.TUNE_MARGIN_S - 10), tmp_path, tmp_path)
    gc.step_tune(c)
    c.log.close()
    rec = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]["encoder_tune"]
    assert rec["status"] == "skipped" and "s left before the" in rec["summary"]
    assert not (tmp_path / gc.TUNE_FILE).exists() and "encoder_tune" not in (tmp_path / "gpu_check.log").read_text()


def _tuner_class(k, statuses):
    results = [{"config": {"i": j}, "tag": f"c{j}", "status": st, **({"error": "boom"} if st in ("wrong", "error")
                                                                     else {"ms_median": 2.0 - j / 10})}
               for j, st in enumerate(statuses)]
    timed = [r for r in results if r["status"] == "timed"]
    return {"dtype": "fp32", "k": k, "K_PAD": k, "precision": "ieee", "results": results,
            "complete": len(timed) == len(results), "all_correct": "wrong" not in statuses,
            "best": timed[-1]["config"] if timed else None, "best_tag": timed[-1]["tag"] if timed else None,
            "default_ms": results[0].get("ms_median"), "default_over_best": 1.1 if timed else None}


@pytest.mark.parametrize(("classes", "rc", "status", "check_ok"), [
    ([("timed", "timed"), ("timed", "timed")], 0, "ok", True),
    ([("timed", "wrong"), ("timed", "timed")], 1, "fail", False),
    ([("timed", "error"), ("timed", "timed")], 1, "fail", False),
    ([("timed", "timed"), ("timed", "not run")], 1, "timeout", True),  # time ran out: not a failure
    ([("timed", "timed")], None, "timeout", True),  # killed after its first class: that class kept
    ([("timed", "timed")], 1, "error", False),  # exited after its first class without being killed: a crash
    (None, 1, "error", False),  # no result file
])
def test_encoder_tuning_status(classes, rc, status, check_ok, tmp_path, monkeypatch):
    """`step_tune` reads the tuner's result file: a wrong or failing candidate fails the check, running out of
    time does not (the step is recorded as timeout and a --resume runs it again)."""
    def fake(cmd, timeout_s, env=None):
        assert cmd[cmd.index("--k") + 1:cmd.index("--k") + 3] == [str(gc.DRY.k), str(4 * gc.DRY.k)]
        stop_at = float(cmd[cmd.index("--stop-at") + 1])
        assert abs(stop_at - (time.time() + timeout_s - gc.TUNE_MARGIN_S)) <= 1
        if classes is not None:
            out = {"classes": [_tuner_class(k, st) for k, st in zip((8, 32), classes, strict=False)]}
            Path(cmd[cmd.index("--out") + 1]).write_text(json.dumps(out))
        return gc.CmdResult(cmd, rc, "", "", 1.0)

    monkeypatch.setattr(gc, "run_command", fake)
    c = gc.Check(gc.DRY, tmp_path, tmp_path)
    c.save("env", "ok", "env")
    gc.step_tune(c)
    c.log.close()
    rec = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rec["steps"]["encoder_tune"]["status"] == status and rec["ok"] is check_ok
    if status == "fail":
        assert "boom" in rec["steps"]["encoder_tune"]["summary"]


def test_steps_run_without_an_inherited_triton_interpreter_flag(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    env = gc.subprocess_env()
    assert "TRITON_INTERPRET" not in env and env["HF_HUB_OFFLINE"] == "1"


def test_sparsify_is_compared_only_when_it_imports(monkeypatch, tmp_path):
    # installed but broken (its import raises): bench --vs sparsify would exit before our step, so no comparison
    import sys

    (tmp_path / "sparsify").mkdir()
    (tmp_path / "sparsify" / "__init__.py").write_text("raise ImportError('a dependency is missing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "sparsify", raising=False)
    gc._sparsify_importable.cache_clear()
    try:
        assert gc._sparsify_importable() is False
    finally:
        gc._sparsify_importable.cache_clear()
        sys.modules.pop("sparsify", None)


def test_env_step_fails_on_cuda_when_the_kernels_cannot_use_triton(monkeypatch, tmp_path):
    # a GPU machine whose Triton is older than the kernels need: every "kernels on" number would be the torch
    # path's, so the check says so at its first step (CUDA stood in for: the device name and the chip's peak)
    import torch
    import triton

    from sae_dist.kernels import _common

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    monkeypatch.setattr(_common, "_TRITON_PROBLEM", None)
    c = gc.Check(dataclasses.replace(gc.DRY, device="cuda"), tmp_path, tmp_path)
    try:
        gc.step_env(c)
    finally:
        monkeypatch.setattr(_common, "_TRITON_PROBLEM", None)
        c.log.close()
    rec = c.record["steps"]["env"]
    assert rec["status"] == "fail" and "KERNELS OFF: triton 3.2.0 is older than 3.3" in rec["summary"]
    assert c.record["env"]["kernels_problem"].startswith("triton 3.2.0 is older")
    monkeypatch.setattr(triton, "__version__", "3.6.0")  # the lent machines' release
    (tmp_path / "ok").mkdir()
    c = gc.Check(dataclasses.replace(gc.DRY, device="cuda"), tmp_path / "ok", tmp_path / "ok")
    try:
        gc.step_env(c)
    finally:
        monkeypatch.setattr(_common, "_TRITON_PROBLEM", None)
        c.log.close()
    assert c.record["env"]["kernels_problem"] is None and "KERNELS OFF" not in c.record["steps"]["env"]["summary"]


# ---------------------------------------------------------------------------- --resume
_IDENT = {"device_name": "NVIDIA H100 80GB HBM3", "torch": "2.13.0", "cuda": "13.0", "triton": "3.9.0"}


def _earlier(tmp_path, statuses: dict, sizes=gc.FULL, logs=("on", "off"), tune_file=True, **env):
    """An earlier check's gpu_check.json (every step "ok" unless `statuses` says otherwise) with the
    training logs named in `logs` (and the tuner's result file) beside it."""
    steps = {n: {"status": statuses.get(n, "ok"), "summary": n, "duration_s": 1.0} for n in gc.step_names(sizes)}
    rec = {"mode": sizes.mode, "sizes": dataclasses.asdict(sizes), "started": "2026-12-07T10:00:00Z",
           "env": {**_IDENT, **env}, "steps": steps}
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(rec))
    for tag in logs:
        (tmp_path / f"train_log_kernels_{tag}.jsonl").write_text('{"step": 10, "train/fvu": 0.5}\n')
    if tune_file:
        (tmp_path / gc.TUNE_FILE).write_text('{"classes": []}\n')
    return path


def test_resume_keeps_what_passed_and_reruns_the_rest(tmp_path):
    path = _earlier(tmp_path, {"bench_n131072": "timeout", "train_kernels_off": "error", "kernel_tests": "pass"})
    r = gc.plan_resume(path, gc.FULL, _IDENT)
    # env, plan and train_curves are recomputed every time; the store is scratch space, so a training
    # run to redo needs it again
    assert r.keep == ("kernel_tests", "encoder_matmul", "bench_n1048576", "bench_n1048576_dead0", "train_kernels_on",
                      "encoder_tune")
    (tmp_path / "all").mkdir()
    everything_passed = gc.plan_resume(_earlier(tmp_path / "all", {}), gc.FULL, _IDENT)
    assert everything_passed.keep == ("kernel_tests", "encoder_matmul", "bench_n1048576", "bench_n1048576_dead0",
                                      "bench_n131072", "synthetic_store", "train_kernels_on", "train_kernels_off",
                                      "encoder_tune")
    forced = gc.plan_resume(path, gc.FULL, _IDENT, rerun=("encoder_matmul", "bench_n1048576", "encoder_tune"))
    assert forced.keep == ("kernel_tests", "bench_n1048576_dead0", "train_kernels_on")
    # a kept step's file (a training run's log, the tuner's result) must come along: else it reruns
    (tmp_path / "train_log_kernels_on.jsonl").unlink()
    (tmp_path / gc.TUNE_FILE).unlink()
    assert {"train_kernels_on", "encoder_tune"}.isdisjoint(gc.plan_resume(path, gc.FULL, _IDENT).keep)


def test_resume_copies_the_kept_files(tmp_path):
    (tmp_path / "before").mkdir()
    path = _earlier(tmp_path / "before", {"train_kernels_off": "fail"})
    (tmp_path / "before" / "kernel_tests.xml").write_text("<testsuite/>")
    r = gc.plan_resume(path, gc.FULL, _IDENT)
    out = tmp_path / "after"
    out.mkdir()
    r.copy_files(out)
    assert sorted(f.name for f in out.iterdir()) == [gc.TUNE_FILE, "kernel_tests.xml", "train_log_kernels_on.jsonl"]
    r.copy_files(tmp_path / "before")  # resuming in place: the files are already there
    assert (tmp_path / "before" / "kernel_tests.xml").read_text() == "<testsuite/>"


@pytest.mark.parametrize(("change", "message"), [
    (dict(sizes=dataclasses.replace(gc.FULL, batch=4096)), r"other sizes \(batch differ"),
    (dict(sizes=gc.DRY), r"mode 'dry', this one 'full'"),
    (dict(device_name="NVIDIA H200"), r"device_name 'NVIDIA H200' there, 'NVIDIA H100 80GB HBM3' here"),
    (dict(triton="3.6.0"), r"triton '3.6.0' there, '3.9.0' here"),
])
def test_resume_refuses_a_check_that_is_not_comparable(tmp_path, change, message):
    path = _earlier(tmp_path, {}, **change)
    with pytest.raises(ValueError, match=message):
        gc.plan_resume(path, gc.FULL, _IDENT)


def test_resume_refuses_bad_input(tmp_path, capsys):
    path = _earlier(tmp_path, {})
    with pytest.raises(ValueError, match="--rerun bench_n1: no such step; steps: env, kernel_tests"):
        gc.plan_resume(path, gc.FULL, _IDENT, rerun=("bench_n1",))
    with pytest.raises(ValueError, match="not a readable gpu_check.json"):
        gc.plan_resume(tmp_path / "missing.json", gc.FULL, _IDENT)
    (tmp_path / "torn.json").write_text('{"steps": ')
    with pytest.raises(ValueError, match="not a readable gpu_check.json"):
        gc.plan_resume(tmp_path / "torn.json", gc.FULL, _IDENT)
    # usage errors exit 2 before any step runs, with the message
    assert gc.main(["--dry", "--rerun", "plan", "--out", str(tmp_path / "o")]) == 2
    assert "--rerun needs --resume" in capsys.readouterr().err
    assert gc.main(["--dry", "--resume", str(path), "--out", str(tmp_path / "o")]) == 2  # a full check's record
    assert "other sizes" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_a_resumed_check_cut_short_keeps_what_it_kept(tmp_path, monkeypatch):
    """The kept steps are in gpu_check.json from its first write: a resumed check killed in its first rerun step
    (a lease ending) leaves a record that a second --resume keeps them from, and it names the earlier host."""
    ident = gc.env_identity("cpu")
    steps = {n: {"status": "ok", "summary": n, "duration_s": 1.0} for n in gc.step_names(gc.DRY)}
    steps["kernel_tests"]["status"] = "error"
    rec = {"mode": "dry", "sizes": dataclasses.asdict(gc.DRY), "started": "T0", "env": {**ident, "host": "gpu07"},
           "steps": steps}
    (tmp_path / "gpu_check.json").write_text(json.dumps(rec))
    for tag in ("on", "off"):
        (tmp_path / f"train_log_kernels_{tag}.jsonl").write_text('{"step": 1, "train/fvu": 0.5}\n')
    first = gc.plan_resume(tmp_path / "gpu_check.json", gc.DRY, ident)

    def env(c):
        c.record["env"] = ident
        c.save("env", "ok", "env")

    def killed(c):
        raise KeyboardInterrupt  # the lease ends inside the step being redone

    monkeypatch.setattr(gc, "step_env", env)
    monkeypatch.setattr(gc, "step_kernel_tests", killed)
    with pytest.raises(KeyboardInterrupt):
        gc.run_check(gc.DRY, tmp_path, resume=first)
    after = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(after["steps"]) == ["env", *first.keep]  # in run order
    assert all(after["steps"][n]["kept_from"] == "T0" for n in first.keep)
    assert after["resumed_from"]["host"] == "gpu07" and "on host gpu07" in (tmp_path / "gpu_check.md").read_text()
    assert gc.plan_resume(tmp_path / "gpu_check.json", gc.DRY, ident).keep == first.keep
