"""What the multi-process tests (tests/integration/parallel/, tests/integration/train/) and the in-process
tests of the latent sharding (tests/unit/parallel/) share: the TopK SAE's parameter names, a free TCP
port for a gloo rendezvous, the shard of a full SAE tensor that a tensor-parallel rank holds, and a
prefix for assert_close's mismatch report."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

#: the TopK SAE's parameters, which a tensor-parallel rank holds shards of (`tp_shard`)
NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tp_shard(t: torch.Tensor, name: str, lo: int, hi: int) -> torch.Tensor:
    """Latents lo:hi of the full SAE tensor `name` (W_enc's columns, b_enc's entries, W_dec's rows;
    b_dec is replicated)."""
    return {"W_enc": lambda: t[:, lo:hi], "b_enc": lambda: t[lo:hi], "W_dec": lambda: t[lo:hi],
            "b_dec": lambda: t}[name]()


def prefixed(prefix: str, report: str) -> str:
    """assert_close `msg` callable (bound with partial): `prefix` before torch's mismatch report."""
    return f"{prefix}: {report}"


def rank_worker(rank, world, port, argv, log_files):
    """One rank of `torchrun --standalone --nproc-per-node=world sae-train *argv` (one thread, a 60 s
    collective timeout), or of a plain `sae-train *argv` when world == 1: torchrun's environment, then the
    console script's entry point; its stdout and stderr go to `log_files[rank]`."""
    env = {"OMP_NUM_THREADS": "1", "SAE_DIST_TIMEOUT_S": "60"}
    if world > 1:
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(env)
    torch.set_num_threads(1)
    fd = os.open(log_files[rank], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.argv = [str(Path(sys.executable).parent / "sae-train"), *argv]
    from sae_dist.cli import train_main

    try:
        train_main()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def run_train_ranks(argv: list[str], run_dir, nproc: int = 1, fail: bool = False, worker=rank_worker) -> str:
    """`sae-train *argv` on `nproc` ranks (gloo) forked from the forkserver of tests/conftest.py (torch,
    DeepSpeed and sae_dist imported once) instead of started by torchrun, whose agent and per-rank imports
    cost ~2 + 4 s a launch (the test needs `@pytest.mark.usefixtures("worker_forkserver")`). Asserts that
    it succeeds (fail=True: that it fails) and returns the ranks' output (stdout and stderr), logged to
    `<run_dir>.rank<r>.log`. `worker`: a module-level function with `rank_worker`'s arguments that ends in
    calling `rank_worker` (e.g. after patching something in the rank's process)."""
    logs = [Path(f"{run_dir}.rank{r}.log") for r in range(nproc)]
    try:
        mp.start_processes(worker, args=(nproc, free_port(), argv, [str(f) for f in logs]), nprocs=nproc,
                           join=True, start_method="forkserver")
        error = None
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:
        error = e
    out = "".join(f.read_text() for f in logs if f.exists())
    if fail:
        assert error is not None, f"sae-train on {nproc} ranks succeeded:\n{out[-3000:]}"
    elif error is not None:
        raise AssertionError(f"sae-train on {nproc} ranks failed: {error}\n{out[-3000:]}")
    return out
