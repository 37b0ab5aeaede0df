"""Parallel plans: parameter-name glob patterns mapped to DTensor placements.

A model port declares, for example, that its routed experts are sharded on dim 0 over
the expert mesh::

    EXPERTS = ParallelPlan({"model.layers.*.mlp.experts.*": (Shard(0),)})
    EXPERTS.apply(model, parallel.ep_mesh)

Apply plans before FSDP (FSDP shards the plan's local shards further) and before the
weights are loaded; on the meta device nothing is allocated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Placement, distribute_tensor


@dataclass(frozen=True)
class ParallelPlan:
    """``rules``: glob pattern over parameter names (``fnmatch``, ``*`` crosses dots)
    -> one placement per dimension of the mesh the plan is applied to."""

    rules: Mapping[str, Sequence[Placement]]

    def match(self, names: Sequence[str]) -> dict[str, str]:
        """Map each matched parameter name to its pattern.

        Raises ``ValueError`` when a pattern matches nothing (a typo or a renamed module
        would otherwise silently leave parameters replicated) or a name matches twice.
        """
        matched: dict[str, str] = {}
        for pattern in self.rules:
            hits = [name for name in names if fnmatchcase(name, pattern)]
            if not hits:
                sample = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
                raise ValueError(
                    f"parallel plan pattern {pattern!r} matches no parameter (parameters: {sample})"
                )
            for name in hits:
                if name in matched:
                    raise ValueError(
                        f"parameter {name!r} matches both {matched[name]!r} and {pattern!r}"
                    )
                matched[name] = pattern
        return matched

    def apply(self, model: nn.Module, mesh: DeviceMesh) -> dict[str, tuple[Placement, ...]]:
        """Replace every matched parameter by a DTensor with its placements on ``mesh``.

        Returns the placements given to each parameter name.
        """
        names = [name for name, _ in model.named_parameters()]
        applied: dict[str, tuple[Placement, ...]] = {}
        for name, pattern in self.match(names).items():
            placements = tuple(self.rules[pattern])
            if len(placements) != mesh.ndim:
                raise ValueError(
                    f"parallel plan pattern {pattern!r}: {len(placements)} placements for a "
                    f"{mesh.ndim}-D mesh {mesh.mesh_dim_names}"
                )
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            param = getattr(module, leaf)
            sharded = distribute_tensor(param.detach(), mesh, placements)
            module.register_parameter(leaf, nn.Parameter(sharded, param.requires_grad))
            applied[name] = placements
        return applied
