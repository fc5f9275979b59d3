"""`sae-scaling SWEEP_DIR`: fit the scaling laws of Gao et al. 2024 ("Scaling and evaluating sparse
autoencoders", sec. 3) to an n x k sweep and write a table (markdown + JSON) and plots (PNG).

Input: a sweep directory of `sae-train -m ...` points (any depth), each with `eval.json`
(`sae-train eval.after_train=true` or `sae-eval`) and `train_log.jsonl`; `sae/cfg.json` and
`training_state.json` fill in what eval.json lacks. Failed points (`job_status.json`, see
`sae_dist.sweep`) and points without the metric are listed, not fitted.

The loss L is, by default, `fvu_normalized_inputs` (the normalised MSE in the space the SAE is trained
in: the paper's "normalized MSE"), falling back to `normalized_mse`; `--metric` picks any numeric
eval.json key, or `train/<name>` (the last logged training value in training_state.json, for sweeps
evaluated without an LM).

Fitted forms (every fit minimises the squared error of log L, i.e. relative errors, with
scipy.optimize.curve_fit; one-sigma parameter uncertainties are the square roots of the diagonal of
the covariance curve_fit estimates from the residuals - None when there are no degrees of freedom):

* L(n) at each k, L(k) at each n: a power law with an irreducible term,
  L(x) = exp(alpha + beta * log x) + c, with c >= 0 (Gao et al. 2024 eq. 1 form, sec. 3.1).
* joint L(n, k) = exp(a + b_k log k + b_n log n + g log k log n) + exp(z + e log k) (Gao et al. 2024
  eq. 2, sec. 3.2): the reducible term's exponents in n depend on k through g; the irreducible
  term depends on k alone.
* L(C) at each k: C = 6 * d_in * n * tokens (FLOPs of a dense forward + backward through an encoder of
  d_in x n parameters, the 6ND convention; the sparse decoder's O(k) cost is left out), along the
  compute-efficient frontier: every point's training curve (train_log.jsonl, train/fvu,
  smoothed over a few log records) gives (C, L) pairs; the frontier is the lower envelope over all
  n at that k; fitted with the same power law + irreducible term (sec. 3.1, "L(C)").

Outputs in `--out` (default SWEEP_DIR/scaling): `scaling.json` (data, fits, failures), `scaling.md`
(tables), `scaling_n.png`, `scaling_k.png`, `scaling_joint.png`, `scaling_compute.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "FitResult",
    "collect_sweep",
    "compute_frontier",
    "fit_joint",
    "fit_power_law",
    "joint_law",
    "main",
    "power_law",
    "run_scaling",
]

DEFAULT_METRICS = ("fvu_normalized_inputs", "normalized_mse")


# ----------------------------------------------------------------------------------------------
# the laws


def power_law(x: np.ndarray, alpha: float, beta: float, c: float) -> np.ndarray:
    """L(x) = exp(alpha + beta * log x) + c (power law with irreducible term c). x > 0, float64."""
    return np.exp(alpha + beta * np.log(x)) + c


def joint_law(n: np.ndarray, k: np.ndarray, a: float, b_k: float, b_n: float, g: float, z: float,
              e: float) -> np.ndarray:
    """Gao et al. 2024 eq. 2: L(n, k) = exp(a + b_k log k + b_n log n + g log k log n) + exp(z + e log k).

    n, k: arrays of latents and active latents (> 0), broadcast together; returns float64 losses."""
    ln, lk = np.log(n), np.log(k)
    return np.exp(a + b_k * lk + b_n * ln + g * lk * ln) + np.exp(z + e * lk)


@dataclass
class FitResult:
    """One fitted law. `params`/`stderr`: name -> value / one-sigma uncertainty (None: no degrees of
    freedom or a singular covariance). `rms_log_residual`: sqrt(mean((log L - log L_fit)^2)).
    `group`: what the fit is conditioned on (e.g. {"k": 32}); `x`/`y`: the data fitted."""

    law: str
    form: str
    params: dict[str, float]
    stderr: dict[str, float | None]
    n_points: int
    rms_log_residual: float
    group: dict[str, Any] = field(default_factory=dict)
    x: list = field(default_factory=list)
    y: list = field(default_factory=list)

    def predict(self, *xs) -> np.ndarray:
        p = self.params
        if self.law == "L(n,k)":
            return joint_law(np.asarray(xs[0], float), np.asarray(xs[1], float), **p)
        return power_law(np.asarray(xs[0], float), p["alpha"], p["beta"], p["c"])


def _stderr(pcov: np.ndarray, names: Sequence[str]) -> dict[str, float | None]:
    out = {}
    diag = np.diag(pcov) if pcov is not None and np.ndim(pcov) == 2 else [np.inf] * len(names)
    for name, v in zip(names, diag, strict=True):
        out[name] = float(math.sqrt(v)) if np.isfinite(v) and v >= 0 else None
    return out


def fit_power_law(x: Sequence[float], y: Sequence[float], *, law: str = "L(x)",
                  group: dict | None = None) -> FitResult:
    """Fit L(x) = exp(alpha + beta log x) + c, c in [0, min(y)), minimising squared log residuals.

    x, y: >= 3 positive finite values (float64). Returns a FitResult; with exactly 3 points the fit is
    exact and the uncertainties are None. Raises ValueError for fewer than 3 points or non-positive
    values. Source: Gao et al. 2024 sec. 3.1 (power law with an irreducible loss term).
    """
    from scipy.optimize import curve_fit

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of the same length, got {x.shape} and {y.shape}")
    if len(x) < 3:
        raise ValueError(f"{law}: a power law with an irreducible term needs >= 3 points, got {len(x)}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x > 0) and np.all(y > 0)):
        raise ValueError(f"{law}: x and y must be finite and > 0, got x={x.tolist()} y={y.tolist()}")

    def model(lx, alpha, beta, c):
        return np.log(np.exp(alpha + beta * lx) + c)

    lx, ly = np.log(x), np.log(y)
    ymin = float(y.min())
    best = None
    for frac in (0.0, 0.3, 0.6, 0.9):  # a few starts for the irreducible term
        c0 = frac * ymin
        slope, icpt = np.polyfit(lx, np.log(np.maximum(y - c0, 1e-12)), 1)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                popt, pcov = curve_fit(model, lx, ly, p0=[icpt, slope, c0],
                                       bounds=([-np.inf, -np.inf, 0.0], [np.inf, np.inf, ymin * (1 - 1e-9)]),
                                       method="trf", maxfev=20000)
        except (RuntimeError, ValueError):
            continue
        sse = float(np.sum((model(lx, *popt) - ly) ** 2))
        if best is None or sse < best[0] - 1e-15:
            best = (sse, popt, pcov)
    if best is None:
        raise RuntimeError(f"{law}: curve_fit did not converge from any start (x={x.tolist()}, y={y.tolist()})")
    sse, popt, pcov = best
    names = ("alpha", "beta", "c")
    stderr = _stderr(pcov, names) if len(x) > 3 else dict.fromkeys(names)
    return FitResult(law=law, form="exp(alpha + beta*log x) + c",
                     params={nm: float(v) for nm, v in zip(names, popt, strict=True)}, stderr=stderr,
                     n_points=len(x), rms_log_residual=math.sqrt(sse / len(x)), group=dict(group or {}),
                     x=x.tolist(), y=y.tolist())


def fit_joint(n: Sequence[float], k: Sequence[float], y: Sequence[float]) -> FitResult:
    """Fit Gao et al. 2024 eq. 2, L(n,k) = exp(a + b_k log k + b_n log n + g log k log n) + exp(z + e log k),
    minimising squared log residuals from several starts (the best kept).

    n, k, y: 1-D arrays of >= 7 points (6 parameters + 1 degree of freedom) spanning >= 2 values of n
    and of k. Raises ValueError otherwise; RuntimeError if no start converges.
    """
    from scipy.optimize import curve_fit

    n = np.asarray(n, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if not (n.shape == k.shape == y.shape and n.ndim == 1):
        raise ValueError(f"n, k, y must be 1-D of one length, got {n.shape}, {k.shape}, {y.shape}")
    if len(y) < 7 or len(np.unique(n)) < 2 or len(np.unique(k)) < 2:
        raise ValueError(f"L(n,k) has 6 parameters: needs >= 7 points over >= 2 values of n and of k, got "
                         f"{len(y)} points, n values {sorted(set(n.tolist()))}, k values {sorted(set(k.tolist()))}")
    if not (np.all(n > 0) and np.all(k > 0) and np.all(y > 0) and np.all(np.isfinite(y))):
        raise ValueError("L(n,k): n, k and the losses must be > 0 and finite")
    X = np.stack([n, k])
    ly = np.log(y)

    def model(X, a, b_k, b_n, g, z, e):
        return np.log(joint_law(X[0], X[1], a, b_k, b_n, g, z, e))

    A = np.stack([np.ones_like(n), np.log(k), np.log(n)], 1)
    best = None
    for frac in (0.1, 0.4, 0.7):
        c0 = frac * float(y.min())
        coef, *_ = np.linalg.lstsq(A, np.log(np.maximum(y - c0, 1e-12)), rcond=None)
        for g0 in (0.0, -0.05, 0.05):
            for e0 in (0.0, -0.3):
                p0 = [coef[0], coef[1], coef[2], g0, math.log(c0) - e0 * float(np.log(k).mean()), e0]
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        popt, pcov = curve_fit(model, X, ly, p0=p0, method="lm", maxfev=40000)
                except (RuntimeError, ValueError):
                    continue
                sse = float(np.sum((model(X, *popt) - ly) ** 2))
                if np.isfinite(sse) and (best is None or sse < best[0] - 1e-15):
                    best = (sse, popt, pcov)
    if best is None:
        raise RuntimeError("L(n,k): curve_fit did not converge from any start")
    sse, popt, pcov = best
    names = ("a", "b_k", "b_n", "g", "z", "e")
    return FitResult(law="L(n,k)", form="exp(a + b_k*log k + b_n*log n + g*log k*log n) + exp(z + e*log k)",
                     params={nm: float(v) for nm, v in zip(names, popt, strict=True)}, stderr=_stderr(pcov, names),
                     n_points=len(y), rms_log_residual=math.sqrt(sse / len(y)),
                     x=[n.tolist(), k.tolist()], y=y.tolist())


def compute_frontier(
    curves: Sequence[tuple[np.ndarray, np.ndarray]], n_bins: int = 24
) -> tuple[np.ndarray, np.ndarray]:
    """Lower envelope of training curves in (compute, loss): the compute-efficient frontier.

    curves: [(C [m], L [m])] per run (C in FLOPs, increasing). The log-C range is split into `n_bins`
    bins; each bin's lowest loss over all curves is kept, then only points that improve on every
    lower-compute point (a monotone frontier). Returns (C_front, L_front), float64, increasing C.
    """
    if not curves:
        return np.zeros(0), np.zeros(0)
    C = np.concatenate([np.asarray(c, float) for c, _ in curves])
    L = np.concatenate([np.asarray(v, float) for _, v in curves])
    keep = np.isfinite(C) & np.isfinite(L) & (C > 0) & (L > 0)
    C, L = C[keep], L[keep]
    if len(C) == 0:
        return np.zeros(0), np.zeros(0)
    edges = np.linspace(np.log(C.min()), np.log(C.max()) + 1e-9, n_bins + 1)
    which = np.clip(np.digitize(np.log(C), edges) - 1, 0, n_bins - 1)
    fc, fl = [], []
    for b in range(n_bins):
        m = which == b
        if m.any():
            i = np.argmin(np.where(m, L, np.inf))
            fc.append(C[i])
            fl.append(L[i])
    fc, fl = np.array(fc), np.array(fl)
    out_c, out_l, best = [], [], np.inf
    for c, v in zip(fc, fl, strict=True):
        if v < best:
            out_c.append(c)
            out_l.append(v)
            best = v
    return np.array(out_c), np.array(out_l)


# ----------------------------------------------------------------------------------------------
# collecting a sweep


def _read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _point_dirs(sweep_dir: Path) -> list[Path]:
    found = set()
    for name in ("eval.json", "job_status.json", "training_state.json"):
        for p in sweep_dir.rglob(name):
            d = p.parent
            if name == "training_state.json" and d.name == "sae":
                d = d.parent
            found.add(d)
    for p in sweep_dir.rglob("sae/cfg.json"):
        found.add(p.parent.parent)
    # the scaling output itself and hidden dirs are not points
    return sorted(d for d in found if not any(part.startswith(".") for part in d.relative_to(sweep_dir).parts))


def _smooth(v: np.ndarray, w: int) -> np.ndarray:
    if w <= 1 or len(v) < w:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    out = v.copy()
    out[w - 1:] = (c[w:] - c[:-w]) / w
    return out


def collect_sweep(sweep_dir: str | os.PathLike, metric: str | None = None, smooth: int = 5) -> dict:
    """Read every point of a sweep. Returns {"metric", "points": [...], "skipped": [...]}.

    Each point: {"dir", "n", "k", "d_in", "tokens", "loss", "compute", "architecture", "curve":
    {"compute": [...], "loss": [...]}}. `metric`: None -> the first of DEFAULT_METRICS that the points
    have; a name -> that eval.json key; "train/<name>" -> training_state.json's final_metrics.
    Skipped points (failed, no metric, no n/k) are listed with the reason.
    Raises FileNotFoundError when `sweep_dir` does not exist or holds no point.
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep directory {str(root)!r} does not exist")
    dirs = _point_dirs(root)
    if not dirs:
        raise FileNotFoundError(
            f"no sweep points under {str(root)!r}: expected point dirs with eval.json / sae/cfg.json / "
            "job_status.json (run `sae-train -m ... eval.after_train=true` into it)")
    raw = [(d, *_point_files(d)) for d in dirs]
    if metric is None:
        metric = next((m for m in DEFAULT_METRICS if any(m in ev for _, ev, *_ in raw)), DEFAULT_METRICS[-1])
    points, skipped = [], []
    for d, ev, cfg, st, js in raw:
        rel = str(d.relative_to(root)) or "."
        point = _sweep_point(d, ev, cfg, st, js, metric, smooth)
        if isinstance(point, str):
            skipped.append({"dir": rel, "reason": point})
        else:
            points.append({"dir": rel, **point})
    return {"metric": metric, "points": sorted(points, key=lambda p: (p["k"], p["n"])), "skipped": skipped}


def _point_files(d: Path) -> tuple[dict, dict, dict, dict]:
    """(eval.json, sae/cfg.json, training_state.json (under sae/, else beside it), job_status.json)
    of the point dir `d`; {} for a file that is missing or unreadable."""
    ev = _read_json(d / "eval.json") or {}
    cfg = _read_json(d / "sae" / "cfg.json") or {}
    st = _read_json(d / "sae" / "training_state.json") or _read_json(d / "training_state.json") or {}
    js = _read_json(d / "job_status.json") or {}
    return ev, cfg, st, js


def _sweep_point(d: Path, ev: dict, cfg: dict, st: dict, js: dict, metric: str, smooth: int) -> dict | str:
    """One point of `collect_sweep` (without "dir") from its files, or the reason it is skipped: a
    job that did not complete, no eval.json for an eval metric, or no n / k / finite positive loss."""
    if js.get("status") not in (None, "completed"):
        reason = str(js.get("status"))
        if js.get("error_type") or js.get("error"):
            reason += f": {js.get('error_type')}: {js.get('error')}"
        elif js.get("status") == "running":
            reason += " (no result yet: still training, or killed; rerun the sweep command to resume it)"
        return reason
    n = ev.get("d_sae") or ev.get("n_latents") or cfg.get("d_sae") or st.get("d_sae") or st.get("n_latents")
    k = ev.get("k") or cfg.get("k") or st.get("k")
    d_in = ev.get("d_in") or cfg.get("d_in") or st.get("d_in")
    tokens = ev.get("tokens_trained") or st.get("tokens_trained")
    if metric.startswith("train/"):
        loss = (st.get("final_metrics") or {}).get(metric)
    else:
        loss = ev.get(metric)
    if loss is None and not metric.startswith("train/") and not ev:
        return "no eval.json (run sae-eval or sae-train eval.after_train=true)"
    if n is None or k is None or loss is None or not np.isfinite(loss) or loss <= 0:
        return f"missing n/k/{metric} (n={n}, k={k}, {metric}={loss})"
    point = {"n": int(n), "k": int(k), "d_in": None if d_in is None else int(d_in),
             "tokens": None if tokens is None else int(tokens), "loss": float(loss),
             "architecture": ev.get("architecture") or cfg.get("architecture"), "curve": None}
    point["compute"] = (6.0 * point["d_in"] * point["n"] * point["tokens"]
                        if point["d_in"] and point["tokens"] else None)
    log = d / "train_log.jsonl"
    if log.is_file() and point["d_in"]:
        point["curve"] = _train_curve(log, point["d_in"], point["n"], smooth)
    return point


def _train_curve(log: Path, d_in: int, n: int, smooth: int) -> dict | None:
    """The training curve of train_log.jsonl: {"compute": 6 d_in n tokens, "loss": the logged
    train/fvu (train/normalized_mse in logs of earlier releases), sorted by tokens and smoothed over
    `smooth` records}, or None
    when no record has both (lines that are not JSON are skipped)."""
    tok, val = [], []
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        v = rec.get("train/fvu", rec.get("train/normalized_mse"))
        if rec.get("tokens") and v is not None:
            tok.append(float(rec["tokens"]))
            val.append(float(v))
    if not tok:
        return None
    order = np.argsort(tok)
    t = np.asarray(tok)[order]
    v = _smooth(np.asarray(val)[order], smooth)
    return {"compute": (6.0 * d_in * n * t).tolist(), "loss": v.tolist()}


# ----------------------------------------------------------------------------------------------
# the whole analysis


def _fits(points: list[dict]) -> dict[str, Any]:
    fits: dict[str, Any] = {"L(n)": [], "L(k)": [], "L(n,k)": None, "L(C)": [], "notes": []}
    ks = sorted({p["k"] for p in points})
    ns = sorted({p["n"] for p in points})
    for k in ks:
        sub = sorted((p for p in points if p["k"] == k), key=lambda p: p["n"])
        if len(sub) >= 3:
            fits["L(n)"].append(fit_power_law([p["n"] for p in sub], [p["loss"] for p in sub], law="L(n)",
                                              group={"k": k}))
        else:
            fits["notes"].append(f"L(n) at k={k}: {len(sub)} points (< 3), not fitted")
    for n in ns:
        sub = sorted((p for p in points if p["n"] == n), key=lambda p: p["k"])
        if len(sub) >= 3:
            fits["L(k)"].append(fit_power_law([p["k"] for p in sub], [p["loss"] for p in sub], law="L(k)",
                                              group={"n": n}))
        else:
            fits["notes"].append(f"L(k) at n={n}: {len(sub)} points (< 3), not fitted")
    try:
        fits["L(n,k)"] = fit_joint([p["n"] for p in points], [p["k"] for p in points], [p["loss"] for p in points])
    except (ValueError, RuntimeError) as e:
        fits["notes"].append(f"L(n,k) not fitted: {e}")
    for k in ks:
        curves = [(np.asarray(p["curve"]["compute"]), np.asarray(p["curve"]["loss"]))
                  for p in points if p["k"] == k and p["curve"]]
        fc, fl = compute_frontier(curves)
        if len(fc) >= 4:
            fits["L(C)"].append(fit_power_law(fc, fl, law="L(C)", group={"k": k, "runs": len(curves)}))
        else:
            fits["notes"].append(f"L(C) at k={k}: frontier of {len(fc)} points (< 4), not fitted")
    return fits


def _pm(v: float, s: float | None) -> str:
    return f"{v:.4g}" if s is None else f"{v:.4g} ± {s:.2g}"


def markdown(result: dict) -> str:
    """The tables of `run_scaling`'s result as markdown (data grid, per-law fits, skipped points)."""
    pts, fits, metric = result["points"], result["fits"], result["metric"]
    ns = sorted({p["n"] for p in pts})
    ks = sorted({p["k"] for p in pts})
    grid = {(p["n"], p["k"]): p["loss"] for p in pts}
    lines = [f"Loss = `{metric}` of {len(pts)} points ({result['sweep_dir']}).", "",
             "| n \\ k | " + " | ".join(str(k) for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    for n in ns:
        lines.append(f"| {n} | " + " | ".join(f"{grid[(n, k)]:.4f}" if (n, k) in grid else "-" for k in ks) + " |")
    lines += ["", "| law | at | form | parameters (± 1 sigma) | points | rms log residual |",
              "|---|---|---|---|---|---|"]
    rows = fits["L(n)"] + fits["L(k)"] + ([fits["L(n,k)"]] if fits["L(n,k)"] else []) + fits["L(C)"]
    for f in rows:
        f = f if isinstance(f, dict) else asdict(f)
        at = ", ".join(f"{a}={b}" for a, b in f["group"].items()) or "all"
        ps = ", ".join(f"{nm} = {_pm(v, f['stderr'].get(nm))}" for nm, v in f["params"].items())
        lines.append(f"| {f['law']} | {at} | `{f['form']}` | {ps} | {f['n_points']} | {f['rms_log_residual']:.3g} |")
    if fits["notes"]:
        lines += [""] + [f"- {note}" for note in fits["notes"]]
    if result["skipped"]:
        lines += ["", "Skipped points:", ""] + [f"- `{s['dir']}`: {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"


def _plots(result: dict, out: Path) -> list[str]:
    """Write the PNGs of a `run_scaling` result into `out`: L(n) per k and L(k) per n with their fits
    (scaling_n.png, scaling_k.png), the joint L(n,k) fit with observed vs fitted (scaling_joint.png, when
    fitted) and the training curves with the L(C) frontier fits (scaling_compute.png, when any point has a
    curve). Returns the paths written."""
    plt = _pyplot()
    pts, fits, metric = result["points"], result["fits"], result["metric"]
    written = [_save(_plot_law(plt, pts, fits[law], metric, law, xkey, gkey), out / name)
               for law, xkey, gkey, name in (("L(n)", "n", "k", "scaling_n.png"), ("L(k)", "k", "n", "scaling_k.png"))]
    if fits["L(n,k)"] is not None:
        written.append(_save(_plot_joint(plt, pts, fits["L(n,k)"], metric), out / "scaling_joint.png"))
    if any(p["curve"] for p in pts):
        written.append(_save(_plot_compute(plt, pts, fits["L(C)"]), out / "scaling_compute.png"))
    return written


def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colored(plt, values) -> list[tuple[Any, Any]]:
    """(value, colour) for the sorted distinct `values`, spread over the viridis colormap."""
    groups = sorted(set(values))
    cmap = plt.get_cmap("viridis")
    return [(g, cmap(i / max(len(groups) - 1, 1))) for i, g in enumerate(groups)]


def _data_ticks(ax, values) -> None:
    """n and k of a sweep are few (often powers of two): label exactly those on the x axis."""
    import matplotlib.pyplot as plt

    ax.set_xticks(sorted(set(values)), [f"{v:g}" for v in sorted(set(values))])
    ax.xaxis.set_minor_formatter(plt.NullFormatter())


def _save(fig, p: Path) -> str:
    """Save `fig` to `p` (dpi 110) and close it; returns str(p). Losses span less than a decade: plain
    numbers on every log axis spanning less than one (matplotlib's default labels those minor ticks
    as overlapping "2.5 x 10^-1")."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _pos: f"{v:.3g}")
    for ax in fig.axes:
        axes = [(ax.yaxis, ax.get_yscale())]
        if ax.get_xlabel() == "observed":
            axes.append((ax.xaxis, ax.get_xscale()))
        for axis, scale in axes:
            lo, hi = sorted(axis.get_view_interval())
            if scale == "log" and lo > 0 and hi / lo < 10:
                axis.set_major_formatter(plain)
                axis.set_minor_formatter(plain)
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return str(p)


def _plot_law(plt, pts: list[dict], fits: list[FitResult], metric: str, law: str, xkey: str, gkey: str):
    """The figure of one power law `law` (L(n) or L(k)): loss against xkey, one colour per gkey value,
    with that group's fit when there is one."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for g, col in _colored(plt, [p[gkey] for p in pts]):
        sub = sorted((p for p in pts if p[gkey] == g), key=lambda p: p[xkey])
        ax.plot([p[xkey] for p in sub], [p["loss"] for p in sub], "o", color=col, label=f"{gkey}={g}")
        f = next((f for f in fits if f.group.get(gkey) == g), None)
        if f is not None:
            xs = np.geomspace(min(f.x), max(f.x), 100)
            ax.plot(xs, f.predict(xs), "-", color=col, lw=1,
                    label=f"fit: beta={f.params['beta']:.3f}, c={f.params['c']:.3f}")
    ax.set(xscale="log", yscale="log", xlabel=xkey, ylabel=metric, title=f"{law} per {gkey}")
    _data_ticks(ax, [p[xkey] for p in pts])
    ax.legend(fontsize=7)
    return fig


def _plot_joint(plt, pts: list[dict], jf: FitResult, metric: str):
    """The figure of the joint L(n,k) fit: loss against n per k with the fitted lines, and fitted
    against observed."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for k, col in _colored(plt, [p["k"] for p in pts]):
        sub = sorted((p for p in pts if p["k"] == k), key=lambda p: p["n"])
        ax1.plot([p["n"] for p in sub], [p["loss"] for p in sub], "o", color=col, label=f"k={k}")
        xs = np.geomspace(min(p["n"] for p in pts), max(p["n"] for p in pts), 100)
        ax1.plot(xs, jf.predict(xs, np.full_like(xs, k)), "-", color=col, lw=1)
    ax1.set(xscale="log", yscale="log", xlabel="n", ylabel=metric, title="joint L(n,k) fit (lines)")
    _data_ticks(ax1, [p["n"] for p in pts])
    ax1.legend(fontsize=7)
    obs = np.array([p["loss"] for p in pts])
    pred = jf.predict([p["n"] for p in pts], [p["k"] for p in pts])
    ax2.plot(obs, pred, "o")
    lo, hi = min(obs.min(), pred.min()), max(obs.max(), pred.max())
    ax2.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax2.set(xscale="log", yscale="log", xlabel="observed", ylabel="fitted",
            title=f"L(n,k): rms log residual {jf.rms_log_residual:.3f}")
    return fig


def _plot_compute(plt, pts: list[dict], fits: list[FitResult]):
    """The figure of the training curves against compute, one colour per k, with the L(C) frontier
    points and fit of each k."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for k, col in _colored(plt, [p["k"] for p in pts]):
        for p in pts:
            if p["k"] == k and p["curve"]:
                ax.plot(p["curve"]["compute"], p["curve"]["loss"], "-", color=col, alpha=0.25, lw=0.8)
        f = next((f for f in fits if f.group.get("k") == k), None)
        if f is not None:
            ax.plot(f.x, f.y, "o", color=col, ms=3)
            xs = np.geomspace(min(f.x), max(f.x), 100)
            ax.plot(xs, f.predict(xs), "-", color=col, lw=1.5,
                    label=f"k={k}: beta={f.params['beta']:.3f}, c={f.params['c']:.3f}")
    ax.set(xscale="log", yscale="log", xlabel="training compute C = 6 d n tokens (FLOPs)",
           ylabel="train normalized MSE (smoothed)", title="L(C): curves and compute-efficient frontier")
    ax.legend(fontsize=7)
    return fig


def run_scaling(sweep_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, metric: str | None = None,
                plots: bool = True) -> dict:
    """Collect a sweep, fit every law, write scaling.json / scaling.md / PNGs into `out`
    (default SWEEP_DIR/scaling). Returns the result dict (fits as FitResult objects)."""
    root = Path(sweep_dir)
    out = Path(out) if out is not None else root / "scaling"
    data = collect_sweep(root, metric)
    if not data["points"]:
        reasons = "; ".join(f"{s['dir']}: {s['reason']}" for s in data["skipped"][:5])
        raise ValueError(f"no usable points in {str(root)!r} for metric {data['metric']!r} ({reasons})")
    result = {"sweep_dir": str(root), "metric": data["metric"], "points": data["points"],
              "skipped": data["skipped"], "fits": _fits(data["points"])}
    out.mkdir(parents=True, exist_ok=True)
    result["plots"] = _plots(result, out) if plots else []
    md = markdown(result)
    (out / "scaling.md").write_text(md)
    plain = dict(result)
    plain["fits"] = {key: ([asdict(f) for f in v] if isinstance(v, list) and key != "notes"
                           else (asdict(v) if isinstance(v, FitResult) else v))
                     for key, v in result["fits"].items()}
    tmp = out / "scaling.json.tmp"
    tmp.write_text(json.dumps(plain, indent=2))
    os.replace(tmp, out / "scaling.json")
    result["markdown"] = md
    result["out"] = str(out)
    return result


def main(argv: list[str] | None = None) -> int:
    """Console script `sae-scaling SWEEP_DIR [--out DIR] [--metric KEY] [--no-plots]`."""
    ap = argparse.ArgumentParser(prog="sae-scaling", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir", help="directory of a `sae-train -m` sweep (points with eval.json)")
    ap.add_argument("--out", default=None, help="output directory (default SWEEP_DIR/scaling)")
    ap.add_argument("--metric", default=None,
                    help="loss key: an eval.json key (default fvu_normalized_inputs, else normalized_mse) or "
                         "train/<name> from training_state.json")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = ap.parse_args(argv)
    try:
        res = run_scaling(args.sweep_dir, args.out, metric=args.metric, plots=not args.no_plots)
    except (FileNotFoundError, ValueError) as e:
        print(f"sae-scaling: {e}", file=sys.stderr)
        return 2
    print(res["markdown"])
    print(f"wrote {res['out']}/scaling.json, scaling.md" + (", " + ", ".join(Path(p).name for p in res["plots"])
                                                             if res["plots"] else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
