"""Loom patch generator (a build tool: nothing imports it at training time).

A patch config declares changes to an upstream HF modeling module with `PatchConfig`;
`loom-patchgen` writes the patched, self-contained module and its diff against upstream.
"""

from loom.patchgen.config import PatchConfig, PatchError, create_patch_from_external

__all__ = ["PatchConfig", "PatchError", "create_patch_from_external"]
