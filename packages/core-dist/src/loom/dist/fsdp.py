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
    ignored: set[nn.Parameter] | None = None,
) -> nn.Module:
    """``fully_shard`` every module in ``layers`` and then ``model`` itself, over ``mesh``.

    ``experts`` (modules whose parameters a ``ParallelPlan`` already made ``Shard(0)``
    DTensors over the ``ep`` mesh) are sharded first, over ``expert_mesh``
    (``ParallelState.expert_fsdp_mesh``), so the layer that contains them leaves them
    alone. Pass the dense mesh as ``ParallelState.fsdp_mesh``. Gradients of experts and
    dense parameters are then both the objective's gradient divided by ``mesh.size()``.
    ``ignored`` parameters (frozen, e.g. quantized) stay whole where they are, unsharded.
    """
    experts = list(experts)
    if experts and expert_mesh is None:
        raise ValueError("apply_fsdp: experts were given without an expert_mesh to shard over")
    # Pinned host memory needs a CUDA driver; without one (CPU runs) plain memory serves.
    policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    extra: dict = {"offload_policy": policy} if cpu_offload else {}
    if ignored:
        extra["ignored_params"] = ignored
    for module in experts:
        fully_shard(
            module,
            mesh=expert_mesh,
            mp_policy=mp_policy,
            reshard_after_forward=reshard_after_forward,
            **extra,
        )
        # An expert's gradient already sums the tokens of its whole ep group (the
        # all-to-all backward brought them); FSDP would average it over the expert mesh
        # only. Dividing by the dense mesh's size puts it on the same scale as every
        # dense gradient, whatever ep is.
        module.set_gradient_divide_factor(float(mesh.size()))
        if expert_mesh.device_type == "cpu" and expert_mesh.size(expert_mesh.ndim - 1) > 1:
            # gloo has no PREMUL_SUM: sum, then divide. Only where a reduce-scatter runs:
            # over a one-rank shard group torch (2.15) would then divide twice.
            module.set_force_sum_reduction_for_comms(True)
    for layer in layers:
        fully_shard(
            layer,
            mesh=mesh,
            mp_policy=mp_policy,
            reshard_after_forward=reshard_after_forward,
            **extra,
        )
    # The root keeps its parameters after forward: backward starts with them anyway.
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False, **extra)
    return model
