"""Loom distributed primitives (torch + safetensors only; never imports transformers).

Modules: mesh, fsdp, clip, ulysses, expert_parallel, plan, loading, checkpoint, export.
"""
