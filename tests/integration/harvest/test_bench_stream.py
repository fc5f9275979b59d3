"""`python -m sae_dist.bench_stream` on the tiny LM at a toy size: one JSON line whose ratios are the ratios
of its wall times; bad sizes are one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "sae_dist.bench_stream", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_bench_stream_prints_one_record(tiny_lm_dir):
    proc = _run("--tokens", "1260", "--d-sae", "64", "--k", "2", "--batch", "252", "--buffer", "504",
                "--points", "2", "--threads", "1", "--model", tiny_lm_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = proc.stdout.strip().splitlines()
    rec = json.loads(line)
    assert rec["model"] == tiny_lm_dir and rec["tokens"] == 1260 and rec["grid_k"] == [2, 4]
    assert all(rec[k] > 0 for k in ("harvest_s", "train_s", "stream_s", "grid_s", "separate_s"))
    assert math.isclose(rec["stream_over_sum"], rec["stream_s"] / (rec["harvest_s"] + rec["train_s"]), rel_tol=1e-2)
    assert 0 < rec["heldout_fvu_store"] < 2 and 0 < rec["heldout_fvu_stream"] < 2
    assert math.isclose(rec["grid_over_separate"], rec["grid_s"] / rec["separate_s"], rel_tol=1e-2)
    bad = _run("--tokens", "100", "--batch", "200")
    assert bad.returncode != 0 and "--batch <= --tokens" in bad.stderr and "Traceback" not in bad.stderr
