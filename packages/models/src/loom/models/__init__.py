"""Loom model ports and registries: ``build_model`` picks a port by ``model_type``."""

from loom.models.registry import (
    MODEL_CONFIG_REGISTRY,
    MODEL_PROCESSOR_REGISTRY,
    MODELING_REGISTRY,
    build_model,
)

__all__ = ["MODELING_REGISTRY", "MODEL_CONFIG_REGISTRY", "MODEL_PROCESSOR_REGISTRY", "build_model"]
