"""Training-step benchmark: `python -m sae_dist.bench --d D --n N --k K --batch B [--vs sparsify]`.

Prints ONE JSON line (docs/benchmarks.md, "How a step is measured"):

- `step_ms`: median wall time of one TopKSAE training step exactly as `sae_dist.train.trainer` runs it:
  `training_step_losses` (AuxK on, against a fixed random dead mask of `--dead-frac` of the latents;
  Multi-TopK with `--multi-topk`), finiteness check of the loss, `zero_grad(set_to_none=True)`,
  backward, `remove_parallel_grads_` (decoder-gradient projection, Gao et al. 2024 section 2.4.1),
  `torch.optim.Adam.step` with the trainer's lr/betas/eps (`--adam fused`: the same with fused=True),
  `normalize_decoder_`, dead-latent tracker update. `--kernels off` times the dense torch oracle
  (`topk_losses_reference`) instead.
- `matmul_ms`: median of one bare dense encoder matmul x[B, d] @ W_enc[d, n] (same dtype, device, run):
  the floor of a TopK SAE step (2*B*d*n FLOPs). Timed with W_enc row-major [d, n] (TopKSAE's layout)
  and latent-major (transpose of a contiguous [n, d]); the faster one is reported (`matmul_layout`,
  `matmul_ms_by_layout`), so the baseline is the best dense matmul torch does at that shape.
- `step_over_matmul` = step_ms / matmul_ms; `tokens_per_s` = batch / step seconds.
- `peak_mem_mb`: memory high-water mark of the step phase (SAE parameters, gradients, Adam state,
  activations, workspaces; the input batches are allocated before the baseline), in MiB:
  CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus the allocation before the
  SAE is built. CPU: the kernel's peak resident set size of the process, VmHWM of /proc/self/status,
  reset to the current RSS by writing "5" to /proc/self/clear_refs (Linux >= 4.0) just before the SAE is
  built, minus the RSS at that moment. (tracemalloc does not see torch's allocator and
  `ru_maxrss` cannot be reset, so a delta of it under-reports when an earlier phase peaked higher;
  it is only the fallback, named in `peak_mem_method`.)
- `alloc_retries` (CUDA; null elsewhere): retries of PyTorch's caching allocator during the warmup and timed steps
  (`num_alloc_retries`: an allocation that succeeded only after the cache was emptied); above 0 the step
  ran at the memory limit and its time includes that. `sparsify_alloc_retries`: the same for sparsify's step.
- `host_syncs_per_step` (CUDA; null elsewhere): the synchronising CUDA calls of one more step after the
  timed ones (where the host waits for the GPU: `.item()`, a bool-mask index, `nonzero`, ...), counted as
  the warnings of `torch.cuda.set_sync_debug_mode("warn")` (`host_syncs`); should that extra step raise,
  null and `host_syncs_error` (the message).
- `param_grad_adam_mb`: bytes of parameters + gradients + Adam's two moments (4 x parameter bytes),
  the reference of the memory goal `peak_mem_mb <= 1.15 * param_grad_adam_mb + 256`.
- with `--baseline-dead-frac F0`: `paired_step_ms` and `baseline_step_ms`, the medians of the step at
  `--dead-frac` F and at F0 (`baseline_dead_latents` dead; a subset of the F mask), two fresh SAEs
  stepped in turn in one process after the timings above, and `step_over_baseline` = their ratio: the
  cost of the AuxK term with F0 = 0, without the drift between two separate runs.
- with `--vs sparsify`: EleutherAI sparsify's `SparseCoder` (PyPI `eai-sparsify`) step on the same shape
  in the same process, set up as its trainer does (forward with dead mask and AuxK, loss
  fvu + auxk_alpha * auxk_loss, backward, its decoder-gradient projection, `torch.optim.Adam`,
  decoder renormalisation, fired-latent bookkeeping): `sparsify_step_ms`, `speedup_vs_sparsify` =
  sparsify_step_ms / step_ms, `sparsify_micro_batches`. `--sparsify-micro-batches M` splits each batch
  into M chunks (forward + backward per chunk, one Adam step), as sparsify's trainer does with
  `micro_acc_steps` to fit memory (its dense [B, n] pre-activations are 64 GiB in bf16 at B=32768,
  n=2^20); `auto` starts at 1 and doubles M on CUDA out-of-memory. When no M fits, the record holds
  `sparsify_error` instead of the sparsify timings (our step's numbers are kept).

All timings synchronise the device around each timed region (CUDA) and use `time.perf_counter`.
Errors: SystemExit with a message naming the bad option (e.g. `--device cuda` without CUDA, or
`--vs sparsify` without the package: `pip install eai-sparsify` / `pip install sae-dist[bench]`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from typing import Callable

import torch

from sae_dist.extras import install_command

__all__ = ["main", "run_bench", "time_fn", "time_interleaved", "host_syncs", "PeakMemory"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------- memory
def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    """Return glibc's free heap pages to the OS (so the CPU baseline RSS holds no reusable free memory
    that would hide later growth). No-op where glibc is absent."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """High-water mark of memory used between `start()` and `peak_mb()`, in MiB (see module docstring).

    device: torch.device. `method` names how it was measured: "cuda_max_memory_allocated",
    "linux_vmhwm_reset" (CPU, exact high-water mark of the resident set) or "ru_maxrss_delta" (CPU
    fallback; a lower bound when the process peaked higher before `start()`).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.method = ""
        self._base = 0

    def start(self) -> None:
        gc.collect()
        _malloc_trim()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda_max_memory_allocated"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            rss = _proc_status_kb("VmRSS")
            hwm = _proc_status_kb("VmHWM")
            if rss is None or hwm is None or hwm > rss + 1024:
                raise OSError("VmHWM was not reset")
            self._base = rss
            self.method = "linux_vmhwm_reset"
        except OSError:
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.method = "ru_maxrss_delta"

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        if self.method == "linux_vmhwm_reset":
            return (_proc_status_kb("VmHWM") - self._base) / 1024
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._base) / 1024


# ---------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_syncs(fn: Callable[[int], object], i: int, device: torch.device) -> int | None:
    """On CUDA, the number of synchronising CUDA calls fn(i) makes (each a warning of
    `torch.cuda.set_sync_debug_mode("warn")`, recorded; the mode restored after); None on other devices."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn(i)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen)


def time_fn(fn: Callable[[int], object], iters: int, warmup: int, device: torch.device) -> list[float]:
    """Run fn(i) `warmup` times untimed, then `iters` times timed; returns the times in ms.

    The device is synchronised before and after each timed call (CUDA kernels are asynchronous).
    """
    return time_interleaved([fn], iters, warmup, device)[0]


def time_interleaved(fns: list[Callable[[int], object]], iters: int, warmup: int,
                     device: torch.device) -> list[list[float]]:
    """`time_fn` for several functions in turn (f0(i), f1(i), ..., then i + 1), so that drift of the
    machine's speed (other tenants, clocks, thermal) hits all of them alike; returns one list of
    `iters` times in ms per function."""
    for i in range(warmup):
        for fn in fns:
            fn(i)
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for i in range(iters):
        for fn, out in zip(fns, times, strict=True):
            _sync(device)
            t0 = time.perf_counter()
            fn(warmup + i)
            _sync(device)
            out.append((time.perf_counter() - t0) * 1e3)
    return times


# ---------------------------------------------------------------------------------------------- steps
def _make_our_step(d, n, k, dtype, device, kernels, multi_topk, dead, xs, bf16, adam="trainer"):
    from sae_dist.sae.base import DeadLatentTracker
    from sae_dist.sae.config import PAPER_DEAD_TOKENS, SAEConfig
    from sae_dist.sae.topk import TopKSAE, topk_losses_reference
    from sae_dist.train.config import TrainerConfig
    from sae_dist.train.engine import default_lr, make_optimizer

    cfg = SAEConfig(d_in=d, d_sae=n, k=k, multi_topk=multi_topk)
    tcfg = TrainerConfig()
    sae = TopKSAE(cfg, device=device, generator=torch.Generator().manual_seed(0))
    if adam == "trainer":
        opt = make_optimizer(sae, default_lr(n, 200), tcfg)
    else:
        opt = torch.optim.Adam(sae.parameters(), lr=default_lr(n, 200), betas=tcfg.adam_betas, eps=tcfg.adam_eps,
                               fused=adam == "fused")
    tracker = DeadLatentTracker(n, PAPER_DEAD_TOKENS, device=device)  # only its update's cost: `dead` is given
    losses = sae.training_step_losses if kernels else (lambda x, dead: topk_losses_reference(sae, x, dead))

    def step(i: int) -> None:
        x = xs[i % len(xs)]
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            res = losses(x, dead)
        if not torch.isfinite(res.loss):
            raise FloatingPointError(f"bench: non-finite loss {float(res.loss)} at iteration {i}")
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        sae.remove_parallel_grads_()
        opt.step()
        sae.normalize_decoder_()
        tracker.update(res.values, res.indices)

    return sae, opt, step, cfg, kernels


def _alloc_retries(device: torch.device, since: int | None = None) -> int | None:
    """CUDA: the caching allocator's count of retries (a cudaMalloc that failed until its cache was freed,
    which slows a step that runs at the memory limit), minus `since`; None on other devices."""
    if device.type != "cuda":
        return None
    n = int(torch.cuda.memory_stats(device).get("num_alloc_retries", 0))
    return n if since is None else n - since


def _dead_mask(perm: torch.Tensor, n_dead: int, device: torch.device) -> torch.Tensor:
    dead = torch.zeros(perm.numel(), dtype=torch.bool)
    dead[perm[:n_dead]] = True
    return dead.to(device)


def _time_vs_baseline(args: argparse.Namespace, device: torch.device, perm, dead, xs, dtype, bf16) -> dict:
    """`--baseline-dead-frac F0`: our step with `--dead-frac` F of the latents dead and the same step
    with F0 dead (a prefix of the same permutation), two fresh SAEs of the same init stepped in turn
    (`time_interleaved`): keys paired_step_ms, baseline_step_ms, step_over_baseline (their ratio, the
    cost of F over F0, e.g. AuxK's with F0 = 0), baseline_dead_latents."""
    n_base = int(round(args.baseline_dead_frac * perm.numel()))
    base = _dead_mask(perm, n_base, device)
    steps = [_make_our_step(args.d, args.n, args.k, dtype, device, args.kernels == "on", args.multi_topk, mask, xs,
                            bf16, args.adam)[2] for mask in (dead, base)]
    ours, baseline = (statistics.median(t) for t in time_interleaved(steps, args.iters, args.warmup, device))
    del steps
    gc.collect()
    return {"baseline_dead_latents": n_base, "paired_step_ms": ours, "baseline_step_ms": baseline,
            "step_over_baseline": ours / baseline}


def _import_sparsify(device: torch.device):
    """Import sparsify's SparseCoder; SystemExit naming the install command when it is missing."""
    if device.type != "cuda":
        # sparsify picks its Triton decoder whenever triton imports; on CPU tensors only its eager
        # (embedding_bag) decoder runs, which this switch of sparsify selects.
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # sparsify prints at import; keep stdout = 1 JSON line
            from sparsify import SparseCoder, SparseCoderConfig
    except ImportError as e:
        raise SystemExit(
            f"--vs sparsify needs EleutherAI sparsify ({e}), sae-dist's [bench] extra; install it with: "
            f"{install_command('bench')}"
        ) from e
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("eai-sparsify")
    except PackageNotFoundError:
        ver = "unknown"
    return SparseCoder, SparseCoderConfig, ver


def _make_sparsify_step(d, n, k, device, multi_topk, dead, xs, bf16, auxk_alpha, micro=1):
    """sparsify's training step (see the module docstring); `micro` > 1 splits each batch into that
    many chunks against the whole batch's variance, loss / micro per chunk (its `micro_acc_steps`)."""
    SparseCoder, SparseCoderConfig, ver = _import_sparsify(device)
    torch.manual_seed(0)
    sc = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k, multi_topk=multi_topk),
                     device=device, dtype=torch.float32)
    # sparsify's trainer: Adam at lr 2e-4 / sqrt(n / 2^14), default betas/eps.
    opt = torch.optim.Adam(sc.parameters(), lr=2e-4 / (n / 2**14) ** 0.5)
    since_fired = torch.zeros(n, dtype=torch.long, device=device)
    did_fire = torch.zeros(n, dtype=torch.bool, device=device)

    def step(i: int) -> None:
        x = xs[i % len(xs)]
        sc.set_decoder_norm_to_unit_norm()
        total_variance = (x - x.mean(0)).pow(2).sum()
        for xc in (x,) if micro == 1 else x.chunk(micro):
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                out = sc(xc, dead_mask=dead, total_variance=total_variance)
                loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
            did_fire[out.latent_indices.flatten()] = True
            (loss if micro == 1 else loss / micro).backward()
        sc.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            since_fired.add_(x.shape[0])
            since_fired[did_fire] = 0
            did_fire.zero_()

    return step, ver


def _time_sparsify(args: argparse.Namespace, device: torch.device, dead, xs, bf16: bool,
                   auxk_alpha: float) -> dict:
    """Time sparsify's step at `args.sparsify_micro_batches` (an int, or "auto": 1, doubled on CUDA
    out-of-memory while a chunk keeps >= 1 token). Returns {"micro": M, "version": str, "times": [ms],
    "alloc_retries": int | None (`_alloc_retries`)}
    or, when "auto" ran out of micro-batch counts, {"micro": M, "error": message}."""
    auto = args.sparsify_micro_batches == "auto"
    micro = 1 if auto else int(args.sparsify_micro_batches)
    while True:
        try:
            sp_step, ver = _make_sparsify_step(args.d, args.n, args.k, device, args.multi_topk, dead, xs, bf16,
                                               auxk_alpha, micro)
            retries = _alloc_retries(device)
            times = time_fn(sp_step, args.iters, args.warmup, device)
            return {"micro": micro, "version": ver, "times": times, "alloc_retries": _alloc_retries(device, retries)}
        except torch.cuda.OutOfMemoryError as e:
            if not auto:
                raise
            msg = str(e).splitlines()[0] if str(e) else "CUDA out of memory"
        sp_step = None  # drop the failed attempt's model, optimizer and activations before retrying
        gc.collect()
        torch.cuda.empty_cache()
        if micro * 2 > args.batch:
            return {"micro": micro, "error": f"sparsify: CUDA out of memory with up to {micro} micro-batches: {msg}"}
        micro *= 2


# ---------------------------------------------------------------------------------------------- main
def device_name(device: torch.device) -> str:
    """A readable name of the device: the GPU's, or the CPU model with its thread and core counts."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} torch threads, {os.cpu_count()} cpus)"


def _inputs(args: argparse.Namespace, device: torch.device):
    """(xs: two distinct normalised [B, d] fp32 batches, as the store holds layer-norm'd activations of norm
    sqrt(d); perm: a random permutation of the latents, whose prefix is the dead mask)."""
    gen = torch.Generator().manual_seed(1234)
    xs = []
    for _ in range(2):
        x = torch.randn(args.batch, args.d, generator=gen)
        x = (x - x.mean(-1, keepdim=True))
        x = x / x.norm(dim=-1, keepdim=True) * args.d**0.5
        xs.append(x.to(device))
    return xs, torch.randperm(args.n, generator=gen)


def _time_matmul(W_src: torch.Tensor, xs, dtype, args: argparse.Namespace, device: torch.device):
    """The bare matmul x[B, d] @ W_enc[d, n], timed with W_enc row-major [d, n] (TopKSAE's layout) and
    latent-major (the transpose of a contiguous [n, d]): (the faster layout, {layout: times in ms})."""
    xm = [x.to(dtype) for x in xs]
    layouts = {}
    for layout in ("d_n", "n_d_t"):
        W = W_src.to(dtype).contiguous() if layout == "d_n" else W_src.t().to(dtype).contiguous().t()

        def matmul(i: int, W=W) -> None:
            xm[i % len(xm)] @ W

        layouts[layout] = time_fn(matmul, args.iters, args.warmup, device)
        del W, matmul
        gc.collect()
    return min(layouts, key=lambda key: statistics.median(layouts[key])), layouts


def _environment(device: torch.device) -> dict:
    try:
        import triton

        triton_ver = triton.__version__
    except ImportError:
        triton_ver = None
    return {"torch": torch.__version__, "cuda": getattr(torch.version, "cuda", None), "triton": triton_ver,
            "python": platform.python_version(),
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def run_bench(args: argparse.Namespace) -> dict:
    """Run the benchmark described in the module docstring; returns the JSON record (a dict)."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine; use --device cpu")
    if args.vs == "sparsify":
        _import_sparsify(device)  # fail fast, before the long runs
    dtype = _DTYPES[args.dtype]
    bf16 = dtype == torch.bfloat16
    d, n, k, B = args.d, args.n, args.k, args.batch
    xs, perm = _inputs(args, device)
    n_dead = int(round(args.dead_frac * n))
    dead = _dead_mask(perm, n_dead, device)

    # Import everything the step touches (kernels, Triton) before the memory baseline; not the trainer
    # (the store, zarr), which the step does not need.
    from sae_dist.sae import topk  # noqa: F401  (imports the kernels and Triton)
    from sae_dist.train import engine  # noqa: F401
    mem = PeakMemory(device)
    mem.start()
    sae, opt, step, cfg, kernels_used = _make_our_step(
        d, n, k, dtype, device, args.kernels == "on", args.multi_topk, dead, xs, bf16, args.adam)
    retries = _alloc_retries(device)
    step_times = time_fn(step, args.iters, args.warmup, device)
    retries = _alloc_retries(device, retries)
    peak_mb = mem.peak_mb()
    syncs, sync_error = None, None
    try:  # a count beside the timings: its failure is recorded, never the benchmark's
        syncs = host_syncs(step, args.warmup + args.iters, device)
    except Exception as e:  # noqa: BLE001
        sync_error = f"{type(e).__name__}: {e}"[:300]
    n_params = sum(p.numel() * p.element_size() for p in sae.parameters())
    W_src = sae.W_enc.detach()
    del opt, step, sae
    gc.collect()
    best, matmul_layouts = _time_matmul(W_src, xs, dtype, args, device)
    del W_src
    matmul_times = matmul_layouts[best]

    step_ms = statistics.median(step_times)
    matmul_ms = statistics.median(matmul_times)
    rec = {
        "d": d, "n": n, "k": k, "batch": B, "dtype": args.dtype, "device": device.type,
        "device_name": device_name(device),
        "kernels": args.kernels == "on", "kernels_used": kernels_used,
        "multi_topk": args.multi_topk, "k_aux": cfg.k_aux, "dead_latents": n_dead, "adam": args.adam,
        "iters": args.iters, "warmup": args.warmup,
        "step_ms": step_ms, "matmul_ms": matmul_ms, "step_over_matmul": step_ms / matmul_ms,
        "tokens_per_s": B / (step_ms / 1e3),
        "step_ms_min": min(step_times), "matmul_ms_min": min(matmul_times),
        "matmul_layout": best,
        "matmul_ms_by_layout": {key: statistics.median(v) for key, v in matmul_layouts.items()},
        "matmul_gflop_per_s": 2 * B * d * n / (matmul_ms / 1e3) / 1e9,
        "peak_mem_mb": peak_mb, "peak_mem_method": mem.method, "alloc_retries": retries,
        "host_syncs_per_step": syncs, **({"host_syncs_error": sync_error} if sync_error else {}),
        "param_grad_adam_mb": 4 * n_params / 2**20,
        **_environment(device),
    }
    if args.baseline_dead_frac is not None:
        rec.update(_time_vs_baseline(args, device, perm, dead, xs, dtype, bf16))
    if args.vs == "sparsify":
        rec.update(_sparsify_record(args, device, dead, xs, bf16, cfg.auxk_coef, step_ms, matmul_ms))
    return rec


def _sparsify_record(args, device, dead, xs, bf16: bool, auxk_alpha: float, step_ms: float, matmul_ms: float) -> dict:
    """`--vs sparsify`'s keys of the record (module docstring). Any error of sparsify's step is recorded as
    `sparsify_error`, so our step's numbers are printed whatever sparsify does."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # our step's cached blocks go back before sparsify's dense [B, n]
    try:
        sp = _time_sparsify(args, device, dead, xs, bf16, auxk_alpha=auxk_alpha)
    except Exception as e:  # noqa: BLE001 - the comparison's failure must not lose our measured step
        msg = (str(e).strip().splitlines() or [""])[0]
        return {"sparsify_micro_batches": args.sparsify_micro_batches, "sparsify_error": f"{type(e).__name__}: {msg}"}
    if "error" in sp:
        return {"sparsify_micro_batches": sp["micro"], "sparsify_error": sp["error"]}
    sp_ms = statistics.median(sp["times"])
    return {"sparsify_micro_batches": sp["micro"], "sparsify_alloc_retries": sp["alloc_retries"],
            "sparsify_step_ms": sp_ms, "sparsify_step_ms_min": min(sp["times"]),
            "speedup_vs_sparsify": sp_ms / step_ms, "sparsify_version": sp["version"],
            "sparsify_over_matmul": sp_ms / matmul_ms}


def _positive_int(name):
    def conv(v):
        try:
            i = int(v)
        except ValueError:
            i = 0
        if i < 1:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {v!r}")
        return i
    return conv


def _micro_batches(v: str) -> int | str:
    if v == "auto":
        return v
    return _positive_int("--sparsify-micro-batches")(v)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sae_dist.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=_positive_int("--d"), required=True, help="d_in")
    p.add_argument("--n", type=_positive_int("--n"), required=True, help="d_sae (n in the paper)")
    p.add_argument("--k", type=_positive_int("--k"), required=True, help="active latents per token")
    p.add_argument("--batch", type=_positive_int("--batch"), required=True, help="tokens per step")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32",
                   help="fp32, or bf16 (autocast, fp32 master weights, as the trainer on CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--iters", type=_positive_int("--iters"), default=10, help="timed iterations")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--vs", choices=["sparsify"], default=None, help="also time EleutherAI sparsify")
    p.add_argument("--sparsify-micro-batches", type=_micro_batches, default=1, metavar="M|auto",
                   help="with --vs sparsify: split each batch into M chunks as sparsify's trainer does "
                        "(micro_acc_steps) to fit memory; auto: 1, doubled on CUDA out-of-memory (default 1)")
    p.add_argument("--kernels", choices=["on", "off"], default="on",
                   help="on: the training path (sae_dist.kernels); off: its dense torch oracle "
                        "(topk_losses_reference: [B, n] pre-activations, torch.topk)")
    p.add_argument("--adam", choices=["trainer", "fused", "unfused"], default="trainer",
                   help="trainer: the optimizer sae_dist.train.trainer builds (default; fused Adam); "
                        "fused / unfused: torch.optim.Adam with fused=True / False")
    p.add_argument("--multi-topk", action="store_true", help="add the Multi-TopK term (L(k) + L(4k)/8)")
    p.add_argument("--dead-frac", type=float, default=0.05,
                   help="fraction of latents marked dead (AuxK targets); default 0.05")
    p.add_argument("--baseline-dead-frac", type=float, default=None, metavar="F0",
                   help="also time the step with F0 of the latents dead, alternating step by step with the "
                        "--dead-frac step in one process (e.g. 0: the AuxK cost, robust to machine drift)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {args.warmup}")
    for name, v in (("--dead-frac", args.dead_frac), ("--baseline-dead-frac", args.baseline_dead_frac)):
        if v is not None and not 0.0 <= v <= 1.0:
            raise SystemExit(f"{name} must be in [0, 1], got {v}")
    if args.k > args.n:
        raise SystemExit(f"--k {args.k} > --n {args.n}: k must be <= d_sae")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rec = run_bench(args)
    print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
