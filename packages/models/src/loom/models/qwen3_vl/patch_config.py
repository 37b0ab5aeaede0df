"""Qwen3-VL port for transformers v5.

Regenerate: loom-patchgen generate loom.models.qwen3_vl.patch_config --diff
"""

from loom.models.vlm_patch_config import vlm_port

config = vlm_port("qwen3_vl", "Qwen3VL", major=5)
