"""Expert parallelism for the MoE ports: the stacked expert tensors ``Shard(0)`` over
the ``ep`` mesh (``ParallelState.ep_mesh``), so ep rank ``r`` holds experts
``[r * E/ep, (r + 1) * E/ep)``, the ranges ``loom.dist.expert_parallel.dispatch``
sends tokens to. Apply before FSDP (``apply_fsdp(..., experts=expert_modules(model),
expert_mesh=ParallelState.expert_fsdp_mesh)``) and before loading weights.

The names are those of transformers v5 (and of Loom's ports, v4 and v5), the same for every
port that keeps upstream's ``model.layers[i].mlp.experts`` (qwen3_moe, mixtral):
``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Shard

from loom.dist.plan import ParallelPlan

EXPERT_PLAN = ParallelPlan(
    {
        "model.layers.*.mlp.experts.gate_up_proj": (Shard(0),),
        "model.layers.*.mlp.experts.down_proj": (Shard(0),),
    }
)


# A vision-language model's text decoder (qwen3_vl_moe): the same tensors, one level down.
VLM_EXPERT_PLAN = ParallelPlan(
    {
        "model.language_model.layers.*.mlp.experts.gate_up_proj": (Shard(0),),
        "model.language_model.layers.*.mlp.experts.down_proj": (Shard(0),),
    }
)


def expert_modules(model: nn.Module) -> list[nn.Module]:
    """The modules holding the routed experts (FSDP shards them over the expert mesh);
    dense layers (qwen3_moe's ``mlp_only_layers``) have none."""
    decoder = getattr(model.model, "language_model", model.model)
    return [layer.mlp.experts for layer in decoder.layers if hasattr(layer.mlp, "experts")]
