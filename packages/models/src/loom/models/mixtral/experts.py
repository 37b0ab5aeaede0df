"""Mixtral's routed experts: Loom's ``StackedExperts`` sized from ``MixtralConfig``
(``num_local_experts``; every expert has the model's ``intermediate_size``, there is no
dense MLP)."""

from __future__ import annotations

from loom.models.experts import StackedExperts, moe_implementation


class MixtralStackedExperts(StackedExperts):
    """Drop-in for v5's ``MixtralExperts``; the v4 port's ``MixtralSparseMoeBlock`` builds
    it in place of v4's ``nn.ModuleList`` of ``MixtralBlockSparseTop2MLP``."""

    def __init__(self, config) -> None:
        super().__init__(
            config.num_local_experts,
            config.hidden_size,
            config.intermediate_size,
            config.hidden_act,
            moe_implementation(config),
        )
