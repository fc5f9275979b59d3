"""Measured launch configurations of the fused encoder: time `encoder_candidates` on a GPU, keep the fastest.

    python -m sae_dist.kernels.tune [--d-in 768] [--n 262144] [--batch 32768] [--k 32 128] [--dtype bf16]
                                    [--iters 10] [--warmup 2] [--budget-s 120] [--stop-at UNIX_TIME]
                                    [--seed 0] [--out FILE] [--device cuda]
    python -m sae_dist.kernels.tune --merge FILE [--table PATH] [--force]

`--dtype`: bf16 / fp16 (16-bit tensor-core dots), fp32 (IEEE dots, torch's default fp32 setting) or tf32
(fp32 operands with torch's fp32 matmul precision set to "tf32" for the run, so the encoder takes TF32 dots).
For each shape class (dtype and k, hence the dot precision and K_PAD = next_pow2(k)) it builds random
operands x - b_dec [batch, d_in], W_enc [d_in, n], b_enc [n] (seed 0), compiles every candidate of
`encoder_topk.encoder_candidates` (the offline default first), checks that each selects what the
default selects (`check_selection`), and times the valid ones in turn (`sae_dist.bench.time_interleaved`:
each iteration runs every candidate once, so drift of the machine hits all alike; median and min in
ms of the kernel launch alone). After each class, a JSON line per candidate goes to stdout and `--out` is
rewritten with the result so far (device, versions, shape, per class its candidates and the fastest), so
a tuner killed at a time limit keeps the classes it finished. Candidates not started before `--budget-s`
seconds (or the Unix time `--stop-at`) are listed as "not run", and timing stops there after one round;
the exit status is 0 when every class was timed completely and every candidate selected correctly, 1
otherwise, 2 for bad usage.

`--merge FILE` puts each class's fastest configuration of a result file into the measured table
`encoder_tuned.json` beside this module (or `--table`), keyed by device name, precision and K_PAD, which
`encoder_launch_config` then uses for that GPU (`measured_config`). Commit the table after a run on a
new GPU model. `make gpu-check` runs the tuner as its last step (docs/gpu-check.md).

Without CUDA (`--device cpu`) the candidates run under Triton's interpreter: their tile shapes and the
correctness check are exercised (the dry gpu-check does), the timings mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

TABLE_PATH = Path(__file__).with_name("encoder_tuned.json")
PRECISION_LABELS = {None: "16-bit", "tf32": "tf32", "ieee": "ieee"}
#: --dtype: the operands' dtype and, for fp32, torch's fp32 matmul precision during the run ("tf32": TF32 dots)
DTYPES = {"bf16": (torch.bfloat16, None), "fp16": (torch.float16, None), "fp32": (torch.float32, "ieee"),
          "tf32": (torch.float32, "tf32")}
#: A candidate's sorted selected values may differ from the default's by CHECK_RTOL relative to the largest
#: (fp32 accumulation in another order), and its values from the IEEE fp32 pre-activations recomputed at its
#: ids by that much too, or by CHECK_RTOL_TF32 for TF32 dots (inputs rounded to 10-bit mantissas).
CHECK_RTOL = 1e-3
CHECK_RTOL_TF32 = 1e-2
CHECK_ROWS = 64  # rows whose values are recomputed at the selected indices
CPU_DEVICE = "cpu (interpreter)"  # the device name of a result measured without a GPU


# ------------------------------------------------------------------------------------------ the table
@functools.lru_cache(maxsize=None)
def _table(path: str) -> tuple:
    p = Path(path)
    if not p.exists():
        return ()
    return tuple(json.loads(p.read_text()).get("entries", ()))


def measured_config(device_name: str, precision: str | None, k: int, path: Path | None = None) -> dict | None:
    """The measured table's (`path`, default TABLE_PATH) configuration for (device_name, precision,
    K_PAD = next_pow2(k)), or None when the table has no such entry or its configuration is not (any more)
    one of `encoder_candidates`."""
    from .encoder_topk import encoder_candidates

    # the training step calls this every launch: with no entry for this GPU (the usual case) nothing else runs
    label = PRECISION_LABELS[precision]
    mine = [e for e in _table(str(TABLE_PATH if path is None else path))
            if e["device"] == device_name and e["precision"] == label]
    if not mine:
        return None
    cands = encoder_candidates(k, precision)
    for e in mine:
        if e["K_PAD"] == cands[0]["K_PAD"]:
            return dict(e["config"]) if e["config"] in cands else None
    return None


#: The smallest shape whose timings --merge accepts without --force (a dry gpu-check's are far below):
#: tokens, latents
MIN_MERGE_SHAPE = (4096, 1 << 16)


def _key(e: dict) -> tuple:
    return e["device"], e["precision"], e["K_PAD"]


def merge(result: dict, path: Path | None = None, force: bool = False) -> list[dict]:
    """Put each class's fastest configuration of a tuner result (`run`'s dict) into the table at `path`
    (default TABLE_PATH), replacing an entry of the same device, precision and K_PAD (of two such classes in
    the result, the faster). Only complete classes count (every candidate correct and timed over all rounds;
    with force, incomplete ones whose default was timed and none of whose candidates failed). Returns the
    entries written.
    Raises ValueError (the table unchanged): a result of the CPU interpreter, a shape below MIN_MERGE_SHAPE
    (unless force: timings at tiny shapes say nothing about training), or no class that counts."""
    path = TABLE_PATH if path is None else path
    if result.get("device") == CPU_DEVICE:
        raise ValueError("the result was measured under Triton's CPU interpreter; its timings mean nothing")
    shape = result["shape"]
    if not force and (shape["batch"] < MIN_MERGE_SHAPE[0] or shape["n"] < MIN_MERGE_SHAPE[1]):
        raise ValueError(f"the result was measured at batch={shape['batch']}, n={shape['n']}, below "
                         f"{MIN_MERGE_SHAPE[0]} tokens x {MIN_MERGE_SHAPE[1]} latents; pass --force to merge it")
    best: dict[tuple, dict] = {}
    for c in result["classes"]:
        if not (c.get("best") and c.get("default_ms") and c.get("all_correct") and (c.get("complete") or force)):
            continue
        e = {"device": result["device"], "precision": c["precision"], "K_PAD": c["K_PAD"], "config": c["best"],
             "ms": c["best_ms"], "default_ms": c["default_ms"], "dtype": c["dtype"], "k": c["k"],
             "shape": shape, "triton": result["triton"], "date": result["date"]}
        if _key(e) not in best or e["ms"] < best[_key(e)]["ms"]:
            best[_key(e)] = e
    if not best:
        raise ValueError("the tuner result has no complete class (every candidate correct and timed over all "
                         "rounds); nothing to merge (--force takes incomplete ones)")
    old = json.loads(path.read_text())["entries"] if path.exists() else []
    entries = sorted([e for e in old if _key(e) not in best] + list(best.values()), key=_key)
    _write_atomic(path, {"entries": entries})
    _table.cache_clear()
    return list(best.values())


# ------------------------------------------------------------------------------------------ the sweep
def config_tag(cfg: dict) -> str:
    """A launch configuration as BLOCK_B x BLOCK_N x BLOCK_D, warps, stages (e.g. "64x128x64 w4 s3")."""
    return f"{cfg['BLOCK_B']}x{cfg['BLOCK_N']}x{cfg['BLOCK_D']} w{cfg['num_warps']} s{cfg['num_stages']}"


def _select(xc, W_enc, b_enc, k, cfg):
    """(launch, finish): the candidate's kernel launch, and the final top-k over its split candidates."""
    from .encoder_topk import LATENT_CHUNK, encoder_launch

    launch, cand_v, cand_i = encoder_launch(xc, W_enc, b_enc, k, LATENT_CHUNK, config=cfg)

    def finish():
        v, j = cand_v.topk(k, dim=1, sorted=False)
        return v, cand_i.gather(1, j).long()

    return launch, finish


def check_values(xc, W_enc, b_enc, v, i, rtol: float = CHECK_RTOL) -> str | None:
    """None when a selection (values v [B, k] fp32, latent ids i [B, k] int64) has distinct, in-range ids and
    values that are the pre-activations at its ids (fp32 products of the operands summed elementwise, so no
    TF32 matmul enters) up to rtol of the largest value, on CHECK_ROWS rows spread over the batch (every
    token block's); else what is wrong, in words."""
    n = W_enc.shape[1]
    scale = max(1.0, float(v.abs().max()))
    rows = torch.linspace(0, v.shape[0] - 1, min(CHECK_ROWS, v.shape[0]), device=v.device).long()
    ids = i[rows]
    if bool((ids < 0).any() or (ids >= n).any()) or bool((ids.sort(1).values.diff(dim=1) == 0).any()):
        return "latent ids out of range or repeated in a row"
    cols = W_enc.t().index_select(0, ids.reshape(-1)).float().view(len(rows), -1, W_enc.shape[0])
    pre = (cols * xc[rows].float().unsqueeze(1)).sum(-1) + b_enc.float()[ids]
    err = float((pre - v[rows]).abs().max()) / scale
    if not err <= rtol:
        return f"values differ from the pre-activations at their ids by {err:.3g} (relative to the largest)"
    return None


def check_selection(ref_v, v) -> str | None:
    """None when a candidate's selected values v [B, k] are a correct reference's ref_v up to CHECK_RTOL of the
    largest (each row compared sorted: near-ties may pick other latents, never other values); else how far."""
    scale = max(1.0, float(ref_v.abs().max()))
    err = float((v.sort(1).values - ref_v.sort(1).values).abs().max()) / scale
    if not err <= CHECK_RTOL:
        return f"selected values differ from the reference candidate's by {err:.3g} (relative to the largest)"
    return None


def _one_line(e: BaseException, prefix: str = "") -> str:
    """An exception as one line of at most 500 characters (it goes into markdown tables)."""
    return " ".join(f"{prefix}{type(e).__name__}: {e}".split())[:500]


def _first_run(xc, W_enc, b_enc, k, cfg, rtol, ref_v, rec):
    """Compile and run one candidate, check it (`check_values`, then against ref_v when given); fills `rec`
    (status checked / wrong / error, first_run_s, error). Returns (launch, values) when it passed, else None.
    Any exception (compile, launch, a fault surfacing at the synchronisation) is the candidate's error."""
    t0 = time.perf_counter()
    try:
        launch, finish = _select(xc, W_enc, b_enc, k, cfg)
        launch.run()
        v, i = finish()
        if xc.is_cuda:
            torch.cuda.synchronize(xc.device)
        rec["first_run_s"] = round(time.perf_counter() - t0, 3)  # compile + one launch
        bad = check_values(xc, W_enc, b_enc, v, i, rtol) or (None if ref_v is None else check_selection(ref_v, v))
    except Exception as e:  # reported, not fatal: the other candidates still run
        rec.update(status="error", error=_one_line(e))
        return None
    rec["status"] = "wrong" if bad else "checked"
    if bad:
        rec["error"] = bad
        return None
    return launch, v


def _time_runs(runs, iters: int, warmup: int, deadline: float, device) -> None:
    """Time the checked candidates' launches in turn (`time_interleaved`, one round at a time): `warmup` rounds,
    then up to `iters` timed ones, stopping early (after at least one) at `deadline`; fills ms_median, ms_min
    and rounds into their records (status "timed")."""
    from sae_dist.bench import time_interleaved

    fns = [lambda _, la=la: la.run() for _, la in runs]
    time_interleaved(fns, 0, warmup, device)
    times: list[list[float]] = [[] for _ in runs]
    for r in range(iters):
        if r and time.time() >= deadline:
            break
        for t, new in zip(times, time_interleaved(fns, 1, 0, device), strict=True):
            t += new
    for (rec, _), t in zip(runs, times, strict=True):
        rec.update(status="timed", ms_median=round(statistics.median(t), 4), ms_min=round(min(t), 4), rounds=len(t))


def tune_class(xc, W_enc, b_enc, k: int, iters: int, warmup: int, deadline: float) -> dict:
    """Compile, check and time every candidate for one shape class (module docstring). `deadline`: a Unix time
    (time.time()); candidates not started before it are "not run", and timing stops at it after one round.
    The reference of the selection check is the first candidate (normally the default) that passes its own
    value check."""
    from .encoder_topk import dot_precision, encoder_candidates

    precision = dot_precision(xc)
    rtol = CHECK_RTOL_TF32 if precision == "tf32" else CHECK_RTOL
    cands = encoder_candidates(k, precision)
    results, runs, ref_v = [], [], None
    for cfg in cands:
        rec = {"config": cfg, "tag": config_tag(cfg), "status": "not run"}
        results.append(rec)
        if time.time() >= deadline:
            continue
        ok = _first_run(xc, W_enc, b_enc, k, cfg, rtol, ref_v, rec)
        if ok is not None:
            runs.append((rec, ok[0]))
            ref_v = ok[1] if ref_v is None else ref_v
    if runs and time.time() < deadline:
        try:
            _time_runs(runs, iters, warmup, deadline, xc.device)
        except Exception as e:  # a launch that fails only now (a fault of an earlier one, say): the class is kept
            for rec, _ in runs:
                rec.update(status="error", error=_one_line(e, "timing: "))
    timed = [r for r in results if r["status"] == "timed"]
    best = min(timed, key=lambda r: r["ms_median"]) if timed else None
    default_ms = results[0].get("ms_median")
    # complete: every candidate timed over all `iters` rounds; all_correct: none wrong and none failed
    return {"precision": PRECISION_LABELS[precision], "K_PAD": cands[0]["K_PAD"], "k": k, "results": results,
            "complete": len(timed) == len(results) and all(r["rounds"] == iters for r in timed),
            "all_correct": all(r["status"] not in ("wrong", "error") for r in results),
            "best": best["config"] if best else None, "best_tag": best["tag"] if best else None,
            "best_ms": best["ms_median"] if best else None, "default_ms": default_ms,
            "default_over_best": round(default_ms / best["ms_median"], 4) if best and default_ms else None}


def _operands(d_in: int, n: int, batch: int, dtype: torch.dtype, device: torch.device, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    xc = torch.randn(batch, d_in, generator=g).to(device, dtype)
    W_enc = (torch.randn(d_in, n, generator=g) / d_in**0.5).to(device, dtype)
    b_enc = (0.1 * torch.randn(n, generator=g)).to(device, dtype)
    return xc, W_enc, b_enc


def run(args: argparse.Namespace, emit=lambda rec: None, save=lambda result: None) -> dict:
    """The sweep of `main` (module docstring) as a dict: device, triton, torch, date, shape, classes. After each
    class, `emit(record)` per candidate (with dtype and k) and `save(result so far)`."""
    import triton

    device = torch.device(args.device)
    deadline = args.stop_at if args.stop_at is not None else time.time() + args.budget_s
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else CPU_DEVICE,
              "triton": triton.__version__, "torch": torch.__version__,
              "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "shape": {"d_in": args.d_in, "n": args.n, "batch": args.batch}, "classes": []}
    for dt in args.dtype:
        dtype, fp32_precision = DTYPES[dt]
        xc, W_enc, b_enc = _operands(args.d_in, args.n, args.batch, dtype, device, args.seed)
        for k in args.k:
            with _fp32_matmul(fp32_precision):  # the encoder follows torch's setting (`dot_precision`)
                cl = {"dtype": dt, **tune_class(xc, W_enc, b_enc, k, args.iters, args.warmup, deadline)}
            result["classes"].append(cl)
            for rec in cl["results"]:
                emit({"dtype": dt, "k": k, **rec})
            save(result)
        del xc, W_enc, b_enc
    return result


@contextlib.contextmanager
def _fp32_matmul(precision: str | None):
    """torch's fp32 CUDA matmul precision set to "tf32" or "ieee" inside the block (None: left as it is)."""
    m = torch.backends.cuda.matmul
    if precision is None:
        yield
        return
    new_api = hasattr(m, "fp32_precision")  # torch >= 2.9; allow_tf32 before
    before = m.fp32_precision if new_api else m.allow_tf32
    if new_api:
        m.fp32_precision = precision
    else:
        m.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        if new_api:
            m.fp32_precision = before
        else:
            m.allow_tf32 = before


def _write_atomic(path: Path, result: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m sae_dist.kernels.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--n", type=int, default=1 << 18, help="latents (2^18: the grid is full, a launch short)")
    p.add_argument("--batch", type=int, default=32768)
    p.add_argument("--k", type=int, nargs="+", default=[32, 128], help="k values (128: Multi-TopK's 4k at 32)")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bf16"])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=120.0, help="no candidate starts after this many seconds")
    p.add_argument("--stop-at", type=float, metavar="UNIX_TIME",
                   help="no candidate starts after this time (time.time(); instead of --budget-s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="write the whole result (JSON) here")
    p.add_argument("--merge", type=Path, metavar="FILE", help="merge a result file into the measured table")
    p.add_argument("--table", type=Path, default=TABLE_PATH, help="the measured table --merge writes")
    p.add_argument("--force", action="store_true",
                   help="with --merge: accept a result of a tiny shape, and classes not timed completely")
    args = p.parse_args(argv)
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    for name in ("d_in", "n", "batch", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.k) < 1 or max(args.k) > args.n:
        p.error(f"--k {args.k}: every k must be in [1, --n = {args.n}]")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here (use --device cpu for the interpreter)")
    if args.merge is None and not args.device.startswith("cuda"):
        from ._common import interpret_mode

        if not interpret_mode():
            p.error(f"--device {args.device}: without CUDA the kernels run under Triton's interpreter; "
                    "set TRITON_INTERPRET=1 before starting Python")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    if args.merge is not None:
        try:
            written = merge(json.loads(args.merge.read_text()), args.table, args.force)
        except (OSError, ValueError, KeyError) as e:
            print(f"tune: cannot merge {args.merge}: {e}", file=sys.stderr)
            return 2
        for e in written:
            print(f"{args.table}: {e['device']} {e['precision']} K_PAD={e['K_PAD']}: {config_tag(e['config'])}")
        return 0
    result = run(args, emit=lambda rec: print(json.dumps(rec), flush=True),
                 save=lambda res: args.out is not None and _write_atomic(args.out, res))
    ok = all(c["complete"] and c["all_correct"] for c in result["classes"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
