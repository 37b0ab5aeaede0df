"""Loom fused kernels: each op as a plain-torch reference plus a Triton implementation."""
