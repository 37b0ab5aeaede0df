"""Qwen3-VL port: upstream's modeling code with Loom's kernels, loss and multimodal
training forward (see generated/ and loom.models.vlm)."""

from loom.models.registry import (
    MODELING_REGISTRY,
    PORT_HOOKS_REGISTRY,
    VLM_LEGACY_KEYS,
    PortHooks,
    generated_class,
)


@MODELING_REGISTRY.register("qwen3_vl")
def qwen3_vl_class(architecture: str):
    return generated_class("qwen3_vl", architecture or "Qwen3VLForConditionalGeneration")


@PORT_HOOKS_REGISTRY.register("qwen3_vl")
def qwen3_vl_hooks() -> PortHooks:
    return PortHooks(renames=VLM_LEGACY_KEYS)
