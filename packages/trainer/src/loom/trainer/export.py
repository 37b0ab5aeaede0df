"""Write the trained model as an HF directory that ``from_pretrained`` loads."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from torch import nn

from loom.dist.export import export_safetensors, full_tensor
from loom.dist.loading import load_targets
from loom.models.registry import model_type, port_hooks


def export_hf(model: nn.Module, tokenizer, out: Path) -> None:
    """Safetensors (sharded with an index when large; gathered one tensor at a time, so no
    rank holds the whole model), config and tokenizer (or a vision-language model's
    processor). Every rank calls it."""
    tensors = load_targets(model)  # a tied matrix once, as HF writes it
    to_hf = port_hooks(model_type(model.config)).to_hf
    if to_hf is not None:  # the port's layout differs from HF's: convert whole tensors
        tensors = to_hf({k: full_tensor(v) for k, v in tensors.items()})
    export_safetensors(tensors, out)
    if dist.get_rank() == 0:
        model.config.save_pretrained(out)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out)
        tokenizer.save_pretrained(out)  # a processor too (tokenizer + image processor)
    dist.barrier()
