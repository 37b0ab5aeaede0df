"""Qwen3 port: upstream's modeling code with Loom's kernels and loss (see generated/)."""

from loom.models.registry import MODELING_REGISTRY, generated_class


@MODELING_REGISTRY.register("qwen3")
def qwen3_class(architecture: str):
    return generated_class("qwen3", architecture or "Qwen3ForCausalLM")
