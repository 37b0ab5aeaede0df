"""Qwen3-VL-MoE's routed experts: Loom's ``StackedExperts`` sized from the text config
(``num_experts``, ``moe_intermediate_size``; the dense layers of ``mlp_only_layers`` use
``intermediate_size``)."""

from __future__ import annotations

from loom.models.experts import StackedExperts, moe_implementation


class Qwen3VLMoeStackedExperts(StackedExperts):
    """Drop-in for v5's ``Qwen3VLMoeTextExperts`` (its names and layout: ``gate_up_proj``
    [E, 2I, H], ``down_proj`` [E, H, I]); the v4 port's ``Qwen3VLMoeTextSparseMoeBlock``
    builds it in place of v4's experts, which hold the transposed [E, H, 2I] / [E, I, H]."""

    def __init__(self, config) -> None:
        super().__init__(
            config.num_experts,
            config.hidden_size,
            config.moe_intermediate_size,
            config.hidden_act,
            moe_implementation(config),
        )
