"""The dp x tp process mesh from the torchrun / slurm environment (docs/parallel.md).

`init_parallel(tp, device)` reads the launcher's environment, initialises torch.distributed (NCCL on
CUDA, gloo on CPU) with a collective timeout, and builds a 2-D `DeviceMesh` with dims ("dp", "tp"):
world = dp * tp; the tp ranks of one dp group are consecutive global ranks (so a tp group stays inside
a node when tp <= GPUs per node). A plain launch (no WORLD_SIZE, or WORLD_SIZE=1) with tp=1 needs no
process group at all: the context is single-process and every collective is skipped.

Environment read (first found wins):
  torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
  slurm (srun without torchrun): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR / MASTER_PORT
    must then be exported by the batch script (launch/slurm.sbatch uses torchrun, which sets them).
  SAE_DIST_TIMEOUT_S: collective timeout in seconds (default 120 on CPU/gloo, 600 on CUDA/NCCL). A rank
    that dies makes its peers' next collective fail within this time instead of hanging.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["ParallelContext", "init_parallel", "destroy_parallel", "launcher_env", "shard_range"]


def shard_range(n: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """Latent range [start, end) of tp rank `tp_rank` when n latents are split evenly over tp ranks.

    Raises ValueError when n is not divisible by tp (naming both and the nearest valid n).
    """
    if tp < 1 or not 0 <= tp_rank < tp:
        raise ValueError(f"tp_rank={tp_rank} must be in [0, tp={tp})")
    if n % tp:
        raise ValueError(
            f"sae.d_sae={n} is not divisible by parallel.tp={tp}; use d_sae="
            f"{(n // tp + 1) * tp} or a tp that divides {n}"
        )
    per = n // tp
    return tp_rank * per, (tp_rank + 1) * per


@dataclass
class ParallelContext:
    """Where this process sits in the dp x tp mesh.

    world_size = dp * tp; rank = dp_rank * tp + tp_rank. `mesh` is the DeviceMesh (None in a
    single-process run); `dp_group` / `tp_group` its process groups (None when that dim is 1 or there
    is no mesh, so collectives over it are no-ops).

    A job split into `grid_groups` groups of consecutive ranks (`init_parallel(groups=G)`, a shared sweep's
    points placed on the groups) gives each process the context of its group: world_size, rank and the
    mesh are the group's, `grid_index` says which group, `group_root` is the global rank of the group's
    rank 0 and `world_group` its process group (None: the whole job, the default group).
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    dp: int = 1
    tp: int = 1
    dp_rank: int = 0
    tp_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: object | None = None
    grid_index: int = 0
    grid_groups: int = 1
    group_root: int = 0
    world_group: object | None = None

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        """Global rank 0: writes logs, exports, wandb."""
        return self.rank == 0

    def group(self, dim: str):
        """Process group of mesh dim "dp" or "tp", or None when single-process or that dim is 1."""
        if self.mesh is None or getattr(self, dim) == 1:
            return None
        return self.mesh.get_group(dim)

    @property
    def dp_group(self):
        return self.group("dp")

    @property
    def tp_group(self):
        return self.group("tp")

    def latent_range(self, d_sae: int) -> tuple[int, int]:
        return shard_range(d_sae, self.tp, self.tp_rank)

    def barrier(self) -> None:
        """Wait for every rank of this context (its group's, or the job's)."""
        if self.mesh is not None:
            dist.barrier(group=self.world_group)


def launcher_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's or slurm's environment; (0, 1, 0) otherwise."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and "MASTER_ADDR" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def _timeout_s(device: torch.device) -> float:
    raw = os.environ.get("SAE_DIST_TIMEOUT_S")
    if raw is None:
        return 600.0 if device.type == "cuda" else 120.0
    try:
        val = float(raw)
    except ValueError:
        raise ValueError(f"SAE_DIST_TIMEOUT_S={raw!r} is not a number of seconds") from None
    if not val > 0:
        raise ValueError(f"SAE_DIST_TIMEOUT_S={raw!r} must be > 0 seconds")
    return val


def local_cuda_device(local_rank: int) -> torch.device:
    """The GPU of the process with this node-local rank: cuda:local_rank when the process sees every GPU of the
    node, cuda:(local_rank mod visible GPUs) when slurm binds fewer to each task (`srun --gpus-per-task=1`
    or `--gpu-bind`: each task sees one GPU, cuda:0, whatever its SLURM_LOCALID)."""
    return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))


def init_parallel(tp: int = 1, device: str | torch.device = "cpu", groups: int = 1) -> ParallelContext:
    """Build the dp x tp context of this process (module docstring: environment, timeouts).

    tp: tensor-parallel degree (latent shards); dp = world_size / (groups * tp). device: "cpu" or "cuda[:i]"
    (under a launcher, CUDA uses cuda:LOCAL_RANK). groups: split the job into this many groups of
    consecutive ranks, each its own dp x tp mesh (`ParallelContext`); a group of one rank gets a
    single-process context. Initialises the default process group if needed (NCCL for CUDA, gloo for CPU)
    and a DeviceMesh ("dp", "tp"), or ("grid", "dp", "tp") sliced to this rank's group.
    Raises ValueError when world_size is not divisible by groups * tp, or tp > 1 in a plain single process.
    """
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"parallel.tp={tp!r} must be an int >= 1")
    device = torch.device(device)
    rank, world, local_rank = launcher_env()
    if world == 1 and not (dist.is_available() and dist.is_initialized()):
        if tp != 1:
            raise ValueError(
                f"parallel.tp={tp} needs {tp} processes (one per latent shard) but this is a single "
                f"process: launch with `torchrun --nproc-per-node {tp} ...` (launch/torchrun.sh {tp} ...)"
            )
        if device.type == "cuda" and device.index is not None:  # as under a launcher: "cuda" means this GPU
            torch.cuda.set_device(device)
        return ParallelContext(device=device)
    if world % (groups * tp):
        raise ValueError(
            f"parallel.tp={tp} x {groups} group(s) does not divide the world size {world}: use a tp in "
            f"{[t for t in range(1, world + 1) if world % (t * groups) == 0]}"
        )
    if device.type == "cuda":
        device = local_cuda_device(local_rank) if device.index is None else device
        torch.cuda.set_device(device)
    size = world // groups
    where = dict(grid_index=rank // size, grid_groups=groups, group_root=rank - rank % size)
    if size == 1:  # one rank per group: nothing to communicate
        return ParallelContext(device=device, **where)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world,
            timeout=_dt.timedelta(seconds=_timeout_s(device)),
        )
    from torch.distributed.device_mesh import init_device_mesh

    dp = size // tp
    if groups == 1:
        mesh, world_group = init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp")), None
    else:
        mesh = init_device_mesh(device.type, (groups, dp, tp), mesh_dim_names=("grid", "dp", "tp"))["dp", "tp"]
        blocks = [dist.new_group(list(range(g * size, (g + 1) * size))) for g in range(groups)]  # every rank
        world_group = blocks[rank // size]
    r = rank % size
    return ParallelContext(world_size=size, rank=r, local_rank=local_rank, dp=dp, tp=tp, dp_rank=r // tp,
                           tp_rank=r % tp, device=device, mesh=mesh, world_group=world_group, **where)


def destroy_parallel(ctx: ParallelContext) -> None:
    """Tear down the process group created by `init_parallel` (no-op single-process)."""
    if ctx.mesh is not None and dist.is_initialized():
        dist.destroy_process_group()
