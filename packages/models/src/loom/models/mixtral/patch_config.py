"""Mixtral port for transformers v5.

Regenerate: loom-patchgen generate loom.models.mixtral.patch_config --diff

The MoE ports' patches (``loom.models.moe_patch_config``): fused RMSNorm and rotary, the
routed experts as ``MixtralStackedExperts`` (same parameters as upstream, so upstream's
``_init_weights`` branch on ``MixtralExperts`` initialises them), the fused
cross-entropy and the guarded aux loss in the causal-LM forward. Mixtral has no dense
MLP; its router (``MixtralTopKRouter``, softmax then top-k, renormalised) and the
router jitter of ``MixtralSparseMoeBlock`` stay upstream's.
"""

from __future__ import annotations

from loom.models.moe_patch_config import moe_port

config = moe_port(
    "mixtral",
    "Mixtral",
    experts="loom.models.mixtral.experts:MixtralStackedExperts",
    description="Mixtral with Loom's stacked experts (eager/fused/EP), kernels and fused loss",
)
