"""Loom distributed primitives (torch + safetensors only; never imports transformers)."""
