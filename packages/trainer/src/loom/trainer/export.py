"""Write the trained model as an HF directory that ``from_pretrained`` loads."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from torch import nn

from loom.dist.export import export_safetensors
from loom.dist.loading import load_targets


def export_hf(model: nn.Module, tokenizer, out: Path) -> None:
    """Safetensors (sharded with an index when large; gathered one tensor at a time, so no
    rank holds the whole model), config and tokenizer. Every rank calls it."""
    export_safetensors(load_targets(model), out)  # a tied matrix once, as HF writes it
    if dist.get_rank() == 0:
        model.config.save_pretrained(out)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out)
        tokenizer.save_pretrained(out)
    dist.barrier()
