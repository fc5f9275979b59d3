"""The project as a wheel: `pip wheel` builds one that carries the Hydra configs (conf/ as sae_dist.conf) and
the Triton kernels (kernels/ as sae_dist.kernels), and installed into a fresh virtual environment (no
source tree on its path) it gives working console scripts.

The fresh venv sees the dependencies of this one through a .pth line naming this venv's site-packages
(a directory named that way is not a site directory, so the editable install's finder there is not
loaded): what it imports as sae_dist is the wheel's copy, which the test checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          **kw)


@pytest.mark.slow
def test_a_wheel_installs_into_a_fresh_venv_with_configs_kernels_and_console_scripts(tmp_path):
    # built from a copy: a setuptools build writes build/ and sae_dist.egg-info into the source tree, and an
    # egg-info in the repository root would shadow the installed metadata (entry points) of this checkout
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv*", ".git", "runs", "outputs", "multirun", "wandb", "build", "dist", "*.egg-info", "__pycache__"))
    p = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
              tmp_path / "dist", src], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("sae_dist-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"sae_dist/conf/{f.relative_to(ROOT / 'conf')}" for f in (ROOT / "conf").rglob("*.yaml")}
    want |= {f"sae_dist/kernels/{f.name}" for f in (ROOT / "kernels").glob("*.py")}
    want.add("sae_dist/kernels/encoder_tuned.json")  # the measured launch table
    assert len(want) >= 25 and want <= names, sorted(want - names)

    env_dir = tmp_path / "fresh"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).stdout.strip()
    Path(site, "_deps_of_the_test_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    p = _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel],
             cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    code = "import sae_dist, sae_dist.kernels.encoder_topk as k; print(sae_dist.__file__, k.__file__)"
    where = _run([py, "-c", code], tmp_path)
    assert where.stdout.split() == [str(Path(site, "sae_dist", "__init__.py")),
                                    str(Path(site, "sae_dist", "kernels", "encoder_topk.py"))], where.stderr
    help_ = _run([env_dir / "bin" / "sae-train", "--help"], tmp_path)
    assert help_.returncode == 0 and "sae: batchtopk, jumprelu" in help_.stdout, help_.stderr[-2000:]
    plan = _run([env_dir / "bin" / "sae-plan", "sae.d_in=64", "sae.d_sae=1024", "output=json"], tmp_path)
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert json.loads(plan.stdout)["fits"] is True
