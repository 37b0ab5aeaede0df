"""Qwen3-MoE's routed experts: Loom's ``StackedExperts`` sized from ``Qwen3MoeConfig``
(``num_experts``, ``moe_intermediate_size``: the dense layers of ``mlp_only_layers``
use ``intermediate_size``)."""

from __future__ import annotations

from loom.models.experts import StackedExperts, moe_implementation


class Qwen3MoeStackedExperts(StackedExperts):
    """Drop-in for v5's ``Qwen3MoeExperts``; the v4 port's ``Qwen3MoeSparseMoeBlock``
    builds it in place of v4's ``nn.ModuleList`` of ``Qwen3MoeMLP``."""

    def __init__(self, config) -> None:
        super().__init__(
            config.num_experts,
            config.hidden_size,
            config.moe_intermediate_size,
            config.hidden_act,
            moe_implementation(config),
        )
