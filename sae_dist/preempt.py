"""Preemption as a normal event: SIGTERM asks a long job to stop at its next safe point.

Clusters end jobs with SIGTERM a grace period before SIGKILL (slurm preemption, `scancel`, the time
limit; `launch/slurm.sbatch` asks for a signal ahead of the limit and requeues). Inside `Preemption`,
SIGTERM only sets a flag; the trainer checks it after every step (then writes a checkpoint and stops),
the harvester after every shard. The command then exits with `PREEMPTED_EXIT_CODE` and a rerun of the
same command resumes (docs/cluster.md#preemption).
"""

from __future__ import annotations

import signal
import sys
import threading

import torch

__all__ = ["PREEMPTED_EXIT_CODE", "Preemption"]

#: Exit status of a command that stopped on SIGTERM after saving its state (EX_TEMPFAIL: "try again").
PREEMPTED_EXIT_CODE = 75


class Preemption:
    """Context manager: while active, SIGTERM sets `requested` instead of killing the process.

    Only the main thread can install a signal handler; elsewhere the context does nothing (SIGTERM
    keeps its default action). The previous handler is restored on exit.
    """

    def __init__(self, name: str):
        self.name = name
        self.requested = False
        self._previous = None

    def _on_sigterm(self, signum, frame) -> None:
        if not self.requested:
            print(f"{self.name}: SIGTERM received; stopping at the next safe point", file=sys.stderr)
        self.requested = True

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def agreed(self, device: torch.device | None = None, group=None) -> bool:
        """Whether any process of the job was asked to stop: under an initialised torch.distributed, a
        MAX all-reduce over `group` (None: the default group; a collective: every rank of it must call it at
        the same point, so all stop after the same step); else this process's flag."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        flag = torch.tensor([int(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())
