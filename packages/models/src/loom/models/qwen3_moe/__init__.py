"""Qwen3-MoE port: upstream's modeling code with Loom's stacked experts (eager, fused,
expert-parallel), kernels and loss (see generated/); ``loom.models.expert_plan``
shards the experts over the ``ep`` mesh; ``converter.Qwen3MoeConverter`` reads HF's
per-expert checkpoints into the stacked layout and ``converter.to_hf`` writes them back.
"""

from loom.models.registry import (
    MODELING_REGISTRY,
    PORT_HOOKS_REGISTRY,
    PortHooks,
    generated_class,
)


@MODELING_REGISTRY.register("qwen3_moe")
def qwen3_moe_class(architecture: str):
    return generated_class("qwen3_moe", architecture or "Qwen3MoeForCausalLM")


@PORT_HOOKS_REGISTRY.register("qwen3_moe")
def qwen3_moe_hooks() -> PortHooks:
    from loom.models.expert_plan import EXPERT_PLAN, expert_modules
    from loom.models.qwen3_moe.converter import Qwen3MoeConverter, to_hf

    return PortHooks(EXPERT_PLAN, expert_modules, Qwen3MoeConverter.from_config, to_hf)
