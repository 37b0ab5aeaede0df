"""Qwen2 port: upstream's modeling code with Loom's kernels and loss (see generated/)."""

from loom.models.registry import MODELING_REGISTRY, generated_class


@MODELING_REGISTRY.register("qwen2")
def qwen2_class(architecture: str):
    return generated_class("qwen2", architecture or "Qwen2ForCausalLM")
