"""The repository root never shadows an installed package: run from the root with the root first on
`sys.path` (a subprocess, as `python -m ...` and a notebook opened in the root do), the peers import and
a Triton kernel runs. The rest of the packaging tests: tests/unit/test_packaging.py.

A top-level folder with an `__init__.py` there wins over any installed distribution of the same import
name: the top-level `kernels/` folder once hid Hugging Face's `kernels` package (a transformers
dependency) and broke `import transformers.modeling_utils`. The kernels and the Hydra configs are
therefore plain folders (namespace portions, which lose to any installed regular package) that the
package reaches through the links `sae_dist/kernels` and `sae_dist/conf`."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


# Run from the repository root with the root as sys.path[0], as `python -m` and notebooks do.
_FROM_ROOT = textwrap.dedent(
    """
    import importlib.metadata as md, importlib.util, json, os, sys
    root = os.getcwd()
    assert sys.path[0] in ("", root), sys.path[:3]
    import transformers.modeling_utils
    import sparsify
    import sae_lens
    import torch
    from sae_dist.kernels.sparse_decode import sparse_decode
    g = torch.Generator().manual_seed(0)
    W = torch.randn(11, 8, generator=g)
    b = torch.randn(8, generator=g)
    v = torch.rand(3, 2, generator=g).requires_grad_()
    idx = torch.randint(0, 11, (3, 2), generator=g)
    x = sparse_decode(v, idx, W, b, backend="triton")  # the Triton kernel, in Triton's interpreter
    x.sum().backward()
    ref = (v.detach()[..., None] * W[idx]).sum(1) + b
    owners = {}
    for name in ("kernels", "conf", "docker", "launch", "docs", "tests"):
        spec = importlib.util.find_spec(name)
        owners[name] = None if spec is None else (spec.origin, list(spec.submodule_search_locations or []))
    print(json.dumps({
        "max_err": float((x - ref).abs().max()),
        "grad_err": float((v.grad - W[idx].sum(-1)).abs().max()),
        "transformers_kernels": importlib.util.find_spec("kernels") and importlib.util.find_spec("kernels").origin,
        "specs": owners,
    }))
    """
)


@pytest.mark.slow
def test_root_first_on_sys_path_imports_peers_and_runs_a_kernel():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ""}
    p = subprocess.run([sys.executable, "-c", _FROM_ROOT], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    assert rec["max_err"] < 1e-5 and rec["grad_err"] < 1e-5
    for name, spec in rec["specs"].items():
        if spec is None:
            continue
        origin, locations = spec
        # Either an installed distribution (outside the repository) or a bare namespace portion, never a
        # regular package or module of the repository.
        assert origin not in (str(ROOT / name / "__init__.py"), str(ROOT / f"{name}.py")), (name, origin)
        if origin is None and name in md.packages_distributions():
            pytest.fail(f"{name!r} is installed but resolves to the repository's folder: {locations}")
    if "kernels" in md.packages_distributions():
        assert rec["transformers_kernels"] != str(ROOT / "kernels" / "__init__.py")
        assert rec["transformers_kernels"].endswith(os.path.join("site-packages", "kernels", "__init__.py"))
