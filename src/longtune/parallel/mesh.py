"""Who is who: the one object that owns the data-, sequence- and tensor-parallel degrees, the DeviceMeshes and the
process groups (dp x sp x tp, FSDP's mesh, the hybrid SP sub-groups, the tp group). Everything else receives it
explicitly and asks it; nothing else computes ranks or creates groups.

Ranks are laid out dp-major, tp innermost: rank = (dp_rank * sp + sp_rank) * tp + tp_rank. The `tp` consecutive
ranks of a TP group (an all-reduce per layer) sit on one node, and the sp * tp ranks that share one sequence sit
on the same node whenever they fit on it, so the SP collectives stay on the fast links too.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
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


def check_degrees(world_size: int, sp: int, tp: int = 1) -> int:
    """dp for this world size, or a one-line error (called before any weight loads)."""
    if sp < 1:
        raise ConfigError(f"key 'sequence_parallel_size' must be >= 1, got {sp}")
    if tp < 1:
        raise ConfigError(f"key 'tensor_parallel_size' must be >= 1, got {tp}")
    if tp > 1 and world_size % (sp * tp):
        raise ConfigError(
            f"key 'tensor_parallel_size': {tp} x sequence_parallel_size {sp} does not divide the world size "
            f"{world_size} (the world is dp x sp x tp: launch a multiple of {sp * tp} processes, e.g. "
            f"--nproc {sp * tp})"
        )
    if world_size % sp:
        raise ConfigError(
            f"key 'sequence_parallel_size': {sp} does not divide the world size {world_size} "
            f"(launch a multiple of {sp} processes, e.g. --nproc {sp})"
        )
    return world_size // (sp * tp)


@dataclass
class ParallelDims:
    """dp x sp x tp over the world. Single-process runs have dp = sp = tp = 1 and no groups.

    `mesh` is 3-D ("dp", "sp", "tp"). The tp ranks of one group hold the same tokens and compute the same loss:
    every count or sum over the data (loss, metrics, reference tables, gradients without FSDP) runs over the
    dp x sp ranks of one tp slice (`data_group`), never over the world.
    """

    dp: int
    sp: int
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: object | None = None
    tp: int = 1
    _fsdp_mesh: object | None = field(default=None, repr=False, compare=False)
    _flat_data_mesh: object | None = field(default=None, repr=False, compare=False)
    _hybrid_groups: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def world_size(self) -> int:
        return self.dp * self.sp * self.tp

    @property
    def data_parallel_size(self) -> int:
        """Ranks that see different tokens: dp x sp (FSDP shards over them, gradients are summed over them)."""
        return self.dp * self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.sp * self.tp)

    @property
    def sp_rank(self) -> int:
        return (self.rank // self.tp) % self.sp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    def role(self) -> str:
        """This rank's coordinates, for the start-up line every rank prints."""
        return (f"rank {self.rank}/{self.world_size}: dp {self.dp_rank}/{self.dp} sp {self.sp_rank}/{self.sp} "
                f"tp {self.tp_rank}/{self.tp} on {self.device}")

    @property
    def tp_mesh(self):
        """The 1-D mesh of this rank's TP group (DTensor parameters live on it), or None without TP."""
        return self.mesh["tp"] if self.mesh is not None and self.tp > 1 else None  # type: ignore[index]

    @property
    def data_group(self):
        """The process group of the dp x sp ranks of this rank's tp slice (None: the world, when tp == 1)."""
        if self.tp == 1 or self.mesh is None:
            return None
        return self._data_mesh().get_group()

    def _data_mesh(self):
        # DeviceMesh's flatten is private in torch 2.13 (torchtitan uses it the same way); FSDP2 needs the dp x sp
        # mesh and the tp mesh to come from one root mesh to compose with TP's DTensors.
        if self._flat_data_mesh is None:
            self._flat_data_mesh = self.mesh["dp", "sp"]._flatten("dp_sp")  # type: ignore[index]
        return self._flat_data_mesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sp_group(self):
        return self.mesh["sp"].get_group() if self.mesh is not None and self.sp > 1 else None  # type: ignore[index]

    def sp_group_ranks(self, dp_rank: int, tp_rank: int = 0) -> list[int]:
        """The global ranks of the SP group of data-parallel replica `dp_rank` and TP coordinate `tp_rank`."""
        return [(dp_rank * self.sp + s) * self.tp + tp_rank for s in range(self.sp)]

    def fsdp_mesh(self):
        """The mesh FSDP2 shards over, built once: 1-D over every rank without TP (starting the one-rank process
        group that FSDP needs on a single process); with TP the flattened dp x sp dimension of the 3-D mesh, TP
        being the inner dimension of each parameter (torchtitan's 2-D pattern)."""
        if self._fsdp_mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            if self.tp > 1:
                self._fsdp_mesh = self._data_mesh()
            else:
                ensure_process_group(self)
                self._fsdp_mesh = init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("fsdp",))
        return self._fsdp_mesh

    def hybrid_groups(self, ulysses_size: int) -> tuple[object | None, object | None]:
        """(ulysses_group, ring_group) of this rank for hybrid SP, built once per Ulysses degree. Every rank
        creates every SP group's sub-groups, in the same order (`new_group` is collective over the world)."""
        if ulysses_size not in self._hybrid_groups:
            from longtune.parallel.attention import make_hybrid_groups

            mine: tuple[object | None, object | None] = (None, None)
            for dp_rank in range(self.dp):
                for tp_rank in range(self.tp):
                    groups = make_hybrid_groups(self.sp_group_ranks(dp_rank, tp_rank), ulysses_size)
                    if (dp_rank, tp_rank) == (self.dp_rank, self.tp_rank):
                        mine = groups
            self._hybrid_groups[ulysses_size] = mine
        return self._hybrid_groups[ulysses_size]

    def lockstep_batches(self, num_items: int, batch_size: int) -> list[list[int]]:
        """This rank's share of `num_items` striped over the dp ranks (dp_rank, dp_rank + dp, ...) in batches;
        every rank gets the same number of batches (trailing ones may be empty: run a blank row) so that all
        issue the same collectives."""
        mine = list(range(self.dp_rank, num_items, self.dp))
        rounds = math.ceil(math.ceil(num_items / self.dp) / batch_size)
        return [mine[r * batch_size : (r + 1) * batch_size] for r in range(rounds)]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over the ranks that hold different data: every rank without TP, the dp x sp ranks of
        this tp slice with it (tp ranks hold copies; summing them would count each token tp times). A no-op on
        one process."""
        if self.data_parallel_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.data_group)
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    @contextlib.contextmanager
    def main_rank_first(self) -> Iterator[None]:
        """The main rank runs the block first (say, tokenizes and fills the data cache), the others wait for it and
        then run the block themselves (reading what it wrote). Collective: every rank enters it."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()


@dataclass(frozen=True)
class ProcessGroupSpec:
    """What `init_process_group` is called with for a device type (a pure value, so it can be tested anywhere)."""

    backend: str
    device_id: torch.device | None = None


def process_group_spec(device: torch.device) -> ProcessGroupSpec:
    """NCCL for CUDA tensors and gloo for CPU tensors in one group on a GPU; gloo alone on a CPU-only host.

    CPU offload keeps parameters and gradients as CPU DTensors, so gradient clipping and `full_tensor()` reduce
    CPU tensors: an NCCL-only group cannot. `device_id` binds the NCCL communicator to this rank's GPU eagerly.
    """
    if device.type == "cuda":
        return ProcessGroupSpec(backend="cuda:nccl,cpu:gloo", device_id=device)
    return ProcessGroupSpec(backend="gloo")


def start_process_group(device: torch.device, rank: int, world_size: int, timeout_s: int,
                        store: dist.Store | None = None) -> None:
    """`init_process_group` with the backends of `process_group_spec` (env:// rendezvous unless `store`)."""
    spec = process_group_spec(device)
    kwargs = {"backend": spec.backend, "timeout": timedelta(seconds=timeout_s)}
    if spec.device_id is not None:
        kwargs["device_id"] = spec.device_id
    if store is not None:
        kwargs.update(store=store, rank=rank, world_size=world_size)
    dist.init_process_group(**kwargs)


def ensure_process_group(dims: ParallelDims, timeout_s: int = 1800) -> None:
    """FSDP2 needs a process group even on one process (offload_params on one GPU): start a one-rank group on an
    in-memory store, so no MASTER_ADDR/port is needed. A multi-process launch already has its group."""
    if dist.is_initialized():
        return
    if dims.world_size != 1:
        raise RuntimeError("ensure_process_group: a multi-process run must start its group in init_parallel")
    start_process_group(dims.device, rank=0, world_size=1, timeout_s=timeout_s, store=dist.HashStore())


def init_parallel(sp: int, timeout_s: int = 1800, tp: int = 1) -> ParallelDims:
    """Start the process group (if launched with several processes) and build the dp x sp x tp mesh."""
    launch = read_launch_env()
    dp = check_degrees(launch.world_size, sp, tp)
    if torch.cuda.is_available():
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not launch.distributed:
        return ParallelDims(dp=1, sp=1, rank=0, device=device)
    if not dist.is_initialized():
        start_process_group(device, launch.rank, launch.world_size, timeout_s)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dp, sp, tp), mesh_dim_names=("dp", "sp", "tp"))
    dims = ParallelDims(dp=dp, sp=sp, rank=launch.rank, device=device, mesh=mesh, tp=tp)
    if tp > 1:
        dims._data_mesh()  # its groups now, on every rank together, not at the first sum that needs them
    return dims


def shutdown_parallel(dims: ParallelDims) -> None:
    """Destroy the process group of the run: the multi-process one, or the one-rank group FSDP needed."""
    if dist.is_initialized():
        dist.destroy_process_group()
