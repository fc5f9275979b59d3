"""Hydra sweeps (`sae-train -m ...`): one status file per point and a report over the whole sweep.

A scaling sweep is many independent trainings; one bad point (out of memory, a diverged run, a typo in
one value) must not lose the others. Under `-m` each point's exception is caught by `run_point`, which
writes `<point dir>/job_status.json` and lets the launcher go on to the next point; the
`SweepReport` Hydra callback (registered in conf/config.yaml) then collects every point's status into
`<sweep dir>/sweep_summary.json`, prints a table of the failed points with their errors, and makes the
sweep command exit with status 1 if any point failed (0 when all completed).

Status file (`job_status.json`, one per point dir, written atomically):
    {"status": "completed" | "failed", "job_num": int, "overrides": [str], "point_dir": str,
     "wall_s": float, "started": iso time, "error": str | null, "error_type": str | null,
     "traceback": str | null}
A point with no status file (killed, still queued, timed out on slurm) is reported as "missing".

Every point of a sweep logs to one wandb group: `wandb.group` when set, else the sweep directory's
name (`sweep_wandb_group`).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

STATUS_FILE = "job_status.json"
SUMMARY_FILE = "sweep_summary.json"

__all__ = ["STATUS_FILE", "SUMMARY_FILE", "SweepReport", "in_multirun", "run_point", "sweep_wandb_group",
           "collect_status"]


def in_multirun() -> bool:
    """True inside a Hydra multirun job (`-m`), False in a plain run or outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False
    return HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_wandb_group(cfg: DictConfig) -> str | None:
    """The wandb group of this run: `cfg.wandb.group` when set; inside a multirun, the sweep directory's
    name (so all points of one sweep share a group); else None."""
    group = cfg.wandb.get("group")
    if group:
        return str(group)
    if in_multirun():
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().sweep.dir).resolve().name
    return None


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def run_point(fn: Callable[[], Any], out_dir: Path, *, is_main: bool = True) -> Any:
    """Run one point of a sweep: `fn()`; inside a multirun, write `out_dir/job_status.json` and turn an
    exception into a recorded failure (returns None) so the launcher goes on with the other points.

    Outside a multirun `fn`'s exceptions propagate unchanged. `is_main`: only this process writes the
    status file (global rank 0 under torchrun). KeyboardInterrupt/SystemExit always propagate.
    """
    if not in_multirun():
        return fn()
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    record: dict[str, Any] = {
        "status": "running",
        "job_num": int(hc.job.num),
        "overrides": list(hc.overrides.task),
        "point_dir": str(out_dir),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": None, "error": None, "error_type": None, "traceback": None,
    }
    if is_main:
        _write_json(out_dir / STATUS_FILE, record)
    t0 = time.perf_counter()
    try:
        result = fn()
        record["status"] = "completed"
    except Exception as e:  # noqa: BLE001 - recorded and reported by SweepReport
        result = None
        record.update(status="failed", error=str(e) or repr(e), error_type=type(e).__name__,
                      traceback=traceback.format_exc())
        from sae_dist.errors import debug_errors, is_user_error

        tb = "" if is_user_error(e) and not debug_errors() else "\n" + record["traceback"]
        print(f"sweep point {record['job_num']} ({' '.join(record['overrides'])}) FAILED: "
              f"{record['error_type']}: {record['error']}{tb}", file=sys.stderr, flush=True)
    record["wall_s"] = round(time.perf_counter() - t0, 3)
    if is_main:
        _write_json(out_dir / STATUS_FILE, record)
    return result


def collect_status(sweep_dir: str | os.PathLike) -> list[dict]:
    """Every point's `job_status.json` under `sweep_dir` (any depth), sorted by job number."""
    rows = []
    for p in Path(sweep_dir).rglob(STATUS_FILE):
        try:
            rows.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            rows.append({"status": "unreadable", "point_dir": str(p.parent), "error": str(e), "job_num": -1})
    return sorted(rows, key=lambda r: (r.get("job_num", -1), r.get("point_dir", "")))


class SweepReport(Callback):
    """Hydra callback: at the end of a multirun, write `<sweep dir>/sweep_summary.json` with every
    point's status, print the failed and missing points, and exit with status 1 if any point failed.

    `expected` (the number of points launched) comes from the sweep's overrides: a point whose process
    never wrote a status file (killed, out of host memory) is listed as missing.
    """

    def __init__(self, exit_on_failure: bool = True) -> None:
        self.exit_on_failure = bool(exit_on_failure)
        self._t0 = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._t0 = time.perf_counter()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect_status(sweep_dir)
        expected = _expected_points(config)
        seen = {r.get("job_num") for r in rows}
        missing = [n for n in range(expected)] if expected else []
        missing = [n for n in missing if n not in seen]
        # the same sweep dir can hold points of an earlier, larger sweep: count only this sweep's
        this = [r for r in rows if not expected or 0 <= r.get("job_num", -1) < expected]
        failed = [r for r in this if r.get("status") != "completed"]
        summary = {
            "sweep_dir": str(sweep_dir),
            "points": expected or len(this),
            "completed": sum(r.get("status") == "completed" for r in this),
            "failed": [{k: r.get(k) for k in ("job_num", "overrides", "point_dir", "status", "error_type", "error")}
                       for r in failed],
            "missing_job_nums": missing,
            "wall_s": None if self._t0 is None else round(time.perf_counter() - self._t0, 1),
            "points_status": [{k: r.get(k) for k in ("job_num", "overrides", "point_dir", "status", "wall_s")}
                              for r in this],
        }
        sweep_dir.mkdir(parents=True, exist_ok=True)
        _write_json(sweep_dir / SUMMARY_FILE, summary)
        n_bad = len(failed) + len(missing)
        print(f"sweep {sweep_dir}: {summary['completed']}/{summary['points']} points completed"
              + (f", {len(failed)} failed, {len(missing)} missing" if n_bad else "")
              + f" (details: {sweep_dir / SUMMARY_FILE})", file=sys.stderr, flush=True)
        for r in failed:
            print(f"  FAILED point {r.get('job_num')} [{' '.join(r.get('overrides') or [])}] "
                  f"in {r.get('point_dir')}: {r.get('error_type')}: {r.get('error')}", file=sys.stderr)
        for n in missing:
            print(f"  MISSING point {n}: no {STATUS_FILE} written (killed or never started)", file=sys.stderr)
        if n_bad and self.exit_on_failure:
            raise SystemExit(1)


def _expected_points(config: DictConfig) -> int | None:
    """Number of points of this multirun, from the sweep's task overrides (basic sweeper grammar)."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        n = 1
        for o in overrides:
            if o.is_sweep_override():
                n *= len(list(o.sweep_string_iterator()))
        return n
    except Exception:  # noqa: BLE001 - a custom sweeper: fall back to the status files found
        return None
