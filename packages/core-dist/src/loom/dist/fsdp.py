"""FSDP2 wrapping: shard experts, then each named layer, then the root.

Gradient convention: FSDP2 *averages* gradients over the ranks of its mesh. A loss that
is a mean over the global batch's tokens is therefore backpropagated on each rank as
``local_token_loss_sum * fsdp_size / global_token_count``; ranks may hold different
numbers of loss tokens, only the global count enters the normalisation.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard


def mixed_precision(device: torch.device) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction on GPU; fp32 everywhere on CPU."""
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)


def apply_fsdp(
    model: nn.Module,
    layers: Iterable[nn.Module],
    mesh: DeviceMesh,
    mp_policy: MixedPrecisionPolicy,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    experts: Iterable[nn.Module] = (),
    expert_mesh: DeviceMesh | None = None,
) -> nn.Module:
    """``fully_shard`` every module in ``layers`` and then ``model`` itself, over ``mesh``.

    ``experts`` (modules whose parameters a ``ParallelPlan`` already made ``Shard(0)``
    DTensors over the ``ep`` mesh) are sharded first, over ``expert_mesh``
    (``ParallelState.expert_fsdp_mesh``), so the layer that contains them leaves them
    alone. Pass the dense mesh as ``ParallelState.fsdp_mesh``.
    """
    experts = list(experts)
    if experts and expert_mesh is None:
        raise ValueError("apply_fsdp: experts were given without an expert_mesh to shard over")
    offload = {"offload_policy": CPUOffloadPolicy()} if cpu_offload else {}
    for module in experts:
        fully_shard(
            module,
            mesh=expert_mesh,
            mp_policy=mp_policy,
            reshard_after_forward=reshard_after_forward,
            **offload,
        )
    for layer in layers:
        fully_shard(
            layer,
            mesh=mesh,
            mp_policy=mp_policy,
            reshard_after_forward=reshard_after_forward,
            **offload,
        )
    # The root keeps its parameters after forward: backward starts with them anyway.
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False, **offload)
    return model
