"""Write the trained model as an HF directory that ``from_pretrained`` loads."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoConfig

from loom.dist.export import export_safetensors, full_tensor
from loom.dist.loading import load_targets
from loom.models.registry import model_type, port_hooks
from loom.trainer.config import LoraConfig
from loom.trainer.lora import export_adapter, merge_adapters_


def export_config(config, source: Path | None):
    """The config to write: the source folder's as upstream reads and saves it (the
    model's own has Loom's training settings, e.g. ``use_cache`` off), else the model's."""
    return config if source is None else AutoConfig.from_pretrained(source)


def export_dtype(config) -> torch.dtype | None:
    """The floating dtype the config declares for its weights (a bf16 checkpoint goes
    back out in bf16); None: the model's own (fp32 master weights)."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else None


def export_hf(
    model: nn.Module,
    tokenizer,
    out: Path,
    source: Path | None = None,
    lora: LoraConfig | None = None,
) -> None:
    """Safetensors (sharded with an index when large; gathered one tensor at a time, so no
    rank holds the whole model) in the dtype ``source``'s config declares, that config
    and tokenizer (or a vision-language model's processor). Every rank calls it. With
    LoRA: the adapter as peft saves it, and with ``merge_on_export`` the merged model in
    ``out/merged``."""
    config = export_config(model.config, source)
    tensors = load_targets(model)  # a tied matrix once, as HF writes it
    if lora is not None and lora.enabled:
        export_adapter(model, lora, out, source)
        if dist.get_rank() == 0:
            tokenizer.save_pretrained(out)
        if not lora.merge_on_export:
            return
        tensors, out = merge_adapters_(model, lora), out / "merged"
    to_hf = port_hooks(model_type(model.config)).to_hf
    if to_hf is not None:  # the port's layout differs from HF's: convert whole tensors
        tensors = to_hf({k: full_tensor(v) for k, v in tensors.items()})
    export_safetensors(tensors, out, dtype=export_dtype(config))
    if dist.get_rank() == 0:
        config.save_pretrained(out)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out)
        tokenizer.save_pretrained(out)  # a processor too (tokenizer + image processor)
    dist.barrier()
