"""`make gpu-check`: one prepared command for a GPU machine (docs/gpu-check.md).

    python -m sae_dist.gpu_check [--dry] [--out DIR] [--device cpu|cuda] [--keep-work]
                                 [--resume DIR/gpu_check.json [--rerun STEP,...]]
    python -m sae_dist.gpu_check --recalibrate DIR/gpu_check.json

On one H100/H200 it finishes within `FULL.total_budget_s` (465 s, under 8 minutes) and writes
`gpu_check.json` (every number), `gpu_check.md` (markdown tables), `kernel_tests.xml` (junit),
`gpu_check.log` (every command with its output) and the two training logs into `--out`
(default runs/gpu_check). Steps, in order, each a subprocess under its own time budget (seconds):
a step that overruns is killed and recorded as "timeout", and the check moves on; the JSON and the
markdown are rewritten after every step, so no step's result is lost:

  kernel_tests      pytest on the kernel test files and the harvester's CUDA tests (KERNEL_TEST_FILES;
                    CUDA tensors on a GPU machine, Triton's interpreter on CPU; a quick `-k` subset in
                    dry mode): passed / failed / errors / skipped counts and duration from pytest's
                    junit xml.
  encoder_matmul    the bare encoder matmul x[B, d] @ W_enc[d, n] at the large shape, timed with CUDA
                    events (median over iterations, two input batches alternated, random data), in ms
                    and TFLOP/s (2*B*d*n FLOPs) against the chip's dense peak (`CHIP_PEAKS`); a
                    device-to-device copy's bandwidth (GB/s, bytes read + written); and the encoder
                    backward's two W_enc-gradient paths, the atomic kernel and the CSR product, on
                    the same B x (k + k_aux) random codes (ms each, and how far they differ).
  bench_n<N>[_dead0] `python -m sae_dist.bench` (its JSON line parsed) at d_in, k, B for n_small and
                    n_large with `--vs sparsify` (dead fraction 0.05), and n_large at --dead-frac 0.
  synthetic_store   a `SyntheticDictionary` activation store (`sae_dist.store.write_store`).
  train_kernels_on / train_kernels_off
                    `sae-train` on that store with sae.kernel_backend=auto (Triton on CUDA) / torch (the
                    kernels' torch backend), same seed and data order.
  train_curves      the two runs' train/fvu curves (train_log.jsonl), smoothed by a trailing mean over
                    `curve_window` logged points, compared after `curve_skip_frac` of the steps:
                    pass when max |on - off| / off <= `curve_rtol` (1 %: docs/gpu-check.md says why).
  plan              sae-plan's prediction (`sae_dist.plan.plan`, one GPU) of step time and memory at
                    the bench shapes, beside the measured step_ms and peak_mem_mb.
  encoder_tune      `python -m sae_dist.kernels.tune` in the time left before the deadline: the fused
                    encoder's launch candidates at d_in, tune_batch tokens, tune_n latents, for k and 4k,
                    checked and timed (encoder_tune.json in the output dir); skipped or cut short by the
                    deadline, it does not fail the check.
Then the goals (issue 14 item 7, and item 3's dead-latent goal; `GOALS`), each pass / fail / n/a with
the measured number, and the sae-plan constants this measurement recalibrates (`recalibrate`).

`--dry` runs the same steps at tiny shapes (`DRY`: fp32 on the CPU unless --device cuda, the kernel
tests' `-k` subset under Triton's interpreter, a few training steps), so that a script bug is found
before GPU minutes are spent; `tests/integration/test_gpu_check_dry.py` runs it in `make test`.
`--resume DIR/gpu_check.json` completes an earlier check of the same sizes on the same device and
versions (`plan_resume`): the steps that passed are copied from it, the others run (with their
budgets, under a fresh deadline), so a short GPU lease need not repeat what already ran.
Exit code: 0 when every step passed (goals are recorded, not enforced), 1 otherwise; 2 for bad usage
(e.g. the full check without CUDA, or a --resume of a check that is not comparable), before any step.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import functools
import importlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = ["CheckSizes", "FULL", "DRY", "ChipPeak", "CHIP_PEAKS", "chip_peak", "GOALS", "compare_curves",
           "evaluate_goals", "recalibrate", "render_markdown", "run_check", "main"]

ROOT = Path(__file__).resolve().parents[1]
#: The kernel_tests step's pytest files: the kernels', and the harvester's, LM stream's and load_sae's CUDA tests.
KERNEL_TEST_FILES = ("tests/unit/kernels/test_kernels_encoder.py", "tests/unit/kernels/test_kernels_decode.py",
                     "tests/unit/kernels/test_kernels_auxk.py", "tests/unit/kernels/test_kernels_dead_pass.py",
                     "tests/unit/kernels/test_kernel_step.py", "tests/integration/kernels/test_kernels_import.py",
                     "tests/unit/harvest/test_harvest_cuda.py")
GiB = 2**30


# ------------------------------------------------------------------------------------------ chip peaks
@dataclass(frozen=True)
class ChipPeak:
    """Datasheet figures of one GPU model: `match` is a substring of torch.cuda.get_device_name;
    bf16_tflops the dense (non-sparse) bf16 tensor-core peak in TFLOP/s; hbm_gbytes_per_s the memory
    bandwidth in GB/s (1e9 bytes)."""

    match: str
    bf16_tflops: float
    hbm_gbytes_per_s: float


#: The one table of peaks (first match wins, so the specific names come first). H100 SXM and H200 share
#: the compute die (989 TFLOP/s dense bf16); the H200 has HBM3e at 4.8 TB/s.
CHIP_PEAKS: tuple[ChipPeak, ...] = (
    ChipPeak("H200", 989.0, 4800.0),
    ChipPeak("H100 NVL", 835.0, 3900.0),
    ChipPeak("H100 PCIe", 756.0, 2000.0),
    ChipPeak("H100", 989.0, 3350.0),  # H100 SXM5 80GB ("NVIDIA H100 80GB HBM3")
    ChipPeak("A100", 312.0, 2039.0),
)


def chip_peak(device_name: str) -> ChipPeak | None:
    """The `CHIP_PEAKS` entry whose `match` occurs in `device_name` (case-insensitive), else None
    (a CPU, or a GPU not in the table: the peak-relative goal is then "n/a")."""
    low = device_name.lower()
    return next((c for c in CHIP_PEAKS if c.match.lower() in low), None)


# ------------------------------------------------------------------------------------------ sizes
@dataclass(frozen=True)
class CheckSizes:
    """Every size and budget of one check (`FULL` on a GPU, `DRY` anywhere).

    Shapes: d_in, k, batch (tokens per step) of the benchmarks and the encoder matmul; n_small and
    n_large latents; dead_frac: the benchmarks' dead-latent fraction (goal: vs 0 at n_large).
    bench_iters / bench_warmup: timed / untimed steps per benchmark; matmul_iters: timed matmuls.
    copy_mib: buffer of the copy-bandwidth measurement, MiB. kernel_tests_k: pytest -k expression
    (None: every test); kernel_test_workers: pytest-xdist workers when xdist is installed (0: none).
    Training comparison: train_n, train_k, train_batch, train_steps, train_log_every (steps),
    train_dead_tokens (tokens unfired before a latent is dead, small so that AuxK runs), store_tokens,
    store_features, store_p_active (the synthetic dictionary). Curve check: curve_rtol (relative),
    curve_window (logged points averaged), curve_skip_frac (fraction of steps skipped as warmup).
    Encoder tuning (`sae_dist.kernels.tune`, at d_in and dtype, for k and Multi-TopK's 4k): tune_n latents,
    tune_batch tokens, tune_warmup untimed and tune_iters timed launches per candidate.
    budgets_s: seconds per step name; total_budget_s: the whole check's deadline, seconds.
    """

    mode: str
    device: str
    dtype: str
    d_in: int
    k: int
    batch: int
    n_small: int
    n_large: int
    dead_frac: float
    bench_iters: int
    bench_warmup: int
    matmul_iters: int
    copy_mib: int
    kernel_tests_k: str | None
    kernel_test_workers: int
    train_n: int
    train_k: int
    train_batch: int
    train_steps: int
    train_log_every: int
    train_dead_tokens: int
    store_tokens: int
    store_features: int
    store_p_active: float
    curve_rtol: float
    curve_window: int
    curve_skip_frac: float
    tune_n: int
    tune_batch: int
    tune_warmup: int
    tune_iters: int
    budgets_s: dict[str, float] = field(default_factory=dict)
    total_budget_s: float = 465.0

    def budget(self, step: str) -> float:
        """Time budget of `step` in seconds (KeyError naming the step when it has none)."""
        try:
            return float(self.budgets_s[step])
        except KeyError:
            raise KeyError(f"CheckSizes.budgets_s has no budget for step {step!r}") from None


_BUDGET_KEYS = ("kernel_tests", "encoder_matmul", "bench_large", "bench_large_dead0", "bench_small",
                "synthetic_store", "train_kernels_on", "train_kernels_off", "encoder_tune")

#: One H100/H200: 450 s of step budgets before the encoder tuning inside a 465 s deadline, counted from the
#: check's start: 15 s for the check's own work between steps (the sparsify import check, sae-plan, the file
#: writes), and the 8-minute limit less the interpreter's start, the imports and the last write. The tuning
#: comes last and takes what the steps before it left of the deadline (at most its 120 s budget).
FULL = CheckSizes(
    mode="full", device="cuda", dtype="bf16", d_in=768, k=32, batch=32768, n_small=2**17, n_large=2**20,
    dead_frac=0.05, bench_iters=8, bench_warmup=2, matmul_iters=10, copy_mib=4096,
    kernel_tests_k=None, kernel_test_workers=8,
    train_n=2**16, train_k=32, train_batch=4096, train_steps=1000, train_log_every=10,
    train_dead_tokens=25 * 4096, store_tokens=65536, store_features=2048, store_p_active=0.015,
    curve_rtol=0.01, curve_window=5, curve_skip_frac=0.1, tune_n=2**18, tune_batch=32768, tune_warmup=1,
    tune_iters=10,
    budgets_s=dict(zip(_BUDGET_KEYS, (95, 35, 115, 45, 45, 15, 50, 50, 120), strict=True)), total_budget_s=465.0,
)

#: Tiny shapes, fp32, the CPU: the same steps in well under a minute on a 2-core machine.
DRY = CheckSizes(
    mode="dry", device="cpu", dtype="fp32", d_in=32, k=8, batch=256, n_small=1024, n_large=2048,
    dead_frac=0.05, bench_iters=2, bench_warmup=1, matmul_iters=3, copy_mib=16,
    kernel_tests_k="bad or padding_index", kernel_test_workers=0,
    train_n=1024, train_k=8, train_batch=256, train_steps=12, train_log_every=2,
    train_dead_tokens=2 * 256, store_tokens=8192, store_features=128, store_p_active=0.05,
    curve_rtol=0.01, curve_window=3, curve_skip_frac=0.1, tune_n=256, tune_batch=64, tune_warmup=0, tune_iters=1,
    budgets_s=dict(zip(_BUDGET_KEYS, (90, 60, 90, 60, 60, 60, 90, 90, 90), strict=True)), total_budget_s=600.0,
)

# Goals (issue 14 items 3 and 7): the thresholds live here and nowhere else.
GOAL_STEP_OVER_MATMUL = 1.3
GOAL_SPEEDUP_VS_SPARSIFY = 2.0
GOAL_GEMM_FRACTION_OF_PEAK = 0.60
GOAL_DEAD_FRAC_RATIO = 1.2
MIN_STEP_S = 3.0  # a step with less time left than this before the deadline is skipped

#: (name, description, comparison, threshold) of every goal; `evaluate_goals` measures them.
GOALS: tuple[tuple[str, str, str, float], ...] = (
    ("step_vs_matmul", "training step at n_large / bare encoder matmul (same shape and dtype)", "<=",
     GOAL_STEP_OVER_MATMUL),
    ("speedup_vs_sparsify", "sparsify's step / our step at n_large", ">=", GOAL_SPEEDUP_VS_SPARSIFY),
    ("gemm_fraction_of_peak", "bare encoder GEMM TFLOP/s / the chip's dense bf16 peak", ">=",
     GOAL_GEMM_FRACTION_OF_PEAK),
    ("dead_frac_ratio", "step with dead_frac of the latents dead / step with none, n_large", "<=",
     GOAL_DEAD_FRAC_RATIO),
)


# ------------------------------------------------------------------------------------------ commands
@dataclass
class CmdResult:
    """One subprocess: rc (None when killed at its timeout), stdout / stderr text, duration_s."""

    cmd: list[str]
    rc: int | None
    stdout: str
    stderr: str
    duration_s: float

    @property
    def timed_out(self) -> bool:
        return self.rc is None


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every step: this checkout first on PYTHONPATH (works without an install),
    unbuffered output, wandb and the HF libraries offline (the GPU machine has no network), no
    TRITON_INTERPRET (the kernel tests' conftest sets it itself where there is no GPU)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # an inherited interpreter flag would run Triton on CUDA tensors at CPU speed
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra or {})
    return env


def run_command(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None,
                cwd: Path = ROOT) -> CmdResult:
    """Run `cmd` in its own process group; at `timeout_s` seconds the whole group is killed (SIGKILL)
    and rc is None. Output goes through temporary files (no pipe can fill up)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env or subprocess_env(), stdout=fo, stderr=fe,
                                start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=max(timeout_s, 0.1))
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read().decode(errors="replace"), fe.read().decode(errors="replace")
    return CmdResult(list(cmd), rc, out, err, time.perf_counter() - t0)


def _last_json_line(text: str) -> dict:
    """The last non-empty line of `text` parsed as a JSON object (ValueError when there is none)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError("no output line")
    rec = json.loads(lines[-1])
    if not isinstance(rec, dict):
        raise ValueError(f"last line is not a JSON object: {lines[-1][:200]}")
    return rec


def _tail(text: str, n: int = 2000) -> str:
    return text[-n:]


def _pow2(n: int) -> str:
    """2^k for a power of two, else n with thousands separators."""
    return f"2^{n.bit_length() - 1}" if n > 0 and n & (n - 1) == 0 else f"{n:,}"


# ------------------------------------------------------------------------------------------ workers
def _time_ms(fn: Callable[[int], object], iters: int, warmup: int, device) -> list[float]:
    """fn(i) `warmup` times untimed, then `iters` times, each timed in ms: with CUDA events recorded
    around every call (back to back, the queue stays full) on CUDA, with perf_counter on the CPU."""
    import torch

    for i in range(warmup):
        fn(i)
    if device.type != "cuda":
        times = []
        for i in range(iters):
            t0 = time.perf_counter()
            fn(warmup + i)
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for i, (start, end) in enumerate(events):
        start.record()
        fn(warmup + i)
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def _device_info(device) -> dict:
    """name, memory_gib (GPU memory, or the host's RAM for the CPU), capability and SM count (CUDA)."""
    import torch

    from sae_dist.bench import device_name

    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {"name": p.name, "memory_gib": p.total_memory / GiB, "capability": f"{p.major}.{p.minor}",
                "multiprocessors": p.multi_processor_count}
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {"name": device_name(device), "memory_gib": ram / GiB, "capability": None, "multiprocessors": None}


def _matmul_ms_by_layout(d: int, n: int, batch: int, dt, dev, gen, iters: int) -> dict[str, float]:
    """Median ms of x[batch, d] @ W[d, n] into a preallocated output, per W layout: "d_n" row-major
    (TopKSAE's layout) and "n_d_t" (transpose of a contiguous [n, d]). Two random x alternate."""
    import torch

    xs = [torch.randn(batch, d, device=dev, generator=gen).to(dt) for _ in range(2)]
    W = (torch.randn(d, n, device=dev, generator=gen) / d**0.5).to(dt)
    out = torch.empty(batch, n, device=dev, dtype=dt)
    by_layout = {}
    for layout, Wl in (("d_n", W), ("n_d_t", W.t().contiguous().t())):

        def mm(i: int, Wl=Wl) -> None:
            torch.matmul(xs[i % 2], Wl, out=out)

        by_layout[layout] = statistics.median(_time_ms(mm, iters, 3, dev))
    return by_layout


def measure_wgrad(d: int, n: int, batch: int, slots: int, device: str, iters: int) -> dict:
    """The encoder backward's two W_enc-gradient paths (`encoder_topk._grad_w_enc`) on the same random
    codes: [batch, slots] latent ids (uniform over n) with fp32 gradients, none zero, and an fp32
    x - b_dec [batch, d]. atomic_ms / csr_ms: median ms of the atomic-scatter kernel (what fp32
    training on one GPU runs) and of the CSR product (what bf16 training runs, and any run under
    tp > 1); max_rel_diff: max |atomic - csr| / max |csr| of the two [d, n] fp32 gradients."""
    import torch

    from sae_dist.kernels import encoder_topk as et

    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(batch, d, device=dev, generator=gen)
    idx = torch.randint(0, n, (batch, slots), device=dev, generator=gen)
    g = torch.randn(batch, slots, device=dev, generator=gen)
    W = torch.empty(d, n, device=dev)  # only its shape and dtype are read
    out, grads = {"slots": slots}, {}
    for path in ("atomic", "csr"):
        def grad(i: int, atomic=path == "atomic") -> torch.Tensor:
            return et._grad_w_enc(x, g, idx, None, W, atomic, et.LATENT_CHUNK)

        grads[path] = grad(0)  # also the warmup (the atomic kernel compiles here)
        out[f"{path}_ms"] = statistics.median(_time_ms(grad, iters, 0, dev))
    out["max_rel_diff"] = float((grads["atomic"] - grads["csr"]).abs().max() / grads["csr"].abs().max())
    return out


def measure_matmul(d: int, n: int, batch: int, dtype: str, device: str, iters: int, copy_mib: int,
                   wgrad_slots: int) -> dict:
    """The bare encoder matmul (`_matmul_ms_by_layout`; the faster layout reported, matmul_ms in ms,
    tflops = 2*batch*d*n FLOPs / time in TFLOP/s), a device-to-device copy of `copy_mib` MiB
    (copy_gbytes_per_s: bytes read + written per second, GB = 1e9) and, under "wgrad", the two W_enc
    gradient paths with `wgrad_slots` codes per token (`measure_wgrad`). Prints nothing; returns a dict."""
    import torch

    dev, dt = torch.device(device), {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    gen = torch.Generator(device=dev).manual_seed(0)
    by_layout = _matmul_ms_by_layout(d, n, batch, dt, dev, gen, iters)
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # the [batch, n] output (64 GiB at the full shape) goes back first
    best = min(by_layout, key=by_layout.get)
    src = torch.empty(copy_mib * 2**20 // 4, device=dev).uniform_(generator=gen)
    dst = torch.empty_like(src)
    copy_ms = statistics.median(_time_ms(lambda i: dst.copy_(src), iters, 2, dev))
    src = dst = None  # the copy's buffers go before the W_enc-gradient timings
    out = {"device_info": _device_info(dev), "d": d, "n": n, "batch": batch, "dtype": dtype,
           "matmul_ms": by_layout[best], "layout": best, "matmul_ms_by_layout": by_layout,
           "tflops": 2 * batch * d * n / (by_layout[best] * 1e-3) / 1e12,
           "copy_gbytes_per_s": 2 * copy_mib * 2**20 / (copy_ms * 1e-3) / 1e9, "copy_mib": copy_mib}
    try:  # a failure here must not cost the matmul numbers the goals need
        out["wgrad"] = measure_wgrad(d, n, batch, wgrad_slots, device, iters)
    except Exception as e:  # noqa: BLE001 - recorded, not raised
        out["wgrad"] = {"slots": wgrad_slots, "error": f"{type(e).__name__}: {e}"[:2000]}
    return out


def write_synthetic_store(path: str, d: int, tokens: int, features: int, p_active: float, seed: int) -> dict:
    """Write `tokens` activations of width d drawn from a `SyntheticDictionary` (features unit
    directions, each on with probability p_active) as an activation store at `path`."""
    import torch

    from sae_dist.eval.synthetic import SyntheticDictionary
    from sae_dist.store import write_store

    t0 = time.perf_counter()
    sd = SyntheticDictionary(d, features, p_active=p_active, seed=seed)
    x = torch.cat([sd.sample(min(16384, tokens - i))[0] for i in range(0, tokens, 16384)])
    write_store(path, x, attrs={"hook_name": "synthetic", "model": "synthetic"})
    return {"path": path, "tokens": tokens, "d": d, "features": features, "seconds": time.perf_counter() - t0}


def worker(spec_json: str) -> None:
    """Subprocess entry of the in-Python steps: {"task": "matmul" | "store", **kwargs}; prints one
    JSON line."""
    spec = json.loads(spec_json)
    task = spec.pop("task")
    fn = {"matmul": measure_matmul, "store": write_synthetic_store}[task]
    print(json.dumps(fn(**spec)), flush=True)


def _worker_cmd(**spec) -> list[str]:
    return [sys.executable, "-c", "import sys; from sae_dist.gpu_check import worker; worker(sys.argv[1])",
            json.dumps(spec)]


# ------------------------------------------------------------------------------------------ the check
class Check:
    """State of one run: sizes, output and scratch directories, the deadline, every step's record.

    `record` is the JSON written to out/gpu_check.json: mode, sizes, env, steps {name: {status,
    duration_s, budget_s, summary, ...}}, goals, plan_comparison, recalibration, wall_s, ok.
    """

    def __init__(self, sizes: CheckSizes, out: Path, work: Path, resume: Resume | None = None):
        self.sizes, self.out, self.work, self.resume = sizes, out, work, resume
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + sizes.total_budget_s
        self.record: dict[str, Any] = {
            "mode": sizes.mode, "sizes": dataclasses.asdict(sizes), "steps": {}, "goals": [],
            "plan_comparison": [], "recalibration": {},
            "started": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        if resume is not None:  # the kept steps are in the record from its first write: a check cut short keeps them
            self.record["resumed_from"] = {"path": str(resume.path), "started": resume.earlier.get("started"),
                                           "host": (resume.earlier.get("env") or {}).get("host"),
                                           "kept": list(resume.keep)}
            self.record["steps"] = {n: self._kept_record(n) for n in resume.keep}
        self.log = (out / "gpu_check.log").open("a" if resume else "w", encoding="utf-8")
        if resume is not None:
            self.log.write(f"\n===== resumed from {resume.path} (run of {resume.earlier.get('started')}); "
                           f"kept: {', '.join(resume.keep) or 'nothing'}\n")

    def step(self, name: str) -> dict | None:
        """The record of step `name`, None when it has not run."""
        return self.record["steps"].get(name)

    def _kept_record(self, name: str) -> dict:
        """Kept step `name`'s record from the resumed check, marked "kept_from": the start of the check that
        ran it (of an earlier one when the resumed check had kept it too)."""
        rec = self.resume.earlier["steps"][name]
        return {**rec, "kept_from": rec.get("kept_from") or self.resume.earlier.get("started")}

    def restore(self, name: str):
        """Report kept step `name` (its record is in place since the start) and return what the step would:
        a training run's logged records (from its log beside this check's outputs), the scratch store's
        path (unused: a kept store means both runs were kept), else None."""
        rec = self.record["steps"][name]
        print(f"gpu-check: {name}: {rec['status']} (kept from the run of {rec['kept_from']})", file=sys.stderr,
              flush=True)
        if name in _TRAIN_STEPS:
            return _read_jsonl(self.out / _TRAIN_STEPS[name])
        return self.work / "synthetic.zarr" if name == "synthetic_store" else None

    def time_left(self, budget_key: str) -> float:
        """min(the step's budget, seconds to the deadline)."""
        return min(self.sizes.budget(budget_key), self.deadline - time.perf_counter())

    def save(self, name: str, status: str, summary: str, duration_s: float = 0.0, budget_s: float | None = None,
             **detail) -> dict:
        """Record a step (status: pass | ok | fail | error | timeout | skipped) and rewrite the outputs."""
        rec = {"status": status, "summary": summary, "duration_s": round(duration_s, 2),
               "budget_s": None if budget_s is None else round(budget_s, 1), **detail}
        steps = {**self.record["steps"], name: rec}
        order = step_names(self.sizes)  # run order, whatever was kept
        self.record["steps"] = {n: steps[n] for n in sorted(steps, key=lambda n: order.index(n) if n in order
                                                                    else len(order))}
        self.write()
        print(f"gpu-check: {name}: {status} ({duration_s:.1f} s) {summary}", file=sys.stderr, flush=True)
        return rec

    def run(self, name: str, cmd: list[str], budget_key: str, env: dict | None = None) -> CmdResult | None:
        """Run a step's command under its budget; None (and a "skipped" record) when no time is left."""
        if self.deadline - time.perf_counter() < MIN_STEP_S:
            self.save(name, "skipped", f"no time left before the {self.sizes.total_budget_s:.0f} s deadline")
            return None
        timeout = self.time_left(budget_key)
        res = run_command(cmd, timeout, env=env)
        self.log.write(f"\n===== {name}: rc={res.rc} {res.duration_s:.1f} s (budget {timeout:.0f} s)\n$ "
                       f"{' '.join(cmd)}\n----- stdout\n{res.stdout[-200_000:]}\n----- stderr\n"
                       f"{res.stderr[-200_000:]}\n")
        self.log.flush()
        return res

    def failed_cmd(self, name: str, res: CmdResult, budget_key: str, what: str = "") -> dict:
        """Record a command that timed out or exited non-zero, with its output's tail."""
        status = "timeout" if res.timed_out else "error"
        msg = (f"killed at its time limit after {res.duration_s:.0f} s (budget {self.sizes.budget(budget_key):.0f} s)"
               if res.timed_out else f"exit code {res.rc}") + (f"; {what}" if what else "")
        return self.save(name, status, msg, res.duration_s, self.sizes.budget(budget_key),
                         stderr_tail=_tail(res.stderr), stdout_tail=_tail(res.stdout))

    def write(self) -> None:
        """Rewrite gpu_check.json and gpu_check.md from the record."""
        self.record["wall_s"] = round(time.perf_counter() - self.t0, 1)
        self.record["goals"] = evaluate_goals(self.record)
        self.record["recalibration"] = recalibrate(self.record)
        self.record["ok"] = bool(self.record["steps"]) and all(
            v["status"] in ("pass", "ok") or (k in _LEFTOVER_STEPS and v["status"] in ("skipped", "timeout"))
            for k, v in self.record["steps"].items())
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.record, indent=2, default=str))
        os.replace(tmp, self.out / "gpu_check.json")
        (self.out / "gpu_check.md").write_text(render_markdown(self.record))


def env_identity(device: str) -> dict:
    """What makes two checks' measurements comparable: device_name, torch, cuda, triton (None when
    Triton does not import). `device`: "cuda" (GPU 0) or "cpu"."""
    import torch

    name = torch.cuda.get_device_name(0) if device == "cuda" else _device_info(torch.device("cpu"))["name"]
    try:
        import triton

        triton_ver = triton.__version__
    except ImportError:
        triton_ver = None
    return {"device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_ver}


def step_env(c: Check) -> None:
    """Versions, the device, the chip's peaks and the Python packages the steps need (recorded
    missing ones name the wheels to carry to an offline GPU machine)."""
    import torch

    need = {"pytest": "pytest", "hydra": "hydra-core", "omegaconf": "omegaconf", "zarr": "zarr",
            "triton": "triton", "safetensors": "safetensors"}
    optional = {"sparsify": "eai-sparsify", "xdist": "pytest-xdist"}  # the sparsify comparison; parallel tests
    missing = sorted(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None)
    optional_missing = sorted(pkg for mod, pkg in optional.items() if importlib.util.find_spec(mod) is None)
    dev = c.sizes.device
    ident = env_identity(dev)
    name, triton_ver = ident["device_name"], ident["triton"]
    peak = chip_peak(name) if dev == "cuda" else None
    from sae_dist.kernels._common import triton_problem

    # on CUDA the kernels must be able to run, else every "kernels on" number would be the torch path's
    problem = triton_problem() if dev == "cuda" else None
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "triton": triton_ver, "device": dev, "device_name": name, "peak": dataclasses.asdict(peak) if peak else None,
           "missing_packages": missing, "optional_missing": optional_missing, "kernels_problem": problem,
           "host": platform.node(), "root": str(ROOT)}
    c.record["env"] = env
    miss = (f"; MISSING: {', '.join(missing)}" if missing else "") + (
        f"; optional, not installed: {', '.join(optional_missing)}" if optional_missing else "") + (
        f"; KERNELS OFF: {problem}" if problem else "")
    peak_s = f"{peak.bf16_tflops:g} TFLOP/s bf16, {peak.hbm_gbytes_per_s:g} GB/s" if peak else "no peak in the table"
    c.save("env", "fail" if missing or problem else "ok",
           f"{name} ({peak_s}); torch {torch.__version__}, triton {triton_ver}{miss}")


def parse_junit(path: Path) -> dict:
    """Counts (tests, passed, failed, errors, skipped), time_s and up to 20 failing test ids of a
    pytest junit xml file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    tot = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    bad = [f"{tc.get('classname')}::{tc.get('name')}" for s in suites for tc in s.iter("testcase")
           if tc.find("failure") is not None or tc.find("error") is not None]
    return {"tests": tot["tests"], "passed": tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"],
            "failed": tot["failures"], "errors": tot["errors"], "skipped": tot["skipped"],
            "time_s": sum(float(s.get("time", 0.0)) for s in suites), "failing": bad[:20]}


def _count_verbose(stdout: str) -> dict:
    """Outcome counts from pytest -v lines (used when a timeout left no junit file)."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    words = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped"}
    for line in stdout.splitlines():
        if "::" not in line or line.startswith(("FAILED ", "ERROR ")):  # the -ra summary repeats failures
            continue
        for word, key in words.items():
            if f" {word}" in line:
                counts[key] += 1
                break
    return counts


def step_kernel_tests(c: Check) -> None:
    """(a) pytest on KERNEL_TEST_FILES (the -k subset in dry mode), junit xml into the output dir."""
    if not (ROOT / "tests").is_dir():
        c.save("kernel_tests", "skipped", f"no tests/ directory next to {ROOT / 'sae_dist'} (run from a checkout)")
        return
    junit = c.out / "kernel_tests.xml"
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", f"--junitxml={junit}", *KERNEL_TEST_FILES]
    if c.sizes.kernel_tests_k:
        cmd += ["-k", c.sizes.kernel_tests_k]
    workers = c.sizes.kernel_test_workers if importlib.util.find_spec("xdist") else 0
    if workers:
        cmd += ["-n", str(workers)]
    res = c.run("kernel_tests", cmd, "kernel_tests")
    if res is None:
        return
    budget = c.sizes.budget("kernel_tests")
    if junit.is_file() and not res.timed_out:
        counts = parse_junit(junit)
    elif res.timed_out:
        counts = _count_verbose(res.stdout)
        c.save("kernel_tests", "timeout", f"ran past its {budget:.0f} s budget after {counts['passed']} passed, "
               f"{counts['failed']} failed", res.duration_s, budget, **counts, stdout_tail=_tail(res.stdout))
        return
    else:
        c.failed_cmd("kernel_tests", res, "kernel_tests", "no junit xml (pytest could not start?)")
        return
    ok = res.rc == 0 and counts["failed"] == 0 and counts["errors"] == 0 and counts["tests"] > 0
    summary = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
               f"{counts['skipped']} skipped in {counts['time_s']:.0f} s" + (f" (-k {c.sizes.kernel_tests_k!r})"
                                                                          if c.sizes.kernel_tests_k else ""))
    c.save("kernel_tests", "pass" if ok else "fail", summary, res.duration_s, budget, **counts, workers=workers,
           **({} if ok else {"stdout_tail": _tail(res.stdout, 4000)}))


def step_matmul(c: Check) -> None:
    """The bare encoder matmul at n_large timed with device events, the copy bandwidth and the two
    W_enc-gradient paths."""
    from sae_dist.sae.config import default_k_aux

    s = c.sizes
    # the W_enc gradient's codes: k main + k_aux AuxK slots per token, as the benchmarked step's
    cmd = _worker_cmd(task="matmul", d=s.d_in, n=s.n_large, batch=s.batch, dtype=s.dtype, device=s.device,
                      iters=s.matmul_iters, copy_mib=s.copy_mib, wgrad_slots=s.k + default_k_aux(s.d_in))
    # on the CPU the atomic kernel runs under Triton's interpreter
    res = c.run("encoder_matmul", cmd, "encoder_matmul",
                env=subprocess_env({"TRITON_INTERPRET": "1"}) if s.device == "cpu" else None)
    if res is None:
        return
    if res.rc != 0:
        c.failed_cmd("encoder_matmul", res, "encoder_matmul")
        return
    m = _last_json_line(res.stdout)
    peak = (c.record.get("env") or {}).get("peak")
    m["fraction_of_peak"] = m["tflops"] / peak["bf16_tflops"] if peak and s.dtype == "bf16" else None
    frac = f" = {100 * m['fraction_of_peak']:.1f} % of {peak['bf16_tflops']:g}" if m["fraction_of_peak"] else ""
    w = m["wgrad"]
    wg = (f"failed ({w['error'][:200]})" if "error" in w else
          f"atomic {w['atomic_ms']:.3g} ms, CSR {w['csr_ms']:.3g} ms (max rel diff {w['max_rel_diff']:.1e})")
    c.save("encoder_matmul", "ok", f"{m['matmul_ms']:.3g} ms ({m['layout']}), {m['tflops']:.4g} TFLOP/s{frac}; "
           f"copy {m['copy_gbytes_per_s']:.0f} GB/s; W_enc gradient over {w['slots']} codes per token: {wg}",
           res.duration_s, s.budget("encoder_matmul"), **m)


def _bench_specs(s: CheckSizes) -> list[tuple[str, str, int, float, bool]]:
    """(step name, budget key, n, dead_frac, vs sparsify) of the three benchmarks, in run order."""
    return [(f"bench_n{s.n_large}", "bench_large", s.n_large, s.dead_frac, True),
            (f"bench_n{s.n_large}_dead0", "bench_large_dead0", s.n_large, 0.0, False),
            (f"bench_n{s.n_small}", "bench_small", s.n_small, s.dead_frac, True)]


@functools.cache
def _sparsify_importable() -> bool:
    """Whether `import sparsify` works here (not only that it is installed: a broken dependency would make
    `bench --vs sparsify` exit before measuring our step)."""
    try:
        importlib.import_module("sparsify")
    except Exception:  # noqa: BLE001 - any import failure means: do not compare
        return False
    return True


def step_bench(c: Check, name: str, budget_key: str, n: int, dead_frac: float, vs_sparsify: bool) -> None:
    """(b) one `python -m sae_dist.bench` run; its JSON line becomes the step's detail."""
    s = c.sizes
    cmd = [sys.executable, "-m", "sae_dist.bench", "--d", str(s.d_in), "--n", str(n), "--k", str(s.k),
           "--batch", str(s.batch), "--dtype", s.dtype, "--device", s.device, "--iters", str(s.bench_iters),
           "--warmup", str(s.bench_warmup), "--dead-frac", str(dead_frac)]
    have_sparsify = _sparsify_importable()
    if vs_sparsify and have_sparsify:
        cmd += ["--vs", "sparsify", "--sparsify-micro-batches", "auto"]
    res = c.run(name, cmd, budget_key)
    if res is None:
        return
    if res.rc != 0:
        c.failed_cmd(name, res, budget_key)
        return
    b = _last_json_line(res.stdout)
    summary = (f"step {b['step_ms']:.1f} ms, matmul {b['matmul_ms']:.1f} ms ({b['step_over_matmul']:.2f}x), "
               f"peak {b['peak_mem_mb'] / 1024:.2f} GiB, {b['dead_latents']} dead")
    if b.get("alloc_retries"):
        summary += f" ({b['alloc_retries']} allocator retries: at the memory limit)"
    if b.get("host_syncs_per_step") is not None:
        summary += f", {b['host_syncs_per_step']} host syncs per step"
    if "speedup_vs_sparsify" in b:
        summary += (f"; sparsify {b['sparsify_step_ms']:.1f} ms = {b['speedup_vs_sparsify']:.2f}x ours "
                    f"({b['sparsify_micro_batches']} micro-batch(es)"
                    + (f", {b['sparsify_alloc_retries']} allocator retries" if b.get("sparsify_alloc_retries") else "")
                    + ")")
    elif "sparsify_error" in b:
        summary += f"; {b['sparsify_error'][:160]}"
    elif vs_sparsify and not have_sparsify:
        summary += "; sparsify does not import here (eai-sparsify, the [bench] extra): not compared"
    c.save(name, "ok", summary, res.duration_s, s.budget(budget_key), bench=b)


def step_store(c: Check) -> Path | None:
    """The synthetic activation store the training comparison reads."""
    s = c.sizes
    path = c.work / "synthetic.zarr"
    res = c.run("synthetic_store", _worker_cmd(task="store", path=str(path), d=s.d_in, tokens=s.store_tokens,
                                               features=s.store_features, p_active=s.store_p_active, seed=0),
                "synthetic_store")
    if res is None:
        return None
    if res.rc != 0:
        c.failed_cmd("synthetic_store", res, "synthetic_store")
        return None
    info = _last_json_line(res.stdout)
    c.save("synthetic_store", "ok", f"{s.store_tokens:,} tokens x d {s.d_in}, {s.store_features} features "
           f"(p_active {s.store_p_active:g})", res.duration_s, s.budget("synthetic_store"), **info)
    return path


def _sae_train_cmd() -> list[str]:
    """The `sae-train` console script next to this interpreter, else the same entry point through
    `python -c` (a checkout on PYTHONPATH without an install, e.g. on the GPU machine)."""
    exe = Path(sys.executable).parent / "sae-train"
    if exe.is_file():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; sys.argv[0] = 'sae-train'; from sae_dist.cli import train_main; "
            "train_main()"]


def _read_jsonl(path: Path) -> list[dict]:
    """The complete JSON lines of `path` (a torn last line of a killed run is dropped); [] if absent."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def step_train(c: Check, store: Path, kernels: bool) -> list[dict]:
    """(c) one `sae-train` run (kernels on: `sae.kernel_backend=auto`, Triton on CUDA; off: their torch
    backend; seed 0); returns its logged records (a run that
    ran past its budget keeps the steps it logged, which the curve check still compares)."""
    s, tag = c.sizes, "on" if kernels else "off"
    name, run_dir = f"train_kernels_{tag}", c.work / f"train_kernels_{tag}"
    overrides = [f"run_dir={run_dir}", f"store.path={store}", "sae=topk", f"sae.d_sae={s.train_n}",
                 f"sae.k={s.train_k}", f"sae.dead_tokens={s.train_dead_tokens}",
                 f"sae.kernel_backend={'auto' if kernels else 'torch'}",
                 f"trainer.tokens={s.train_steps * s.train_batch}", f"trainer.batch_tokens={s.train_batch}",
                 f"trainer.log_every_steps={s.train_log_every}", "trainer.keep_checkpoints=0", "trainer.bf16=true",
                 "trainer.eval_every_steps=0",  # no LM to evaluate with on a synthetic store
                 f"device={s.device}", "seed=0", "wandb.enabled=false"]
    res = c.run(name, _sae_train_cmd() + overrides, name)
    log = run_dir / "train_log.jsonl"
    if log.is_file():
        shutil.copyfile(log, c.out / f"train_log_kernels_{tag}.jsonl")
    recs = _read_jsonl(log)
    if res is None:
        return recs
    if res.rc not in (0, None):
        c.failed_cmd(name, res, name)
        return []
    tps = [r["train/tokens_per_s"] for r in recs[1:] if r.get("train/tokens_per_s")]
    step_ms = s.train_batch / statistics.median(tps) * 1e3 if tps else None
    last = recs[-1] if recs else {}
    dead = [r.get("train/dead_fraction", 0.0) for r in recs]
    detail = {"steps_logged": int(last.get("step", 0)), "step_ms": step_ms, "final_fvu": last.get("train/fvu"),
              "final_dead_fraction": last.get("train/dead_fraction"), "max_dead_fraction": max(dead, default=None),
              "run_dir": str(run_dir)}
    summary = (f"{detail['steps_logged']}/{s.train_steps} steps, "
               + (f"{step_ms:.2f} ms/step (logged tokens/s), " if step_ms else "")
               + (f"fvu {last['train/fvu']:.4f}, dead {100 * last['train/dead_fraction']:.1f} % "
                  f"(max {100 * max(dead):.1f} %: AuxK ran when > 0)" if last else "no log"))
    if res.timed_out:
        c.save(name, "timeout", f"ran past its {s.budget(name):.0f} s budget; {summary}", res.duration_s,
               s.budget(name), **detail)
    else:
        c.save(name, "ok", summary, res.duration_s, s.budget(name), **detail)
    return recs


def _trailing_mean(v: list[float], window: int) -> list[float]:
    return [statistics.fmean(v[max(0, i - window + 1): i + 1]) for i in range(len(v))]


def compare_curves(a: list[dict], b: list[dict], *, skip_steps: int, window: int, rtol: float,
                   key: str = "train/fvu") -> dict:
    """Compare two runs' logged `key` curves (records with "step"): on the steps both logged, each
    curve smoothed by a trailing mean over `window` logged points; deviation = |a - b| / |b| at the
    steps after `skip_steps`. Returns {ok (max deviation <= rtol, at least 3 points, all finite),
    points, max_rel_dev, at_step, max_rel_dev_raw (unsmoothed), rtol, last_step, final_a, final_b, reason}."""
    va = {int(r["step"]): float(r[key]) for r in a if key in r}
    vb = {int(r["step"]): float(r[key]) for r in b if key in r}
    steps = sorted(set(va) & set(vb))
    res: dict[str, Any] = {"ok": False, "points": 0, "max_rel_dev": None, "at_step": None, "max_rel_dev_raw": None,
                           "rtol": rtol, "key": key, "skip_steps": skip_steps, "window": window,
                           "last_step": steps[-1] if steps else None, "reason": ""}
    if not steps:
        return {**res, "reason": "no step logged by both runs"}
    xa, xb = [va[t] for t in steps], [vb[t] for t in steps]
    res.update(final_a=xa[-1], final_b=xb[-1])
    if not all(map(_finite, xa + xb)):
        return {**res, "reason": "a non-finite logged value"}
    sa, sb = _trailing_mean(xa, window), _trailing_mean(xb, window)
    idx = [i for i, t in enumerate(steps) if t > skip_steps]
    if len(idx) < 3:
        return {**res, "points": len(idx), "reason": f"{len(idx)} common logged steps after step {skip_steps} (< 3)"}
    rel = [(abs(sa[i] - sb[i]) / max(abs(sb[i]), 1e-12), steps[i]) for i in idx]
    dev, at = max(rel)
    raw = max(abs(xa[i] - xb[i]) / max(abs(xb[i]), 1e-12) for i in idx)
    return {**res, "ok": dev <= rtol, "points": len(idx), "max_rel_dev": dev, "at_step": at, "max_rel_dev_raw": raw}


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


def step_curves(c: Check, on: list[dict], off: list[dict]) -> None:
    """(c) the kernels on/off fvu curves agree within the bf16 tolerance (`compare_curves`)."""
    s = c.sizes
    cmp = compare_curves(on, off, skip_steps=max(1, int(s.curve_skip_frac * s.train_steps)),
                         window=s.curve_window, rtol=s.curve_rtol)
    if cmp["max_rel_dev"] is None:
        c.save("train_curves", "fail", f"not compared: {cmp['reason']}", curves=cmp)
        return
    summary = (f"max rel. deviation of the smoothed fvu {100 * cmp['max_rel_dev']:.3f} % at step {cmp['at_step']} "
               f"(tolerance {100 * s.curve_rtol:g} %, {cmp['points']} points to step {cmp['last_step']}; "
               f"unsmoothed {100 * cmp['max_rel_dev_raw']:.3f} %)")
    c.save("train_curves", "pass" if cmp["ok"] else "fail", summary, curves=cmp)


# ------------------------------------------------------------------------------------------ tuning
TUNE_FILE = "encoder_tune.json"
TUNE_MARGIN_S = 20.0  # the tuner starts no candidate this close to the step's time limit
TUNE_MIN_S = 20.0  # the least time for candidates (after the tuner's start) for which the step starts
#: Steps that run in the time the others left: skipped or cut short, they do not fail the check (`ok`); a
#: --resume runs them again.
_LEFTOVER_STEPS = ("encoder_tune",)


def step_tune(c: Check) -> None:
    """The fused encoder's launch candidates timed (`sae_dist.kernels.tune`) in the time the other steps left,
    for k and Multi-TopK's factor x k; its result file goes to the output directory (merge it into the measured
    table: docs/gpu-check.md). Status: ok (every candidate checked and timed over all rounds), fail (one
    selected wrongly or did not compile or run), timeout (time ran out first: the classes finished are kept),
    skipped (no time), error (the tuner crashed, or wrote no result)."""
    from sae_dist.fielddoc import field_default
    from sae_dist.sae.config import SAEConfig

    s, name = c.sizes, "encoder_tune"
    left = c.time_left(name)
    if left < TUNE_MARGIN_S + TUNE_MIN_S:
        c.save(name, "skipped", f"{max(left, 0):.0f} s left before the {s.total_budget_s:.0f} s deadline")
        return
    out = c.out / TUNE_FILE
    out.unlink(missing_ok=True)
    ks = (s.k, field_default(SAEConfig, "multi_topk_factor") * s.k)
    cmd = [sys.executable, "-m", "sae_dist.kernels.tune", "--d-in", str(s.d_in), "--n", str(s.tune_n),
           "--batch", str(s.tune_batch), "--k", *map(str, ks), "--dtype", s.dtype, "--device", s.device,
           "--iters", str(s.tune_iters), "--warmup", str(s.tune_warmup),
           "--stop-at", f"{time.time() + left - TUNE_MARGIN_S:.1f}", "--out", str(out)]
    res = c.run(name, cmd, name, env=subprocess_env({"TRITON_INTERPRET": "1"}) if s.device == "cpu" else None)
    if res is None:
        return
    if not out.is_file():
        c.failed_cmd(name, res, name, f"no {TUNE_FILE} written")
        return
    classes = json.loads(out.read_text())["classes"]
    if not res.timed_out and (res.rc not in (0, 1) or len(classes) < len(ks)):  # it crashed: not time running out
        c.failed_cmd(name, res, name, f"the tuner stopped after {len(classes)} of {len(ks)} classes")
        return
    bad = [f"k={cl['k']} {r['tag']}: {r['status']}: {r['error']}" for cl in classes for r in cl["results"]
           if r["status"] in ("wrong", "error")]
    complete = len(classes) == len(ks) and all(cl["complete"] for cl in classes)
    parts = [f"k={cl['k']} (K_PAD {cl['K_PAD']}): " + (f"fastest {cl['best_tag']}, the default takes "
                                                       f"{_fmt(cl['default_over_best'], '.3f')}x its time"
                                                       if cl["best"] else "nothing timed") for cl in classes]
    status = "fail" if bad else "ok" if complete else "timeout"
    summary = "; ".join(bad[:3] if bad else parts) + ("" if complete else " (time ran out before every candidate)")
    c.save(name, status, summary, res.duration_s, s.budget(name), classes=classes, file=TUNE_FILE)


# ------------------------------------------------------------------------------------------ sae-plan
def _plan_cluster(c: Check) -> dict:
    """One GPU as sae-plan's `cluster`: its memory (from the matmul step), the chip's peaks (table)."""
    cluster: dict[str, Any] = {"nodes": 1, "gpus_per_node": 1}
    info = (c.step("encoder_matmul") or {}).get("device_info")
    if info and info.get("memory_gib"):
        cluster["gpu_memory_gib"] = round(float(info["memory_gib"]), 2)
    peak = (c.record.get("env") or {}).get("peak")
    if peak:
        cluster.update(bf16_tflops=peak["bf16_tflops"], hbm_gbytes_per_s=peak["hbm_gbytes_per_s"])
    return cluster


def _plan_row(n: int, r: dict, bench: dict | None) -> dict:
    """A plan beside a bench record: step ms and memory GiB (plan total less its workspace margin and
    the fp32 input batches, which bench's baseline excludes), plus the plan's time split the
    recalibration needs (matmul FLOPs, memory-bound bytes, other seconds)."""
    mem = r["memory_bytes"]
    plan_gib = (mem["total"] - mem["workspace"] - r["activation_bytes"].get("inputs_fp32", 0)) / GiB
    fl = r["flops"].values()
    row = {"n": n, "plan_step_ms": r["step_time_s"] * 1e3, "plan_mem_gib": plan_gib, "fits": r["fits"],
           "plan_matmul_flops": r["matmul_flops"],
           "plan_memory_bytes": sum(v["hbm_bytes"] for v in fl if v["kind"] == "memory"),
           "plan_other_time_s": sum(v["time_s"] for v in fl if v["kind"] not in ("memory", "matmul")) + r["comm_s"],
           "cluster": r["cluster"], "measured_step_ms": None, "measured_mem_gib": None}
    if bench:
        row.update(measured_step_ms=bench["step_ms"], measured_mem_gib=bench["peak_mem_mb"] / 1024,
                   step_ratio=bench["step_ms"] / row["plan_step_ms"],
                   mem_ratio=bench["peak_mem_mb"] / 1024 / plan_gib if plan_gib > 0 else None)
    return row


def step_plan(c: Check) -> None:
    """(d) sae-plan's step time and memory for the benchmarked shapes, beside the measurements."""
    from sae_dist.plan import plan

    s, cluster, rows = c.sizes, _plan_cluster(c), []
    for name, _, n, dead_frac, _ in _bench_specs(s):
        if dead_frac == 0:
            continue  # the plan models AuxK in full: compare with the dead_frac runs
        r = plan(d_in=s.d_in, d_sae=n, k=s.k, batch_tokens=s.batch, tp=1, cluster=cluster,
                 kernel_backend="auto" if s.device == "cuda" else "torch",
                 bf16_operand_copies=s.dtype == "bf16" and s.device == "cuda", suggest=False)
        rows.append(_plan_row(n, r, (c.step(name) or {}).get("bench")))
    c.record["plan_comparison"] = rows
    parts = [f"n={_pow2(r['n'])}: step {r['plan_step_ms']:.3g} ms planned"
             + (f" vs {r['measured_step_ms']:.3g} measured" if r["measured_step_ms"] is not None else "")
             + f", memory {r['plan_mem_gib']:.3g} GiB planned"
             + (f" vs {r['measured_mem_gib']:.3g}" if r["measured_mem_gib"] is not None else "") for r in rows]
    c.save("plan", "ok", "; ".join(parts), cluster=cluster)


# ------------------------------------------------------------------------------------------ goals
def _goal_inputs(record: dict) -> tuple[dict, dict, dict]:
    s, steps = record["sizes"], record["steps"]
    big = (steps.get(f"bench_n{s['n_large']}") or {}).get("bench") or {}
    dead0 = (steps.get(f"bench_n{s['n_large']}_dead0") or {}).get("bench") or {}
    return big, dead0, steps.get("encoder_matmul") or {}


def evaluate_goals(record: dict) -> list[dict]:
    """The `GOALS` from a check's record: [{name, description, target, measured, status (pass | fail |
    n/a), note}]; n/a names what was not measured (a failed step, no sparsify, no chip peak)."""
    big, dead0, mm = _goal_inputs(record)
    measured: dict[str, float | None] = {
        "step_vs_matmul": big["step_ms"] / mm["matmul_ms"] if big.get("step_ms") and mm.get("matmul_ms") else None,
        "speedup_vs_sparsify": big.get("speedup_vs_sparsify"),
        "gemm_fraction_of_peak": mm.get("fraction_of_peak"),
        "dead_frac_ratio": big["step_ms"] / dead0["step_ms"] if big.get("step_ms") and dead0.get("step_ms") else None,
    }
    na = {
        "step_vs_matmul": "needs the n_large bench and the encoder matmul",
        "speedup_vs_sparsify": big.get("sparsify_error") or ("needs the n_large bench with sparsify installed"),
        "gemm_fraction_of_peak": "needs a bf16 run on a GPU of the CHIP_PEAKS table",
        "dead_frac_ratio": "needs both n_large benches",
    }
    n = _pow2(record["sizes"]["n_large"])
    out = []
    for name, desc, op, thr in GOALS:
        v = measured[name]
        ok = None if v is None else (v <= thr if op == "<=" else v >= thr)
        out.append({"name": name, "description": desc.replace("n_large", f"n={n}"), "target": f"{op} {thr:g}",
                    "measured": v, "status": "n/a" if ok is None else ("pass" if ok else "fail"),
                    "note": na[name] if v is None else ""})
    if record["mode"] == "dry":
        for g in out:
            g["note"] = (g["note"] + "; " if g["note"] else "") + "dry run: tiny shapes, not a measurement"
    return out


def recalibrate(record: dict) -> dict:
    """sae-plan constants (`sae_dist.plan.Cluster` fields) fitted to a gpu-check record.

    hbm_gbytes_per_s: the chip's datasheet bandwidth (the copy's measured GB/s without a table entry);
    hbm_efficiency: measured copy GB/s / that; bf16_tflops: the chip's dense peak (without a table
    entry the measured GEMM rate stands in); mfu: the encoder derate that makes sae-plan's step at
    n_large equal the measured step, given the new HBM figures (step = plan's memory-bound bytes /
    (hbm * efficiency) + matmul FLOPs / (peak * mfu) + other); gpu_memory_gib: the device's memory.
    validation: the other benchmarked shapes predicted with these constants vs measured.
    Returns {ok, constants, defaults, sae_plan_args, gemm_fraction_of_peak, validation, notes} or
    {ok: False, reason}. plan.py's defaults are not changed: pass the constants as cluster.* overrides.
    """
    mm = (record.get("steps") or {}).get("encoder_matmul") or {}
    rows = {r["n"]: r for r in record.get("plan_comparison") or []}
    big = rows.get(record["sizes"]["n_large"])
    if not mm.get("tflops") or not big or big.get("measured_step_ms") is None:
        return {"ok": False, "reason": "needs the encoder_matmul step and the n_large bench and plan rows"}
    peak, notes = (record.get("env") or {}).get("peak"), []
    tflops = peak["bf16_tflops"] if peak else mm["tflops"]
    bw = peak["hbm_gbytes_per_s"] if peak else mm["copy_gbytes_per_s"]
    if not peak:
        notes.append("no CHIP_PEAKS entry for this device: the measured GEMM rate and copy bandwidth stand in "
                     "for the peaks")
    eff = min(1.0, mm["copy_gbytes_per_s"] / bw)
    mfu = _fit_mfu(big, tflops, bw, eff, notes)
    consts = {"bf16_tflops": _sig(tflops), "hbm_gbytes_per_s": _sig(bw), "hbm_efficiency": _sig(eff, 3),
              "mfu": None if mfu is None else _sig(mfu, 3)}
    info = mm.get("device_info") or {}
    if info.get("memory_gib"):
        consts["gpu_memory_gib"] = _sig(float(info["memory_gib"]))
    validation = [{"n": r["n"], "measured_step_ms": r["measured_step_ms"],
                   "predicted_step_ms": _predict_ms(r, tflops, bw, eff, mfu)}
                  for n, r in sorted(rows.items()) if n != big["n"] and r.get("measured_step_ms") is not None]
    from sae_dist.plan import Cluster

    defaults = {k: getattr(Cluster(), k) for k in consts}
    args = " ".join(f"cluster.{k}={v:g}" for k, v in consts.items() if v is not None)
    return {"ok": mfu is not None, "constants": consts, "defaults": defaults, "sae_plan_args": args,
            "gemm_fraction_of_peak": mm["tflops"] / tflops, "validation": validation, "notes": notes,
            "fitted_on_n": big["n"]}


def _sig(v: float, digits: int = 4) -> float:
    """v rounded to `digits` significant digits."""
    return float(f"{v:.{digits}g}")


def _fit_mfu(row: dict, tflops: float, bw: float, eff: float, notes: list[str]) -> float | None:
    mem_s = row["plan_memory_bytes"] / (bw * 1e9 * eff)
    matmul_s = row["measured_step_ms"] / 1e3 - mem_s - row["plan_other_time_s"]
    if matmul_s <= 0:
        notes.append(f"the plan's memory-bound time ({mem_s * 1e3:.1f} ms) is not below the measured step "
                     f"({row['measured_step_ms']:.1f} ms): its byte counts are overestimated; mfu not fitted")
        return None
    mfu = row["plan_matmul_flops"] / (tflops * 1e12 * matmul_s)
    if mfu > 1:
        notes.append(f"fitted mfu {mfu:.2f} > 1: the plan's memory-bound time is overestimated; mfu clamped to 1")
    return min(1.0, mfu)


def _predict_ms(row: dict, tflops: float, bw: float, eff: float, mfu: float | None) -> float | None:
    if mfu is None:
        return None
    return 1e3 * (row["plan_memory_bytes"] / (bw * 1e9 * eff) + row["plan_other_time_s"]
                  + row["plan_matmul_flops"] / (tflops * 1e12 * mfu))


# ------------------------------------------------------------------------------------------ markdown
def _md_table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    align = "|".join("---:" if i in right else "---" for i in range(len(header)))
    out = ["| " + " | ".join(header) + " |", f"|{align}|"]
    out += ["| " + " | ".join(" ".join(str(cell).split()).replace("|", "\\|") for cell in row) + " |"
            for row in rows]
    return out


def _fmt(v: float | None, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def _md_header(record: dict) -> list[str]:
    env, s = record.get("env") or {}, record["sizes"]
    bad = [k for k, v in record["steps"].items() if v["status"] not in ("pass", "ok")]
    verdict = "every step passed" if not bad else f"did not pass: {', '.join(bad)}"
    return [f"# gpu-check ({record['mode']}) on {env.get('device_name', '?')}", "",
            f"{record['started']}; torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}. "
            f"Shapes: d_in={s['d_in']}, k={s['k']}, B={s['batch']:,}, n={_pow2(s['n_small'])} and "
            f"{_pow2(s['n_large'])}, {s['dtype']} on {s['device']}. Wall time {record.get('wall_s', 0):.0f} s "
            f"(deadline {s['total_budget_s']:.0f} s). Steps: {verdict}.", ""] + _md_resumed(record)


def _md_resumed(record: dict) -> list[str]:
    r = record.get("resumed_from")
    if not r:
        return []
    kept = ", ".join(r["kept"]) or "none"
    return [f"Resumed from the check of {r['started']} on host {r.get('host')} ({r['path']}): the rows of {kept} "
            "are that check's; the wall time is this run's.", ""]


def render_markdown(record: dict) -> str:
    """gpu_check.md: the steps, the goals, sae-plan beside the measurements, recalibrated constants
    (docs/gpu-check.md explains every column)."""
    lines = _md_header(record)
    lines += _md_table(["step", "status", "seconds", "budget s", "result"],
                       [[k, v["status"], f"{v['duration_s']:.1f}", _fmt(v.get("budget_s"), ".0f"), v["summary"]]
                        for k, v in record["steps"].items()], right={2, 3})
    lines += ["", "**Goals**", ""]
    lines += _md_table(["goal", "what", "target", "measured", "status", "note"],
                       [[g["name"], g["description"], g["target"], _fmt(g["measured"]), g["status"], g["note"]]
                        for g in record.get("goals") or []], right={3})
    lines += ["", "**sae-plan beside the measurements** (one GPU; memory without the plan's workspace margin "
              "and input batches)", ""]
    lines += _md_table(["n", "step ms measured", "step ms sae-plan", "measured / plan", "peak GiB measured",
                        "GiB sae-plan", "measured / plan"],
                       [[_pow2(r["n"]), _fmt(r["measured_step_ms"], ".4g"), _fmt(r["plan_step_ms"], ".4g"),
                         _fmt(r.get("step_ratio"), ".3g"), _fmt(r["measured_mem_gib"], ".3g"),
                         _fmt(r["plan_mem_gib"], ".3g"), _fmt(r.get("mem_ratio"), ".3g")]
                        for r in record.get("plan_comparison") or []], right={1, 2, 3, 4, 5, 6})
    rc = record.get("recalibration") or {}
    lines += ["", "**sae-plan constants from this check** (`python -m sae_dist.gpu_check --recalibrate "
              "gpu_check.json`)", ""]
    if rc.get("constants"):
        lines += _md_table(["cluster.*", "sae-plan default", "this check"],
                           [[k, _fmt(rc["defaults"].get(k), "g"), _fmt(v, "g")] for k, v in rc["constants"].items()],
                           right={1, 2})
        lines += ["", f"`sae-plan ... {rc['sae_plan_args']}`"]
        lines += [f"- validation n={_pow2(v['n'])}: measured {_fmt(v['measured_step_ms'], '.1f')} ms, predicted "
                  f"{_fmt(v['predicted_step_ms'], '.1f')} ms" for v in rc.get("validation", [])]
        lines += [f"- {note}" for note in rc.get("notes", [])]
    else:
        lines += [f"not computed: {rc.get('reason', 'no record')}"]
    return "\n".join(lines + _md_tune(record)) + "\n"


def _md_tune(record: dict) -> list[str]:
    """The encoder_tune step's candidates as a table (none when the step did not run)."""
    classes = (record["steps"].get("encoder_tune") or {}).get("classes")
    if not classes:
        return []
    merge = (f" (`python -m sae_dist.kernels.tune --merge {TUNE_FILE}` puts the fastest into the measured table)"
             if record["mode"] == "full" else " (dry run: tiny shapes, not a measurement)")
    lines = ["", f"**Fused-encoder launch configurations**{merge}", ""]
    rows = [[f"{cl['dtype']} k={cl['k']} (K_PAD {cl['K_PAD']})", r["tag"], r["status"], _fmt(r.get("ms_median"), ".4g"),
             _fmt(r["ms_median"] / cl["default_ms"] if r.get("ms_median") and cl["default_ms"] else None, ".3f"),
             "fastest" if r["config"] == cl["best"] else r.get("error", "")]
            for cl in classes for r in cl["results"]]
    return lines + _md_table(["class", "BLOCK_B x BLOCK_N x BLOCK_D, warps, stages", "status", "ms (median)",
                              "/ default", "note"], rows, right={3, 4})


# ------------------------------------------------------------------------------------------ --resume
#: The training steps and their logs in the output directory (a kept run's records are read back).
_TRAIN_STEPS = {"train_kernels_on": "train_log_kernels_on.jsonl", "train_kernels_off": "train_log_kernels_off.jsonl"}
#: Steps whose output file must be beside a resumed record for the step to be kept (the training logs, the
#: tuner's result).
_STEP_FILES = {**_TRAIN_STEPS, "encoder_tune": TUNE_FILE}
#: Steps computed in this process from the others' records: rerun on every resume, never kept.
_DERIVED_STEPS = ("env", "plan", "train_curves")


def step_names(sizes: CheckSizes) -> list[str]:
    """Every step of a check at `sizes`, in run order (plan's record keeps its first place)."""
    return ["env", "kernel_tests", "encoder_matmul", *(b[0] for b in _bench_specs(sizes)), "plan",
            "synthetic_store", *_TRAIN_STEPS, "train_curves", "encoder_tune"]


@dataclass
class Resume:
    """An earlier check that `--resume` completes: path (its gpu_check.json), earlier (its record), keep
    (the steps copied from it rather than run again)."""

    path: Path
    earlier: dict
    keep: tuple[str, ...]

    def copy_files(self, out: Path) -> None:
        """Bring the kept steps' files (training logs, junit xml, the tuner's result) from the earlier check's
        directory to `out`."""
        names = [f for n, f in _STEP_FILES.items() if n in self.keep]
        names += ["kernel_tests.xml"] if "kernel_tests" in self.keep else []
        for f in names:
            src, dst = self.path.parent / f, out / f
            if src.is_file() and src.resolve() != dst.resolve():
                shutil.copyfile(src, dst)


def plan_resume(path: Path, sizes: CheckSizes, identity: dict, rerun: tuple[str, ...] = ()) -> Resume:
    """Which steps of the earlier check at `path` (a gpu_check.json) a new check keeps: those that
    passed ("pass"/"ok"), except the ones computed from the others (env, plan, train_curves), those named
    in `rerun`, a training run or the tuning whose output file is not beside `path`, and the synthetic store
    unless both training runs are kept (it lives in scratch space). `identity`: this machine's `env_identity`.

    Raises ValueError (nothing is run): no such file or not a gpu_check.json; a check of other sizes
    (mode, shapes or budgets differ: named); one on another device, torch, CUDA or Triton (named: the
    numbers would not be comparable); an unknown step in `rerun` (the valid names listed).
    """
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
        steps = earlier["steps"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--resume {path}: not a readable gpu_check.json ({type(e).__name__}: {e}); "
                         "run the check without --resume") from None
    want = json.loads(json.dumps(dataclasses.asdict(sizes)))
    differ = sorted(k for k in want.keys() | (earlier.get("sizes") or {}).keys()
                    if want.get(k) != (earlier.get("sizes") or {}).get(k))
    if differ:
        raise ValueError(f"--resume {path}: that check ran with other sizes ({', '.join(differ)} differ; "
                         f"mode {earlier.get('mode')!r}, this one {sizes.mode!r}): run the check without --resume")
    env = earlier.get("env") or {}
    moved = [f"{k} {env.get(k)!r} there, {v!r} here" for k, v in identity.items() if env.get(k) != v]
    if moved:
        raise ValueError(f"--resume {path}: not comparable with this machine ({'; '.join(moved)}): "
                         "run the check without --resume")
    unknown = sorted(set(rerun) - set(step_names(sizes)))
    if unknown:
        raise ValueError(f"--rerun {','.join(unknown)}: no such step; steps: {', '.join(step_names(sizes))}")
    keep = [n for n in step_names(sizes) if n not in _DERIVED_STEPS and n not in rerun
            and (steps.get(n) or {}).get("status") in ("pass", "ok")
            and (n not in _STEP_FILES or (path.parent / _STEP_FILES[n]).is_file())]
    if not all(n in keep for n in _TRAIN_STEPS) and "synthetic_store" in keep:
        keep.remove("synthetic_store")
    return Resume(path=path, earlier=earlier, keep=tuple(keep))


# ------------------------------------------------------------------------------------------ driver
def _guarded(c: Check, name: str, fn: Callable, *args):
    """Run one step function (or restore it when --resume keeps it); a Python error inside it is
    recorded as that step's "error"."""
    if c.resume is not None and name in c.resume.keep:
        return c.restore(name)
    try:
        return fn(c, *args)
    except Exception as e:  # noqa: BLE001 - one step's bug must not lose the other steps
        c.save(name, "error", f"{type(e).__name__}: {e}")
        return None


def _run_steps(c: Check) -> None:
    _guarded(c, "env", step_env)
    _guarded(c, "kernel_tests", step_kernel_tests)
    _guarded(c, "encoder_matmul", step_matmul)
    for spec in _bench_specs(c.sizes):
        _guarded(c, spec[0], step_bench, *spec)
    _guarded(c, "plan", step_plan)  # now, so that a check killed during training keeps it (and again at the end)
    store = _guarded(c, "synthetic_store", step_store)
    if store is None:
        for name in ("train_kernels_on", "train_kernels_off", "train_curves"):
            c.save(name, "skipped", "no synthetic store")
    else:
        on = _guarded(c, "train_kernels_on", step_train, store, True) or []
        off = _guarded(c, "train_kernels_off", step_train, store, False) or []
        _guarded(c, "train_curves", step_curves, on, off)
    _guarded(c, "plan", step_plan)
    _guarded(c, "encoder_tune", step_tune)


def run_check(sizes: CheckSizes, out: Path, keep_work: bool = False, resume: Resume | None = None) -> dict:
    """Run every step at `sizes` (those `resume.keep` names are copied from the earlier check
    instead), writing out/gpu_check.json and gpu_check.md after each; returns the record
    (record["ok"]: every step passed). Scratch files (store, run dirs) go to a temporary directory,
    removed at the end unless keep_work."""
    out.mkdir(parents=True, exist_ok=True)
    if resume is not None:
        resume.copy_files(out)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    c = Check(sizes, out, work, resume)
    try:
        _run_steps(c)
    finally:
        c.write()
        c.log.close()
        if keep_work:
            print(f"gpu-check: scratch files kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return c.record


def sizes_for(dry: bool, device: str | None) -> CheckSizes:
    """FULL (needs CUDA) or DRY (the CPU, or tiny bf16 shapes on CUDA with device="cuda").
    Raises ValueError with the fix when the full check is asked for without CUDA."""
    import torch

    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise ValueError("--device cuda but torch.cuda.is_available() is False on this machine")
    if dry:
        return dataclasses.replace(DRY, device="cuda", dtype="bf16") if device == "cuda" else DRY
    if device == "cpu" or not has_cuda:
        raise ValueError("the full check needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "run `make gpu-check DRY=1` (python -m sae_dist.gpu_check --dry) to test the script here")
    return FULL


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sae_dist.gpu_check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="tiny shapes (the CPU unless --device cuda): test the script")
    p.add_argument("--out", default="runs/gpu_check", help="output directory (default runs/gpu_check)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda for the full check, cpu for --dry")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch store and run directories")
    p.add_argument("--recalibrate", metavar="GPU_CHECK_JSON", default=None,
                   help="print the sae-plan constants fitted to an earlier gpu_check.json, and exit")
    p.add_argument("--resume", metavar="GPU_CHECK_JSON", default=None,
                   help="complete an earlier check (same sizes, device and versions): keep the steps that "
                        "passed, run the others")
    p.add_argument("--rerun", metavar="STEP[,STEP...]", default="",
                   help="with --resume: run these steps again even though they passed")
    return p


def _recalibrate_main(path: Path) -> int:
    if not path.is_file():
        print(f"gpu-check: --recalibrate {path}: no such file (a gpu_check.json)", file=sys.stderr)
        return 2
    rc = recalibrate(json.loads(path.read_text()))
    print(json.dumps(rc, indent=2))
    if rc.get("sae_plan_args"):
        print(f"\nsae-plan sae.d_in=... sae.d_sae=... {rc['sae_plan_args']}")
    return 0 if rc["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.recalibrate:
        return _recalibrate_main(Path(args.recalibrate))
    rerun = tuple(r for r in args.rerun.split(",") if r)
    try:
        if rerun and not args.resume:
            raise ValueError("--rerun needs --resume GPU_CHECK_JSON (a plain check runs every step)")
        sizes = sizes_for(args.dry, args.device)
        resume = (plan_resume(Path(args.resume), sizes, env_identity(sizes.device), rerun)
                  if args.resume else None)
    except ValueError as e:  # bad usage: nothing ran
        print(f"gpu-check: {e}", file=sys.stderr)
        return 2
    record = run_check(sizes, Path(args.out), keep_work=args.keep_work, resume=resume)
    print(render_markdown(record))
    print(f"gpu-check: wrote {Path(args.out) / 'gpu_check.json'} and gpu_check.md", file=sys.stderr)
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
