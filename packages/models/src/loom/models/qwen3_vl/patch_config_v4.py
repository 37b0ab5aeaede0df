"""Qwen3-VL port for transformers v4.

Regenerate (under transformers 4.57.3): loom-patchgen generate loom.models.qwen3_vl.patch_config_v4 --diff
"""

from loom.models.vlm_patch_config import vlm_port

config = vlm_port("qwen3_vl", "Qwen3VL", major=4)
