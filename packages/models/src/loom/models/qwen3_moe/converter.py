"""Qwen3-MoE checkpoints in, and back out, in HF's layout.

HF's layout for ``qwen3_moe`` (checked, not inferred: transformers 5.17's
``conversion_mapping`` aliases ``qwen3_moe`` to ``qwen2_moe``, whose converters merge
``mlp.experts.*.{gate,up}_proj.weight`` into ``gate_up_proj`` and
``mlp.experts.*.down_proj.weight`` into ``down_proj``; ``save_pretrained`` reverts that
by default, so both the Hub checkpoints and v5's own saves hold per-expert keys):

    model.layers.{i}.mlp.experts.{j}.gate_proj.weight  [I, H]
    model.layers.{i}.mlp.experts.{j}.up_proj.weight    [I, H]
    model.layers.{i}.mlp.experts.{j}.down_proj.weight  [H, I]

transformers 4.57 holds the same keys in memory (``Qwen3MoeSparseMoeBlock.experts`` is an
``nn.ModuleList`` of ``Qwen3MoeMLP``) and its ``save_pretrained`` writes them unchanged.

The stacking and its inverse are ``loom.models.expert_checkpoint``'s.
"""

from __future__ import annotations

from loom.models.expert_checkpoint import ExpertLayout, StackedExpertsConverter

LAYOUT = ExpertLayout(block="mlp", gate="gate_proj", up="up_proj", down="down_proj")


class Qwen3MoeConverter(StackedExpertsConverter):
    """``num_experts``, ``hidden_size`` (H) and ``moe_intermediate_size`` (I) of the model."""

    layout = LAYOUT

    @classmethod
    def from_config(cls, config) -> Qwen3MoeConverter:
        """From a flat ``Qwen3MoeConfig`` or a composite config with ``text_config``."""
        text = getattr(config, "text_config", None) or config
        return cls(text.num_experts, text.hidden_size, text.moe_intermediate_size)


to_hf = LAYOUT.to_hf  # Loom's state dict (full tensors) -> HF's per-expert keys
