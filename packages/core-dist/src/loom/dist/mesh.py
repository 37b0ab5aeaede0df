"""Process group and device meshes: the parallel degrees of a run and their groups.

Ranks are laid out row-major over ``dp_replicate x dp_shard x sp``: the ``sp`` ranks of
one sequence are neighbours (rank ``r`` and ``r + 1``), so the Ulysses all-to-all stays
inside a node whenever ``sp`` divides the GPUs per node.

Three meshes describe the same ranks, one per job, each built with ``init_device_mesh``
(torch deprecates slicing flattened dimensions out of a root mesh, so each view that
FSDP or DTensor needs is its own root):

- ``mesh``: ``(dp_replicate, dp_shard, sp)``: data split and the SP group.
- ``fsdp_mesh``: ``(dp_replicate, dp_shard * sp)``: dense parameters are sharded over
  every rank of a replica, the SP ranks included, because SP ranks see different tokens
  and their gradients must be reduced like data-parallel ones.
- ``expert_mesh``: ``(dp_replicate, ep_shard, ep)``: ``ep`` folded out of
  ``dp_shard * sp`` (the innermost ``ep`` ranks of a replica); experts are ``Shard(0)``
  over ``ep`` and FSDP-sharded over ``ep_shard``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DENSE_DIMS = ("dp_replicate", "dp_shard", "sp")
FSDP_DIMS = ("dp_replicate", "dp_shard_sp")
EXPERT_DIMS = ("dp_replicate", "ep_shard", "ep")


@dataclass(frozen=True)
class ParallelState:
    """The meshes of one run (see the module docstring for their layout)."""

    mesh: DeviceMesh
    fsdp_root: DeviceMesh
    expert_mesh: DeviceMesh
    device: torch.device

    @property
    def world_size(self) -> int:
        return self.mesh.size()

    @property
    def rank(self) -> int:
        return self.mesh.get_rank()

    @property
    def dp_mesh(self) -> DeviceMesh:
        """``dp_replicate x dp_shard``: ranks that read different rows of the batch.

        FSDP shards over this mesh only when ``sp == 1``; use ``fsdp_mesh`` in general.
        """
        return self.mesh["dp_replicate", "dp_shard"]

    @property
    def dp_size(self) -> int:
        return self.size("dp_replicate") * self.size("dp_shard")

    @property
    def dp_rank(self) -> int:
        return self.local_rank("dp_replicate") * self.size("dp_shard") + self.local_rank("dp_shard")

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        """The mesh dense parameters are sharded over: 1-D ``dp_shard_sp``, or 2-D
        ``(dp_replicate, dp_shard_sp)`` (HSDP) when there are replicas."""
        if self.size("dp_replicate") == 1:
            return self.fsdp_root["dp_shard_sp"]
        return self.fsdp_root

    @property
    def fsdp_size(self) -> int:
        """Ranks FSDP averages dense gradients over (``dp_replicate * dp_shard * sp``)."""
        return self.fsdp_root.size()

    @property
    def sp_mesh(self) -> DeviceMesh:
        return self.mesh["sp"]

    @property
    def sp_group(self) -> dist.ProcessGroup:
        """The ranks that share one sequence (Ulysses all-to-all group)."""
        return self.mesh.get_group("sp")

    @property
    def sp_size(self) -> int:
        return self.size("sp")

    @property
    def sp_rank(self) -> int:
        return self.local_rank("sp")

    @property
    def ep_mesh(self) -> DeviceMesh:
        """The mesh experts are ``Shard(0)`` over."""
        return self.expert_mesh["ep"]

    @property
    def ep_group(self) -> dist.ProcessGroup:
        """The ranks that exchange tokens in expert-parallel dispatch and combine."""
        return self.expert_mesh.get_group("ep")

    @property
    def ep_size(self) -> int:
        return self.expert_mesh.size(EXPERT_DIMS.index("ep"))

    @property
    def ep_rank(self) -> int:
        return self.expert_mesh.get_local_rank("ep")

    @property
    def expert_fsdp_mesh(self) -> DeviceMesh:
        """The mesh expert parameters are FSDP-sharded over: ``ep_shard``, or
        ``(dp_replicate, ep_shard)`` (HSDP) when there are replicas."""
        if self.size("dp_replicate") == 1:
            return self.expert_mesh["ep_shard"]
        return self.expert_mesh["dp_replicate", "ep_shard"]

    def size(self, dim: str) -> int:
        """Size of one dimension of ``mesh`` (``dp_replicate``, ``dp_shard`` or ``sp``)."""
        return self.mesh.size(DENSE_DIMS.index(dim))

    def local_rank(self, dim: str) -> int:
        """This rank's coordinate along one dimension of ``mesh``."""
        return self.mesh.get_local_rank(dim)

    def group(self, dim: str) -> dist.ProcessGroup:
        """The process group along one dimension of ``mesh``."""
        return self.mesh.get_group(dim)


def _device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _ensure_process_group(device: torch.device) -> None:
    if dist.is_initialized():
        return
    # CPU collectives stay possible on GPU runs (CPU-offloaded FSDP shards, gradient
    # clipping and DTensor gathers of them, small metadata exchanges).
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ:  # started by torchrun
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        return
    # A single process needs no launcher: a one-rank group over an in-memory store.
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def resolve_degrees(
    world: int, dp_replicate: int = 1, dp_shard: int = -1, sp: int = 1, ep: int = 1
) -> tuple[int, int, int, int]:
    """Check the parallel degrees against the world size; fill in ``dp_shard=-1``.

    Returns ``(dp_replicate, dp_shard, sp, ep)``. Raises ``ValueError`` naming the
    degrees when they do not fit ``world``.
    """
    for name, value in (("dp_replicate", dp_replicate), ("sp", sp), ("ep", ep)):
        if value < 1:
            raise ValueError(f"{name}={value}: parallel degrees must be >= 1")
    if dp_shard == -1:
        if world % (dp_replicate * sp):
            raise ValueError(
                f"world size {world} is not divisible by dp_replicate={dp_replicate} x sp={sp}"
            )
        dp_shard = world // (dp_replicate * sp)
    if dp_shard < 1:
        raise ValueError(f"dp_shard={dp_shard}: must be >= 1, or -1 for what the world leaves")
    if dp_replicate * dp_shard * sp != world:
        raise ValueError(
            f"parallel degrees dp_replicate={dp_replicate} x dp_shard={dp_shard} x sp={sp} "
            f"= {dp_replicate * dp_shard * sp}, but the world size is {world}"
        )
    if (dp_shard * sp) % ep:
        raise ValueError(
            f"ep={ep} must divide dp_shard x sp = {dp_shard} x {sp} = {dp_shard * sp}: "
            "experts are spread over the ranks of one data-parallel replica"
        )
    return dp_replicate, dp_shard, sp, ep


def init_parallel(
    dp_replicate: int = 1, dp_shard: int = -1, sp: int = 1, ep: int = 1
) -> ParallelState:
    """Start (or join) the process group and build the meshes.

    ``dp_shard=-1`` takes whatever the world size leaves after the other degrees.
    Raises ``ValueError`` when the degrees do not multiply to the world size, or when
    ``ep`` does not divide ``dp_shard * sp``.
    """
    device = _device_for_rank()
    _ensure_process_group(device)
    dp_replicate, dp_shard, sp, ep = resolve_degrees(
        dist.get_world_size(), dp_replicate, dp_shard, sp, ep
    )
    kind = device.type
    mesh = init_device_mesh(kind, (dp_replicate, dp_shard, sp), mesh_dim_names=DENSE_DIMS)
    fsdp_root = init_device_mesh(kind, (dp_replicate, dp_shard * sp), mesh_dim_names=FSDP_DIMS)
    expert_mesh = init_device_mesh(
        kind, (dp_replicate, dp_shard * sp // ep, ep), mesh_dim_names=EXPERT_DIMS
    )
    return ParallelState(mesh=mesh, fsdp_root=fsdp_root, expert_mesh=expert_mesh, device=device)


def destroy_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
