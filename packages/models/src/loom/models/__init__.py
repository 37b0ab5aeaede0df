"""Loom model ports and registries: ``build_model`` picks a port by ``model_type``."""

from loom.models.registry import MODELING_REGISTRY, build_model

__all__ = ["MODELING_REGISTRY", "build_model"]
