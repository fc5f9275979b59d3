"""`init_parallel` in a plain single process (no launcher environment)."""

from __future__ import annotations

import pytest
import torch

from sae_dist.parallel.mesh import init_parallel

_LAUNCHER_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "MASTER_ADDR")


@pytest.fixture
def single_process(monkeypatch):
    for var in _LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)


def test_single_process_on_an_indexed_gpu_makes_it_current(single_process, monkeypatch):
    """device=cuda:1 in one process: that GPU becomes current, as a launcher's LOCAL_RANK does, so Triton
    launches and index-less "cuda" tensors land on it (not on cuda:0). An index-less "cuda" is left alone
    (torch.cuda.set_device rejects it)."""
    seen = []
    monkeypatch.setattr(torch.cuda, "set_device", seen.append)
    assert init_parallel(device="cuda:1").device == torch.device("cuda", 1)
    assert seen == [torch.device("cuda", 1)]
    assert init_parallel(device="cuda").device == torch.device("cuda")
    assert init_parallel(device="cpu").device == torch.device("cpu")
    assert seen == [torch.device("cuda", 1)]


def test_single_process_refuses_tensor_parallelism(single_process):
    with pytest.raises(ValueError, match="parallel.tp=2 needs 2 processes"):
        init_parallel(tp=2)


def test_local_rank_maps_to_a_visible_gpu(monkeypatch):
    """Under `srun` without torchrun the local rank is SLURM_LOCALID; with one GPU bound per task
    (`--gpus-per-task=1`) every task sees only cuda:0, so local rank 3 must not ask for cuda:3."""
    from sae_dist.parallel.mesh import local_cuda_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert [local_cuda_device(r).index for r in (0, 3, 7)] == [0, 3, 7]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert [local_cuda_device(r).index for r in (0, 3, 7)] == [0, 0, 0]
