"""Training FLOPs and model FLOPs utilisation (MFU).

FLOPs of one training step (forward + backward = 3x forward), counting matrix products
only, as in the PaLM paper (appendix B):

    6 * N * tokens                          dense layers, N = matmul parameters
  + 6 * layers * heads * head_dim * sum(n^2) causal attention over packed samples

N counts every weight that multiplies activations: all parameters but the input
embedding, which is a lookup (with tied embeddings it is also the output projection,
so it is counted). In a mixture of experts only the ``top_k / experts`` share of the
routed experts' weights acts on a token. For a packed row, ``n`` runs over its samples' lengths: attention
never crosses samples. Causal attention does half of the ``2 * 2 * n^2 * d`` of full
attention, hence 6 rather than 12. MFU is achieved FLOP/s over the hardware's dense
bf16 peak summed over all GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

# Dense bf16 tensor-core peaks, TFLOP/s, by device-name fragment.
PEAK_TFLOPS = {"H200": 989.5, "H100": 989.5, "H800": 989.5, "A100": 312.0, "L40S": 362.0}


@dataclass(frozen=True)
class FlopModel:
    matmul_params: int
    layers: int
    heads: int
    head_dim: int

    def step_flops(self, tokens: int, sum_sq_lengths: int) -> float:
        dense = 6.0 * self.matmul_params * tokens
        attention = 6.0 * self.layers * self.heads * self.head_dim * sum_sq_lengths
        return dense + attention


def flop_model(model: nn.Module) -> FlopModel:
    """Read sizes off an HF causal LM (call before sharding: it counts local tensors)."""
    config = model.config.get_text_config()
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embedding
    params = sum(p.numel() for p in model.parameters())  # shared tensors are counted once
    routed = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    experts, top_k = getattr(config, "num_experts", 0), getattr(config, "num_experts_per_tok", 0)
    if routed and experts and top_k:
        params -= round(routed * (1 - top_k / experts))
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return FlopModel(
        matmul_params=params - (0 if tied else embedding.numel()),
        layers=config.num_hidden_layers,
        heads=heads,
        head_dim=head_dim,
    )


def sum_sq_lengths(cu_seqlens: list[np.ndarray]) -> int:
    return int(sum((np.diff(c).astype(np.int64) ** 2).sum() for c in cu_seqlens))


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device, or None where unknown (the CPU): MFU is then not reported."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, tflops in PEAK_TFLOPS.items():
        if fragment in name:
            return tflops * 1e12
    return None
