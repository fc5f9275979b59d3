"""The Triton version gate (`sae_dist.kernels._common.triton_problem`, MIN_TRITON): a Triton older than the oldest
release the kernels run with (3.3; docs/benchmarks.md, "Triton releases") is reported by name with the fix;
backend="triton" then raises it, backend="auto" on CUDA takes the torch path with one warning, and the suite's
own Triton passes the gate."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from sae_dist.kernels import _common
from sae_dist.kernels.encoder_topk import encode_topk
from sae_dist.kernels.encoder_topk import triton_available as encoder_can_run
from sae_dist.kernels.sparse_decode import sparse_decode

triton = pytest.importorskip("triton")


@pytest.fixture
def triton_version(monkeypatch):
    """Set the installed Triton's reported version (the gate's cache and warning flag reset)."""

    def set_version(v: str) -> None:
        monkeypatch.setattr(triton, "__version__", v)
        monkeypatch.setattr(_common, "_TRITON_PROBLEM", None)
        monkeypatch.setattr(_common, "_WARNED_OLD_TRITON", False)

    yield set_version
    monkeypatch.setattr(_common, "_TRITON_PROBLEM", None)  # re-read the real version after the monkeypatch


def test_the_suites_triton_passes_the_gate():
    have = tuple(int(p) for p in triton.__version__.split(".")[:2])
    assert have >= _common.MIN_TRITON == (3, 3)
    assert _common.triton_problem() is None and _common.triton_available()


def test_an_old_triton_is_named_and_forced_triton_raises(triton_version):
    triton_version("3.2.0")
    problem = _common.triton_problem()
    assert problem.startswith("triton 3.2.0 is older than 3.3") and "pip install 'triton>=3.3'" in problem
    assert not _common.triton_available() and not encoder_can_run("cpu")
    g = torch.Generator().manual_seed(0)
    W, v, i = torch.randn(10, 8, generator=g), torch.rand(4, 3, generator=g), torch.randint(0, 10, (4, 3), generator=g)
    with pytest.raises(RuntimeError, match=r"backend='triton': triton 3\.2\.0 is older than 3\.3"):
        sparse_decode(v, i, W, backend="triton")
    x, W_enc = torch.randn(4, 8, generator=g), torch.randn(8, 16, generator=g)
    with pytest.raises(RuntimeError, match=r"triton 3\.2\.0 is older"):
        encode_topk(x, W_enc, torch.zeros(16), torch.zeros(8), 2, backend="triton")
    # the torch path still serves "auto" (CPU tensors here), equal to the dense sum
    dense = (torch.nn.functional.one_hot(i, 10).float() * v[..., None]).sum(1) @ W
    torch.testing.assert_close(sparse_decode(v, i, W), dense)
    triton_version("3.10.0")  # a two-digit minor release compares as a number
    assert _common.triton_problem() is None


def test_auto_on_cuda_with_an_old_triton_warns_once_and_runs_torch(triton_version):
    triton_version("3.1.0")
    on_cuda = SimpleNamespace(is_cuda=True)  # resolve_backend reads only .is_cuda
    with pytest.warns(RuntimeWarning, match=r"kernels are off on this CUDA device.*triton 3\.1\.0 is older"):
        assert _common.resolve_backend("auto", on_cuda) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _common.resolve_backend("auto", on_cuda) == "torch"  # once per process
    triton_version("3.3.0")
    assert _common.resolve_backend("auto", on_cuda) == "triton"


def test_the_bf16_encoder_takes_8_warps_where_4_would_spill(monkeypatch):
    # measured with the sm_90a report: at k = 32, 4 warps spill 616 / 48 bytes with Triton 3.3 / 3.4, none from 3.5
    import sae_dist.kernels.encoder_topk as et

    for release, warps_k32 in (((3, 3), 8), ((3, 4), 8), ((3, 5), 4), ((3, 9), 4)):
        monkeypatch.setattr(et, "triton_release", lambda r=release: r)
        assert et.encoder_launch_config(768, 32, None)["num_warps"] == warps_k32, release
        assert et.encoder_launch_config(4096, 64, None)["num_warps"] == 8, release
        assert et.encoder_launch_config(768, 32, "tf32")["num_warps"] == 8, release
