"""Write the trained model as an HF directory that ``from_pretrained`` loads."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoModelForCausalLM


def export_hf(model: nn.Module, tokenizer, out: Path) -> None:
    """Gather the full state dict to rank 0 (on the CPU) and save it there with safetensors."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)  # collective: every rank calls it
    if dist.get_rank() == 0:
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(model.config)
        plain.load_state_dict(state, assign=True)
        plain.tie_weights()
        plain.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    dist.barrier()
