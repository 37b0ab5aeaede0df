"""Build the causal LM and its tokenizer from a model directory."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer

from loom.trainer.errors import ConfigError


def load_tokenizer(path: Path):
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.path {path}: cannot load a tokenizer: {err}") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"model.path {path}: the tokenizer defines no eos_token")
    return tokenizer


def has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()


def build_model(
    path: Path, attn_implementation: str = "loom_sdpa", meta: bool = False
) -> nn.Module:
    """The model with fp32 master weights, freshly initialised on the CPU (every rank
    alike: same seed), or with its parameters on the meta device (buffers computed), to be
    sharded first and filled after."""
    from loom.dist.loading import meta_parameters
    from loom.models import build_model as build

    with meta_parameters() if meta else torch.device("cpu"):
        return build(path, attn_implementation=attn_implementation, dtype=torch.float32)


def vision_tower(model: nn.Module) -> nn.Module | None:
    """A vision-language model's vision tower (``model.model.visual``: patch embedding,
    blocks, merger), or None."""
    return getattr(getattr(model, "model", None), "visual", None)


def vision_blocks(model: nn.Module) -> list[nn.Module]:
    visual = vision_tower(model)
    return list(visual.blocks) if visual is not None else []


def freeze_vision(model: nn.Module) -> None:
    visual = vision_tower(model)
    if visual is None:
        raise ConfigError("model.freeze_vit: the model has no vision tower (model.model.visual)")
    visual.requires_grad_(False)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one (``model.model.layers`` in HF causal LMs,
    ``model.model.language_model.layers`` in vision-language models)."""
    inner = getattr(model, "model", None)
    layers = getattr(getattr(inner, "language_model", inner), "layers", None)
    if layers is None:
        raise ConfigError(
            f"{type(model).__name__} has no model.layers; Loom cannot find its decoder layers"
        )
    return list(layers)
