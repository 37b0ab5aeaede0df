"""Qwen2.5-VL port: upstream's modeling code with Loom's kernels, loss and multimodal
training forward (see generated/ and loom.models.vlm)."""

from loom.models.registry import (
    MODELING_REGISTRY,
    PORT_HOOKS_REGISTRY,
    VLM_LEGACY_KEYS,
    PortHooks,
    generated_class,
    to_legacy_vlm_keys,
)


@MODELING_REGISTRY.register("qwen2_5_vl")
def qwen2_5_vl_class(architecture: str):
    return generated_class("qwen2_5_vl", architecture or "Qwen2_5_VLForConditionalGeneration")


@PORT_HOOKS_REGISTRY.register("qwen2_5_vl")
def qwen2_5_vl_hooks() -> PortHooks:
    return PortHooks(to_hf=to_legacy_vlm_keys, renames=VLM_LEGACY_KEYS)
