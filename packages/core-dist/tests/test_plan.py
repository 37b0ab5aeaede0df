"""ParallelPlan: glob patterns over parameter names -> DTensor placements."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _tiny_model import TinyLM
from torch.distributed.tensor import DTensor, Replicate, Shard

from loom.dist.export import full_tensor
from loom.dist.mesh import init_parallel
from loom.dist.plan import ParallelPlan
from loom.dist.testing import run_distributed

NAMES = ["embed.weight", "layers.0.up.weight", "layers.0.up.bias", "layers.1.up.weight"]


def test_match_crosses_dots_and_names_each_parameter_once():
    plan = ParallelPlan({"layers.*.up.weight": (Shard(0),), "embed.*": (Replicate(),)})
    assert plan.match(NAMES) == {
        "layers.0.up.weight": "layers.*.up.weight",
        "layers.1.up.weight": "layers.*.up.weight",
        "embed.weight": "embed.*",
    }


def test_a_pattern_that_matches_nothing_is_an_error():
    plan = ParallelPlan({"layers.*.experts.w1": (Shard(0),)})
    with pytest.raises(ValueError, match=r"'layers\.\*\.experts\.w1' matches no parameter"):
        plan.match(NAMES)


def test_a_parameter_matched_twice_is_an_error():
    plan = ParallelPlan({"layers.0.*": (Shard(0),), "*.up.bias": (Shard(0),)})
    with pytest.raises(ValueError, match=r"'layers\.0\.up\.bias' matches both"):
        plan.match(NAMES)


def _apply_shards_real_and_meta_models() -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_parallel(dp_shard=world, ep=world).ep_mesh
    plan = ParallelPlan({"layers.*.up.weight": (Shard(0),), "head.weight": (Shard(1),)})
    torch.manual_seed(0)
    model = TinyLM()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    applied = plan.apply(model, mesh)
    assert set(applied) == {
        "layers.0.up.weight",
        "layers.1.up.weight",
        "layers.2.up.weight",
        "head.weight",
    }
    for name, param in model.named_parameters():
        if name in applied:
            assert isinstance(param, DTensor) and param.requires_grad
            dim = applied[name][0].dim
            local = original[name].tensor_split(world, dim)[rank]
            assert torch.equal(param.to_local().cpu(), local)  # the mesh's device
            assert torch.equal(full_tensor(param).cpu(), original[name])
        else:
            assert not isinstance(param, DTensor)

    with torch.device("meta"):
        meta = TinyLM()
    plan.apply(meta, mesh)
    assert meta.head.weight.to_local().is_meta and meta.head.weight.shape == (32, 16)

    with pytest.raises(ValueError, match="2 placements for a 1-D mesh"):
        ParallelPlan({"embed.weight": (Shard(0), Shard(1))}).apply(TinyLM(), mesh)


def test_apply_shards_real_and_meta_models():
    run_distributed(_apply_shards_real_and_meta_models, 2)
