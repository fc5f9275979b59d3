"""The sparse decode and AuxK kernels in a process where Triton cannot be imported (a subprocess with
`sys.modules['triton'] = None`): backend="auto" falls back to torch, backend="triton" raises naming Triton.
The decode kernel against its dense oracle: tests/unit/kernels/test_kernels_decode.py."""

from __future__ import annotations

import subprocess
import sys


def test_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from sae_dist.kernels.sparse_decode import sparse_decode\n"
        "from sae_dist.kernels.sparse_decode import auxk_loss\n"
        "W = torch.randn(6, 4); v = torch.rand(2, 2); i = torch.tensor([[0, 5], [1, 1]])\n"
        "x = sparse_decode(v, i, W, backend='auto')\n"
        "assert torch.allclose(x[1], v[1].sum() * W[1])\n"
        "try:\n"
        "    sparse_decode(v, i, W, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e)\n"
        "else:\n"
        "    raise SystemExit('forced triton without triton did not raise')\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
