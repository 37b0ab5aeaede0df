"""Qwen2.5-VL port for transformers v4.

Regenerate (under transformers 4.57.3): loom-patchgen generate loom.models.qwen2_5_vl.patch_config_v4 --diff
"""

from loom.models.vlm_patch_config import vlm_port

config = vlm_port(
    "qwen2_5_vl",
    "Qwen2_5_VL",
    major=4,
    norm="Qwen2RMSNorm",  # imported from qwen2; the vision blocks' and merger's norm too
    norm_imported=True,
    mlp="Qwen2MLP",
    multimodal_rotary=True,
)
