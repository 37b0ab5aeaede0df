"""Qwen3-VL-MoE port for transformers v5.

Regenerate: loom-patchgen generate loom.models.qwen3_vl_moe.patch_config --diff

The vision-language ports' patches (``loom.models.vlm_patch_config``) and the text
decoder's routed experts as ``Qwen3VLMoeStackedExperts`` (upstream's parameters, so
upstream's ``_init_weights`` branch on ``Qwen3VLMoeTextExperts`` initialises them).
"""

from loom.models.vlm_patch_config import vlm_port
from loom.patchgen import create_patch_from_external

config = vlm_port("qwen3_vl_moe", "Qwen3VLMoe", major=5)
config.replace_class(
    "Qwen3VLMoeTextExperts",
    replacement=create_patch_from_external(
        "loom.models.qwen3_vl_moe.experts", "Qwen3VLMoeStackedExperts"
    ),
    description="stacked experts: eager loop / fused grouped GEMM / expert-parallel "
    "dispatch+combine; upstream's @use_experts_implementation rerouting is dropped",
)
