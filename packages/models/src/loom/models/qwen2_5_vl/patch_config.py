"""Qwen2.5-VL port for transformers v5.

Regenerate: loom-patchgen generate loom.models.qwen2_5_vl.patch_config --diff
"""

from loom.models.vlm_patch_config import vlm_port

config = vlm_port(
    "qwen2_5_vl",
    "Qwen2_5_VL",
    major=5,
    norm="Qwen2_5_VLRMSNorm",  # the vision blocks' and merger's norm too
    mlp="Qwen2MLP",
    vision_class="Qwen2_5_VisionTransformerPretrainedModel",
)
