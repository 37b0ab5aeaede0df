"""Mixtral port (transformers v4 and v5): upstream's modeling code with Loom's stacked experts
(eager, fused, expert-parallel), kernels and loss (see generated/);
``loom.models.expert_plan`` shards the experts over the ``ep`` mesh;
``converter.MixtralConverter`` reads HF's per-expert ``block_sparse_moe`` checkpoints
into the stacked layout and ``converter.to_hf`` writes them back.
"""

from loom.models.registry import (
    MODELING_REGISTRY,
    PORT_HOOKS_REGISTRY,
    PortHooks,
    generated_class,
)


@MODELING_REGISTRY.register("mixtral")
def mixtral_class(architecture: str):
    return generated_class("mixtral", architecture or "MixtralForCausalLM")


@PORT_HOOKS_REGISTRY.register("mixtral")
def mixtral_hooks() -> PortHooks:
    from loom.models.expert_plan import EXPERT_PLAN, expert_modules
    from loom.models.mixtral.converter import MixtralConverter, to_hf

    return PortHooks(EXPERT_PLAN, expert_modules, MixtralConverter.from_config, to_hf)
