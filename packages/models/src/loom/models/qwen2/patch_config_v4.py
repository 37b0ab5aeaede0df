"""Qwen2 port for transformers v4.

Regenerate (under transformers 4.57.3): loom-patchgen generate loom.models.qwen2.patch_config_v4 --diff
"""

from loom.models.dense_patch_config import dense_port

config = dense_port("qwen2", "Qwen2", major=4)
