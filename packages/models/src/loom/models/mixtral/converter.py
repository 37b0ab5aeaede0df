"""Mixtral checkpoints in, and back out, in HF's layout.

HF's layout for ``mixtral`` (checked, not inferred: transformers 5.17's
``conversion_mapping["mixtral"]`` renames ``.block_sparse_moe.`` to ``.mlp.``, merges
``experts.*.w1.weight`` and ``experts.*.w3.weight`` (``MergeModulelist(dim=0)`` then
``Concatenate(dim=1)``: w1 rows first) into ``experts.gate_up_proj``, whose first half
v5's ``MixtralExperts`` feeds to the activation, and merges ``experts.*.w2.weight`` into
``experts.down_proj``; ``save_pretrained`` reverts all of it, so the Hub checkpoints and
v5's own saves hold the same keys):

    model.layers.{i}.block_sparse_moe.gate.weight             [E, H]  (the router)
    model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight   [I, H]  (gate)
    model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight   [I, H]  (up)
    model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight   [H, I]  (down)

transformers 4.57 holds the same keys in memory (``block_sparse_moe.experts`` is an
``nn.ModuleList`` of ``MixtralBlockSparseTop2MLP``) and its ``save_pretrained`` writes them
unchanged.

The stacking, the renaming and their inverse are ``loom.models.expert_checkpoint``'s.
"""

from __future__ import annotations

from loom.models.expert_checkpoint import ExpertLayout, StackedExpertsConverter

LAYOUT = ExpertLayout(block="block_sparse_moe", gate="w1", up="w3", down="w2")


class MixtralConverter(StackedExpertsConverter):
    """``num_local_experts``, ``hidden_size`` (H) and ``intermediate_size`` (I) of the model."""

    layout = LAYOUT

    @classmethod
    def from_config(cls, config) -> MixtralConverter:
        """From a flat ``MixtralConfig`` or a composite config with ``text_config``."""
        text = getattr(config, "text_config", None) or config
        return cls(text.num_local_experts, text.hidden_size, text.intermediate_size)


to_hf = LAYOUT.to_hf  # Loom's state dict (full tensors) -> HF's block_sparse_moe keys
