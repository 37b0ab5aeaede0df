"""Building on meta keeps what a module's constructor computed into its buffers."""

import torch
from torch import nn

from loom.dist.loading import materialize, meta_parameters


class ScaledEmbedding(nn.Embedding):
    """Like Gemma's: a constant only the constructor knows, kept in a non-persistent buffer."""

    def __init__(self, n: int, dim: int, scale: float) -> None:
        super().__init__(n, dim)
        self.register_buffer("scale", torch.tensor(scale), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.scale


def test_buffers_keep_their_values_through_materialize():
    with meta_parameters():
        module = ScaledEmbedding(10, 4, scale=8.0)
    assert module.weight.is_meta and isinstance(module.weight, nn.Parameter)
    assert module.weight.requires_grad and not module.scale.is_meta
    materialize(module, torch.device("cpu"), init=lambda m: None)
    assert module.scale.item() == 8.0
    with torch.no_grad():
        module.weight.fill_(1.0)
    assert module(torch.tensor([3])).sum().item() == 4 * 8.0


def test_tied_parameters_stay_tied_through_materialize():
    with meta_parameters():
        model = nn.ModuleDict({"embed": nn.Embedding(10, 4), "head": nn.Linear(4, 10, bias=False)})
    model["head"].weight = model["embed"].weight
    materialize(model, torch.device("cpu"))
    assert model["head"].weight is model["embed"].weight and not model["head"].weight.is_meta
    assert len(list(model.parameters())) == 1
