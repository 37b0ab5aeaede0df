"""Qwen2 port for transformers v5.

Regenerate: loom-patchgen generate loom.models.qwen2.patch_config --diff
"""

from loom.models.dense_patch_config import dense_port

config = dense_port("qwen2", "Qwen2", major=5)
