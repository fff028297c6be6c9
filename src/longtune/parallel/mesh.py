"""Who is who: the one object that owns the data-parallel and sequence-parallel degrees, the DeviceMesh and the
process groups. Everything else receives it explicitly; nothing else computes ranks.

Ranks are laid out dp-major: the `sp` consecutive ranks that share one sequence sit on the same node whenever
sp divides the GPUs per node, so the SP collectives stay on the fast links.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from longtune.errors import ConfigError


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def read_launch_env() -> LaunchEnv:
    """Ranks from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or, when started by `srun` directly, from SLURM_*."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise ConfigError(
                "SLURM launch: export MASTER_ADDR (the first node of $SLURM_JOB_NODELIST) and MASTER_PORT in the "
                "sbatch script (see README, Multi-node)"
            )
        os.environ.setdefault("RANK", env["SLURM_PROCID"])
        os.environ.setdefault("WORLD_SIZE", env["SLURM_NTASKS"])
        os.environ.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return LaunchEnv(0, 1, 0)


def check_degrees(world_size: int, sp: int) -> int:
    """dp for this world size, or a one-line error (called before any weight loads)."""
    if sp < 1:
        raise ConfigError(f"key 'sequence_parallel_size' must be >= 1, got {sp}")
    if world_size % sp:
        raise ConfigError(
            f"key 'sequence_parallel_size': {sp} does not divide the world size {world_size} "
            f"(launch a multiple of {sp} processes, e.g. --nproc {sp})"
        )
    return world_size // sp


@dataclass
class ParallelDims:
    """dp x sp over the world. Single-process runs have dp = sp = 1 and no groups."""

    dp: int
    sp: int
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: object | None = None

    @property
    def world_size(self) -> int:
        return self.dp * self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sp_group(self):
        return self.mesh["sp"].get_group() if self.mesh is not None and self.sp > 1 else None  # type: ignore[index]

    @property
    def dp_group(self):
        return self.mesh["dp"].get_group() if self.mesh is not None and self.dp > 1 else None  # type: ignore[index]

    def sp_global_ranks(self) -> list[int]:
        start = self.dp_rank * self.sp
        return list(range(start, start + self.sp))

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over every rank (a no-op on one process)."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_parallel(sp: int, timeout_s: int = 1800) -> ParallelDims:
    """Start the process group (if launched with several processes) and build the dp x sp mesh."""
    launch = read_launch_env()
    dp = check_degrees(launch.world_size, sp)
    if torch.cuda.is_available():
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not launch.distributed:
        return ParallelDims(dp=1, sp=1, rank=0, device=device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dp, sp), mesh_dim_names=("dp", "sp"))
    return ParallelDims(dp=dp, sp=sp, rank=launch.rank, device=device, mesh=mesh)


def shutdown_parallel(dims: ParallelDims) -> None:
    if dims.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
