"""`Launch.run` launches on the device of its CUDA tensors: Triton launches on the current CUDA device,
which in a single process on cuda:1 is still cuda:0. CUDA tensors are emulated by FakeTensorMode (a
device and a shape, no data), the kernel by an object that records the device guard active at launch."""

from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from sae_dist.kernels._common import Launch


class _Kernel:
    """Stands in for a `triton.jit` function: `kernel[grid](*args, **kw)` records (grid, guard stack)."""

    def __init__(self, guards):
        self.guards, self.launches = guards, []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launches.append((grid, list(self.guards)))


def test_launch_runs_under_the_device_guard_of_its_cuda_tensors(monkeypatch):
    guards: list[torch.device] = []

    @contextlib.contextmanager
    def device(d):
        guards.append(torch.device(d))
        yield
        guards.pop()

    monkeypatch.setattr(torch.cuda, "device", device)
    kernel = _Kernel(guards)
    with FakeTensorMode():
        x = torch.empty(8, 4, device="cuda:1")
    Launch("k", kernel, (2, 1), (x, 8, 4), {"BLOCK": 16}).run()
    Launch("k", kernel, (3,), (torch.zeros(8), 8), {"BLOCK": 16}).run()  # CPU (interpreter): no guard
    assert kernel.launches == [((2, 1), [torch.device("cuda", 1)]), ((3,), [])]
    assert guards == []
