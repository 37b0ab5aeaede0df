"""Qwen3-MoE port for transformers v5.

Regenerate: loom-patchgen generate loom.models.qwen3_moe.patch_config --diff

The MoE ports' patches (``loom.models.moe_patch_config``): fused RMSNorm and rotary,
fused SwiGLU in the dense MLP of ``mlp_only_layers``, the routed experts as
``Qwen3MoeStackedExperts`` (same parameters as upstream, so upstream's ``_init_weights``
branch on ``Qwen3MoeExperts`` initialises them), the fused cross-entropy and the guarded
aux loss in the causal-LM forward.
"""

from __future__ import annotations

from loom.models.moe_patch_config import moe_port

config = moe_port(
    "qwen3_moe",
    "Qwen3Moe",
    experts="loom.models.qwen3_moe.experts:Qwen3MoeStackedExperts",
    description="Qwen3-MoE with Loom's stacked experts (eager/fused/EP), kernels and fused loss",
    dense_mlp=True,
)
