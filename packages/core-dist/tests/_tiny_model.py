"""A tiny decoder-shaped model and a deterministic global batch for the distributed tests.

Its blocks are token-wise (no attention), so a rank may hold any slice of the rows and
of the sequence and still compute its tokens' exact logits: data and sequence
parallelism can both be checked against one process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
VOCAB, DIM = 32, 16


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class TinyLM(nn.Module):
    def __init__(self, layers: int = 3, vocab: int = VOCAB, dim: int = DIM) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.head(hidden)


def global_batch(step: int, rows: int = 8, seq: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, labels)`` of shape ``[rows, seq]``; row ``i`` ignores its first ``i`` labels,
    so contiguous row blocks hold unequal numbers of loss tokens."""
    generator = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (rows, seq), generator=generator)
    labels = torch.randint(0, VOCAB, (rows, seq), generator=generator)
    for row in range(rows):
        labels[row, : row % seq] = IGNORE_INDEX
    return ids, labels


def token_loss_sum(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(ids)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
