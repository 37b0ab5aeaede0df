"""Process group and device mesh: the parallel degrees of a run and their groups."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class ParallelState:
    """The mesh of one run. Dimension names: ``dp_replicate``, ``dp_shard``, ``sp``."""

    mesh: DeviceMesh
    device: torch.device

    @property
    def world_size(self) -> int:
        return self.mesh.size()

    @property
    def rank(self) -> int:
        return self.mesh.get_rank()

    @property
    def dp_mesh(self) -> DeviceMesh:
        """The data-parallel mesh FSDP shards over: ``dp_replicate`` x ``dp_shard``."""
        return self.mesh["dp_replicate", "dp_shard"]

    @property
    def dp_size(self) -> int:
        return self.mesh["dp_replicate"].size() * self.mesh["dp_shard"].size()

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp_replicate"].get_local_rank() * self.mesh[
            "dp_shard"
        ].size() + self.mesh["dp_shard"].get_local_rank()


def _device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _ensure_process_group(device: torch.device) -> None:
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ:  # started by torchrun
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        return
    # A single process needs no launcher: a one-rank group over an in-memory store.
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def init_parallel(dp_replicate: int = 1, dp_shard: int = -1, sp: int = 1) -> ParallelState:
    """Start (or join) the process group and build the mesh.

    ``dp_shard=-1`` takes whatever the world size leaves after the other degrees.
    Raises ``ValueError`` when the degrees do not multiply to the world size.
    """
    device = _device_for_rank()
    _ensure_process_group(device)
    world = dist.get_world_size()
    if dp_shard == -1:
        if world % (dp_replicate * sp):
            raise ValueError(
                f"world size {world} is not divisible by dp_replicate={dp_replicate} x sp={sp}"
            )
        dp_shard = world // (dp_replicate * sp)
    if dp_replicate * dp_shard * sp != world:
        raise ValueError(
            f"parallel degrees dp_replicate={dp_replicate} x dp_shard={dp_shard} x sp={sp} "
            f"= {dp_replicate * dp_shard * sp}, but the world size is {world}"
        )
    mesh = init_device_mesh(
        device.type,
        (dp_replicate, dp_shard, sp),
        mesh_dim_names=("dp_replicate", "dp_shard", "sp"),
    )
    return ParallelState(mesh=mesh, device=device)


def destroy_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
