"""`python -m sae_dist.bench` prints one JSON line with every documented key (tiny shapes, CPU)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

BASE_KEYS = {"step_ms", "matmul_ms", "step_over_matmul", "tokens_per_s", "peak_mem_mb",
             "peak_mem_method", "param_grad_adam_mb", "device", "device_name", "torch", "triton",
             "date", "d", "n", "k", "batch", "dtype", "kernels", "kernels_used", "k_aux",
             "dead_latents", "iters", "warmup"}
SPARSIFY_KEYS = {"sparsify_step_ms", "speedup_vs_sparsify", "sparsify_version"}
POSITIVE = ("step_ms", "matmul_ms", "step_over_matmul", "tokens_per_s", "peak_mem_mb",
            "param_grad_adam_mb")


def _run(args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-m", "sae_dist.bench", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _check_record(rec: dict, d, n, k, batch) -> None:
    assert BASE_KEYS <= rec.keys(), f"missing keys {BASE_KEYS - rec.keys()}"
    for key in POSITIVE:
        assert isinstance(rec[key], (int, float)) and rec[key] > 0, (key, rec[key])
    assert math.isclose(rec["step_over_matmul"], rec["step_ms"] / rec["matmul_ms"], rel_tol=1e-12)
    assert rec["host_syncs_per_step"] is None  # counted on CUDA only
    assert math.isclose(rec["tokens_per_s"], batch / (rec["step_ms"] / 1e3), rel_tol=1e-12)
    assert (rec["d"], rec["n"], rec["k"], rec["batch"], rec["device"]) == (d, n, k, batch, "cpu")
    # params + grads + Adam's two moments, fp32: 4 tensors of (2*d*n + n + d) floats
    assert rec["param_grad_adam_mb"] == pytest.approx(4 * 4 * (2 * d * n + n + d) / 2**20)
    # the step holds all of those at once, so the measured growth cannot be smaller
    assert rec["peak_mem_mb"] >= 0.9 * rec["param_grad_adam_mb"]
    assert rec["dead_latents"] == round(0.05 * n)
    assert rec["alloc_retries"] is None  # CUDA's allocator count only


@pytest.mark.slow
def test_bench_cli_one_json_line(tmp_path):
    # eai-sparsify is a test extra: the comparison always runs in `make test`
    have_sparsify = importlib.util.find_spec("sparsify") is not None
    assert have_sparsify, "eai-sparsify is missing: pip install -e '.[test]'"
    args = ["--d", "64", "--n", "2048", "--k", "8", "--batch", "128", "--iters", "3", "--warmup", "1",
            "--device", "cpu", "--threads", "1"]
    p = _run(args + (["--vs", "sparsify"] if have_sparsify else []))
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stdout
    rec = json.loads(lines[0])
    _check_record(rec, 64, 2048, 8, 128)
    assert rec["kernels"] is True and rec["kernels_used"] is True
    if have_sparsify:
        assert SPARSIFY_KEYS <= rec.keys()
        assert rec["sparsify_step_ms"] > 0
        assert math.isclose(rec["speedup_vs_sparsify"], rec["sparsify_step_ms"] / rec["step_ms"],
                            rel_tol=1e-12)


@pytest.mark.usefixtures("worker_forkserver")  # tests/conftest.py, for run_module_forked
def test_bench_cli_plain_path_and_multi_topk(tmp_path):
    # `python -m sae_dist.bench` in a process forked from the test forkserver (torch imported there, no
    # tensor allocated: the step's memory high-water mark is measured as in a fresh process)
    from helpers.prestarted import run_module_forked

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]]
                                                                       if os.environ.get("PYTHONPATH") else []))}
    p = run_module_forked("sae_dist.bench", ["--d", "32", "--n", "512", "--k", "4", "--batch", "64", "--iters", "2",
                                             "--warmup", "0", "--device", "cpu", "--threads", "1", "--kernels", "off",
                                             "--multi-topk"], cwd=ROOT, env=env, tmp_dir=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads(p.stdout)
    _check_record(rec, 32, 512, 4, 64)
    assert rec["kernels"] is False and rec["multi_topk"] is True


@pytest.mark.usefixtures("worker_forkserver")  # tests/conftest.py, for run_module_forked
def test_bench_baseline_dead_frac_pairs_the_steps(tmp_path):
    # --baseline-dead-frac adds the interleaved pair: the step at --dead-frac and at the baseline fraction
    from helpers.prestarted import run_module_forked

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]]
                                                                       if os.environ.get("PYTHONPATH") else []))}
    p = run_module_forked("sae_dist.bench", ["--d", "32", "--n", "512", "--k", "4", "--batch", "64", "--iters", "2",
                                             "--warmup", "1", "--device", "cpu", "--threads", "1",
                                             "--baseline-dead-frac", "0.02"], cwd=ROOT, env=env, tmp_dir=tmp_path,
                          timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads(p.stdout)
    _check_record(rec, 32, 512, 4, 64)
    assert rec["baseline_dead_latents"] == round(0.02 * 512) == 10
    assert rec["paired_step_ms"] > 0 and rec["baseline_step_ms"] > 0
    assert math.isclose(rec["step_over_baseline"], rec["paired_step_ms"] / rec["baseline_step_ms"], rel_tol=1e-12)


def test_time_interleaved_alternates_and_times_each():
    from sae_dist.bench import time_interleaved

    calls = []
    times = time_interleaved([lambda i: calls.append(("a", i)), lambda i: calls.append(("b", i))],
                             iters=3, warmup=1, device=torch.device("cpu"))
    assert calls == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3), ("b", 3)]
    assert [len(t) for t in times] == [3, 3] and all(v >= 0 for t in times for v in t)


def test_bench_vs_sparsify_missing_names_install(tmp_path):
    # Shadow the package with one that fails to import: the CLI must name the install command.
    fake = tmp_path / "sparsify"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('no sparsify here')\n")
    p = _run(["--d", "8", "--n", "32", "--k", "2", "--batch", "8", "--vs", "sparsify", "--device", "cpu"],
             env_extra={"PYTHONPATH": str(tmp_path)})
    assert p.returncode != 0
    assert "[bench] extra" in p.stderr and 'pip install "sae-dist[bench]"' in p.stderr
    assert p.stdout.strip() == ""


def test_bench_bad_arguments():
    from sae_dist.bench import main

    with pytest.raises(SystemExit, match="--k 9 > --n 8"):
        main(["--d", "4", "--n", "8", "--k", "9", "--batch", "2"])
    with pytest.raises(SystemExit):  # argparse: non-positive size
        main(["--d", "0", "--n", "8", "--k", "1", "--batch", "2"])
    with pytest.raises(SystemExit, match=r"--baseline-dead-frac must be in \[0, 1\], got 1.5"):
        main(["--d", "4", "--n", "8", "--k", "1", "--batch", "2", "--baseline-dead-frac", "1.5"])


@pytest.mark.usefixtures("worker_forkserver")  # tests/conftest.py, for run_module_forked
def test_bench_sparsify_micro_batches(tmp_path):
    # sparsify's trainer splits a batch into micro-batches to fit memory (micro_acc_steps); bench does the
    # same with --sparsify-micro-batches and records the count (`auto`, which doubles it on CUDA
    # out-of-memory, runs in tests/unit/test_gpu_check.py's dry run). `python -m sae_dist.bench` runs in a
    # process forked from the test forkserver (run_module_forked): sparsify is imported there, never in the
    # pytest process, whose later tests it could otherwise affect.
    from helpers.prestarted import run_module_forked

    args = ["--d", "16", "--n", "256", "--k", "4", "--batch", "64", "--iters", "1", "--warmup", "0",
            "--device", "cpu", "--threads", "1", "--vs", "sparsify"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]]
                                                                       if os.environ.get("PYTHONPATH") else []))}
    p = run_module_forked("sae_dist.bench", args + ["--sparsify-micro-batches", "2"], cwd=ROOT, env=env,
                          tmp_dir=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads(p.stdout)
    assert rec["sparsify_micro_batches"] == 2 and rec["sparsify_step_ms"] > 0 and rec["sparsify_alloc_retries"] is None
    from sae_dist.bench import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--d", "1", "--n", "1", "--k", "1", "--batch", "1",
                                   "--sparsify-micro-batches", "0"])


def test_sparsify_auto_micro_batches_double_on_cuda_oom(monkeypatch):
    # no GPU needed: a fake sparsify step that runs out of CUDA memory below 4 micro-batches
    import argparse

    import torch

    from sae_dist import bench

    made = []

    def fake_make(d, n, k, device, multi_topk, dead, xs, bf16, auxk_alpha, micro=1):
        made.append(micro)

        def step(i):
            if micro < 4:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

        return step, "fake"

    monkeypatch.setattr(bench, "_make_sparsify_step", fake_make)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    args = argparse.Namespace(d=8, n=32, k=2, batch=8, multi_topk=False, iters=2, warmup=1,
                              sparsify_micro_batches="auto")
    res = bench._time_sparsify(args, torch.device("cpu"), None, [], False, 1 / 32)
    assert made == [1, 2, 4] and res["micro"] == 4 and len(res["times"]) == 2
    args.batch = 2  # no count up to the batch size fits: an error in the record instead of a crash
    made.clear()
    res = bench._time_sparsify(args, torch.device("cpu"), None, [], False, 1 / 32)
    assert made == [1, 2] and "out of memory" in res["error"] and "times" not in res
    args.sparsify_micro_batches = 1  # an explicit count keeps the exception
    with pytest.raises(torch.cuda.OutOfMemoryError):
        bench._time_sparsify(args, torch.device("cpu"), None, [], False, 1 / 32)


def test_a_failing_sparsify_step_is_recorded_not_raised(monkeypatch):
    # any error of sparsify's step (here a RuntimeError, as its Triton decoder could raise) becomes
    # sparsify_error in the record, so our measured step is still printed
    import argparse

    from sae_dist import bench

    def fake_make(d, n, k, device, multi_topk, dead, xs, bf16, auxk_alpha, micro=1):
        def step(i):
            raise RuntimeError("triton: out of resources\nsecond line")

        return step, "fake"

    monkeypatch.setattr(bench, "_make_sparsify_step", fake_make)
    args = argparse.Namespace(d=8, n=32, k=2, batch=8, multi_topk=False, iters=2, warmup=1, sparsify_micro_batches=1)
    rec = bench._sparsify_record(args, torch.device("cpu"), None, [], False, 1 / 32, step_ms=10.0, matmul_ms=5.0)
    assert rec == {"sparsify_micro_batches": 1, "sparsify_error": "RuntimeError: triton: out of resources"}


def test_the_bench_step_does_not_import_the_store():
    # the step needs neither zarr nor the trainer module, so the benchmarks run on a machine whose Python lacks them
    code = ("import sys; sys.modules['zarr'] = None; import torch; from sae_dist import bench; "
            "bench._make_our_step(8, 32, 2, torch.float32, torch.device('cpu'), True, False, "
            "torch.zeros(32, dtype=torch.bool), [torch.randn(4, 8)], False)[2](0); "
            "print('sae_dist.store' in sys.modules, 'sae_dist.train.trainer' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == ["False", "False"]


def test_alloc_retries_count_the_cuda_allocators_retries_during_timing(monkeypatch):
    from sae_dist import bench

    seen = []
    counts = iter([3, 7])
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda dev: seen.append(dev) or {"num_alloc_retries": next(counts)})
    cuda = torch.device("cuda")
    before = bench._alloc_retries(cuda)
    assert (before, bench._alloc_retries(cuda, before), seen) == (3, 4, [cuda, cuda])
    assert bench._alloc_retries(torch.device("cpu")) is None
