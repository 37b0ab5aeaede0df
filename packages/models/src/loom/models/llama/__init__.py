"""Llama port: upstream's modeling code with Loom's kernels and loss (see generated/)."""

from loom.models.registry import MODELING_REGISTRY, generated_class


@MODELING_REGISTRY.register("llama")
def llama_class(architecture: str):
    return generated_class("llama", architecture or "LlamaForCausalLM")
