"""Llama port for transformers v5.

Regenerate: loom-patchgen generate loom.models.llama.patch_config --diff
"""

from loom.models.dense_patch_config import dense_port

config = dense_port("llama", "Llama", major=5)
