"""`python -m sae_dist.bench_harvest` on the tiny LM at a toy size: one JSON line whose ratio is its two
medians' ratio; the deepest hook is the one the forward reaches last; a bad hook name is one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sae_dist.bench_harvest import deepest_hook

ROOT = Path(__file__).resolve().parents[3]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "sae_dist.bench_harvest", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_deepest_hook_is_the_last_one_the_forward_reaches(lm):
    model, _ = lm
    assert deepest_hook(model, ["blocks.1.hook_resid_pre", "blocks.0.hook_resid_post"]) == "blocks.1.hook_resid_pre"
    assert deepest_hook(model, ["blocks.1.hook_mlp_out", "blocks.1.hook_attn_out"]) == "blocks.1.hook_mlp_out"
    assert deepest_hook(model, ["blocks.2.hook_resid_post", "blocks.2.hook_mlp_out"]) == "blocks.2.hook_resid_post"


@pytest.mark.slow
def test_bench_harvest_prints_one_record(tiny_lm_dir):
    proc = _run("--tokens", "252", "--repeats", "1", "--model", tiny_lm_dir, "--hooks",
                "blocks.0.hook_resid_post,blocks.1.hook_mlp_out")
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = proc.stdout.strip().splitlines()
    rec = json.loads(line)
    assert rec["deepest"] == "blocks.1.hook_mlp_out" and rec["tokens"] == 252 and rec["model"] == tiny_lm_dir
    assert rec["hooks"] == ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    assert rec["single_s"] > 0 and rec["multi_s"] > 0
    assert math.isclose(rec["multi_over_single"], rec["multi_s"] / rec["single_s"], rel_tol=1e-3)

def test_bench_harvest_bad_hook_is_one_line(tiny_lm_dir, capsys):
    """A bad hook name ends the program with SystemExit and a one-line message naming it (the interpreter
    prints that message, no traceback), before any output; main() runs in this process."""
    from sae_dist.bench_harvest import main

    with pytest.raises(SystemExit) as e:
        main(["--tokens", "252", "--model", tiny_lm_dir, "--hooks", "blocks.99.hook_mlp_out"])
    msg = str(e.value.code)
    assert e.value.code not in (0, None) and "blocks.99.hook_mlp_out" in msg, msg
    assert capsys.readouterr().out == ""
