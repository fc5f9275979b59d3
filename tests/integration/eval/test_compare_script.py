"""launch/compare_architectures.sh (the architecture comparison of docs/architectures.md) run as a
script: its bash syntax, --help and the exit codes of bad arguments. `sae_dist.eval.compare` itself:
tests/unit/eval/test_compare.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_compare_script_help_and_syntax():
    script = REPO / "launch" / "compare_architectures.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "docs/architectures.md" in r.stdout and "Environment" in r.stdout
    r = subprocess.run([str(script), "only-one-arg"], capture_output=True, text=True)
    assert r.returncode == 2
    r = subprocess.run([str(script), "s", "o"], capture_output=True, text=True,
                       env={**os.environ, "FAMILIES": "gated", "SAE_TRAIN": sys.executable})
    assert r.returncode == 2 and "unknown family 'gated'" in r.stderr
