"""Qwen3-VL-MoE port: upstream's modeling code with Loom's stacked experts (eager, fused,
expert-parallel), kernels, loss and multimodal training forward (see generated/ and
loom.models.vlm); ``loom.models.expert_plan`` shards the experts over the ``ep`` mesh;
``converter`` reads HF's stacked experts in either orientation and writes the Hub's.
"""

from loom.models.registry import (
    MODELING_REGISTRY,
    PORT_HOOKS_REGISTRY,
    VLM_LEGACY_KEYS,
    PortHooks,
    generated_class,
)


@MODELING_REGISTRY.register("qwen3_vl_moe")
def qwen3_vl_moe_class(architecture: str):
    return generated_class("qwen3_vl_moe", architecture or "Qwen3VLMoeForConditionalGeneration")


@PORT_HOOKS_REGISTRY.register("qwen3_vl_moe")
def qwen3_vl_moe_hooks() -> PortHooks:
    from loom.models.expert_plan import VLM_EXPERT_PLAN, expert_modules
    from loom.models.qwen3_vl_moe.converter import Qwen3VLMoeConverter, to_hf

    return PortHooks(
        VLM_EXPERT_PLAN, expert_modules, Qwen3VLMoeConverter.from_config, to_hf, VLM_LEGACY_KEYS
    )
