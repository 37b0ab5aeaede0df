"""Gradient-norm clipping across meshes.

``torch.nn.utils.clip_grad_norm_`` stacks per-parameter norms and scales all gradients
in one foreach call, both of which fail when gradients are DTensors on different meshes
(dense parameters on the FSDP mesh, experts on the expert mesh). Here each mesh's
gradients get their own DTensor norm, made a plain tensor with ``full_tensor()`` (which
reduces over sharded dimensions, in one collective over a flattened mesh of them, and
counts replicated ones once); the per-mesh norms are combined locally and each mesh's gradients
are scaled on their own.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor


def _by_mesh(parameters: Iterable[nn.Parameter]) -> dict[object, list[nn.Parameter]]:
    """Parameters with a gradient, grouped by their gradient's mesh (``None``: plain)."""
    groups: dict[object, list[nn.Parameter]] = {}
    for param in parameters:
        if param.grad is not None:
            grad = param.grad
            groups.setdefault(grad.device_mesh if isinstance(grad, DTensor) else None, []).append(
                param
            )
    return groups


def clip_grad_norm_(
    parameters: Iterable[nn.Parameter], max_norm: float, norm_type: float = 2.0
) -> torch.Tensor:
    """Scale the gradients of ``parameters`` so their total norm is at most ``max_norm``.

    Correct for any mix of plain tensors and DTensors on any meshes (FSDP, HSDP, EP), as
    long as every rank passes its parameters in the same order. Returns the total norm
    before clipping, a plain tensor equal on every rank. ``max_norm=inf`` only measures.
    """
    groups = _by_mesh(parameters)
    if not groups:
        return torch.zeros(())
    norms = []
    for mesh, params in groups.items():
        if mesh is not None:
            _flatten_sharded_dims(mesh, [p.grad for p in params])
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type)
        norms.append(norm.full_tensor() if mesh is not None else norm)
    device = norms[0].device
    norms = torch.stack([n.to(device) for n in norms])
    total = torch.linalg.vector_norm(norms, norm_type)  # the max when norm_type is inf
    if max_norm != float("inf"):
        for params in groups.values():
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def _flatten_sharded_dims(mesh: DeviceMesh, grads: list[DTensor]) -> None:
    """Make sure ``mesh`` has a flattened mesh of the dims the gradients are sharded over.

    Their norms are partial sums over those dims; DTensor sums over a flattened mesh of
    them in one collective when one exists, else one collective per dim (and warns). Made
    once per mesh (later calls find it); every rank clips the same meshes in the same
    order, as creating its process groups requires."""
    names = mesh.mesh_dim_names
    if names is None:
        return
    # Neither replicated nor partial: Shard, or _StridedShard (which is no Shard subclass).
    sharded = {
        tuple(i for i, p in enumerate(g.placements) if not (p.is_replicate() or p.is_partial()))
        for g in grads
    }
    for dims in sharded:
        if len(dims) > 1:
            mesh[tuple(names[i] for i in dims)]._flatten()
