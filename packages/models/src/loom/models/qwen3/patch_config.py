"""Qwen3 port for transformers v5.

Regenerate: loom-patchgen generate loom.models.qwen3.patch_config --diff
"""

from loom.models.dense_patch_config import dense_port

config = dense_port("qwen3", "Qwen3", major=5)
