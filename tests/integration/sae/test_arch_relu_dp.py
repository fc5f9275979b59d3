"""`sae=relu`'s L0-target controller under data parallelism: two gloo ranks (torch.multiprocessing
workers from the `worker_forkserver`) with different local L0s keep bit-identical controller states, equal
to the controller driven by the global batch's L0. The rest of the ReLU tests: tests/unit/sae/test_arch_relu.py."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.sae import (
    l1_cfg,
    randomize_weights,
    reference_l1_controller,
)

from sae_dist.sae.registry import build_sae

_cfg = partial(l1_cfg, "relu")
_randomize = partial(randomize_weights, row_scale=True, b_enc_scale=0.3)


def _dp_controller_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One gloo rank: the same SAE on every rank, each rank's own rows of a global batch (the second
    half of the rows shifted along the encoder, so the ranks' local L0s differ), the controller's state
    after every step."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:
        from torch.distributed.device_mesh import init_device_mesh

        from sae_dist.parallel.mesh import ParallelContext
        from sae_dist.parallel.tp import parallelize_sae

        sae, data = _dp_case()
        mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "tp"))
        parallelize_sae(sae, ParallelContext(world_size=world, rank=rank, dp=world, dp_rank=rank, mesh=mesh))
        b = data.shape[1] // world
        states = []
        for t in range(data.shape[0]):
            sae.set_progress(t, data.shape[0])
            sae.training_step_losses(data[t, rank * b:(rank + 1) * b])
            states.append(sae.l1_controller.clone())
        torch.save(torch.stack(states), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _dp_case():
    g = torch.Generator().manual_seed(21)
    sae = build_sae(_cfg(target_l0=4.0, l1_coef=0.05, l1_warmup_frac=0.0, l0_gain=0.05))
    _randomize(sae, g)
    data = torch.randn(12, 128, 12, generator=g)
    u = sae.W_enc.detach().sum(1)
    data[:, 64:] += 3.0 * u / u.norm()  # raises most pre-activations of the second half's rows
    return sae, data


@pytest.mark.usefixtures("worker_forkserver")  # tests/conftest.py
def test_controller_state_is_identical_on_every_data_parallel_rank(tmp_path):
    """Two gloo ranks with different local L0s keep bit-identical controller states, equal to the
    controller driven by the GLOBAL batch's L0 (computed here in one process)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_dp_controller_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True,
                       start_method="forkserver")
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(r0, r1)
    sae, data = _dp_case()
    with torch.no_grad():
        active = F.relu((data - sae.b_dec) @ sae.W_enc + sae.b_enc) > 0  # [steps, 128, d_sae]
    per_row = active.sum(-1).double()
    global_l0 = per_row.mean(1).numpy()
    local_l0 = per_row[:, :64].mean(1).numpy(), per_row[:, 64:].mean(1).numpy()
    assert np.all(local_l0[1] > local_l0[0] + 2)  # the ranks see different L0s
    ref = reference_l1_controller(global_l0, 4.0, 0.05, 0.1 * 12, np.log(0.05))[1:]
    np.testing.assert_allclose(r0[:, 0].numpy(), ref, rtol=0, atol=1e-12)
