"""Qwen3-VL-MoE checkpoints in, and back out, in HF's layout.

HF's layout for ``qwen3_vl_moe`` (checked, not inferred): the routed experts are stacked
in the checkpoint, ``model.language_model.layers.{i}.mlp.experts.gate_up_proj`` and
``.down_proj``, in one of two orientations:

- ``[E, H, 2I]`` / ``[E, I, H]`` (weights applied as ``x @ w``): the Hub's checkpoints and
  transformers 4.57's in-memory layout and saves;
- ``[E, 2I, H]`` / ``[E, H, I]``: transformers 5.17's in-memory layout (its
  ``conversion_mapping`` transposes at load when the shape asks for it) and its saves.

Loom's layout is v5's. Reading takes either (``StackedExpertsConverter`` dispatches on the
shape, as v5's loader does); a config whose expert shapes read the same both ways
(hidden_size equal to moe_intermediate_size or twice it) is refused, since the file
cannot say which it holds. Export writes the Hub's ``[E, H, 2I]`` orientation, which both
majors load.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from loom.models.expert_checkpoint import _STACKED, ExpertLayout, StackedExpertsConverter

LAYOUT = ExpertLayout(block="mlp", gate="gate_proj", up="up_proj", down="down_proj")


class Qwen3VLMoeConverter(StackedExpertsConverter):
    """``num_experts``, ``hidden_size`` (H) and ``moe_intermediate_size`` (I) of the text
    decoder."""

    layout = LAYOUT

    @classmethod
    def from_config(cls, config) -> Qwen3VLMoeConverter:
        text = getattr(config, "text_config", None) or config
        hidden, inter = text.hidden_size, text.moe_intermediate_size
        if hidden in (inter, 2 * inter):
            raise ValueError(
                f"qwen3_vl_moe: hidden_size {hidden} and moe_intermediate_size {inter} give "
                "expert tensors whose two orientations have the same shape: Loom cannot tell "
                "which one a checkpoint holds"
            )
        return cls(text.num_experts, hidden, inter)


def to_hf(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Loom's state dict (full tensors) with the stacked experts in the Hub's orientation."""
    return {
        key: tensor.transpose(1, 2).contiguous() if _STACKED.match(key) else tensor
        for key, tensor in tensors.items()
    }
