"""Parallel degrees, meshes and groups: world 1 without a launcher, and world 4."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from loom.dist.mesh import destroy_parallel, init_parallel, resolve_degrees
from loom.dist.testing import run_distributed


def test_single_process_needs_no_launcher(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    state = init_parallel()
    try:
        assert (state.world_size, state.rank, state.dp_size, state.dp_rank) == (1, 0, 1, 0)
        assert (state.sp_size, state.ep_size, state.fsdp_size) == (1, 1, 1)
        assert state.fsdp_mesh.size() == 1 and state.expert_fsdp_mesh.size() == 1
    finally:
        destroy_parallel()
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    ("degrees", "message"),
    [
        ({"dp_shard": 3}, "dp_shard=3 x sp=1 = 3, but the world size is 4"),
        ({"sp": 3}, "world size 4 is not divisible by dp_replicate=1 x sp=3"),
        ({"dp_shard": 2, "sp": 2, "ep": 3}, "ep=3 must divide dp_shard x sp = 2 x 2 = 4"),
        ({"sp": 0}, "sp=0: parallel degrees must be >= 1"),
        ({"dp_shard": 0}, "dp_shard=0: must be >= 1"),
    ],
)
def test_bad_degrees_are_named(degrees, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_degrees(4, **degrees)


def test_auto_dp_shard():
    assert resolve_degrees(8, dp_replicate=2, sp=2, ep=4) == (2, 2, 2, 4)


def _groups_at_world_4() -> None:
    def ranks(group):
        return dist.get_process_group_ranks(group)

    rank = dist.get_rank()
    state = init_parallel(dp_shard=2, sp=2, ep=2)
    # Row-major (dp_shard, sp): the SP ranks of a sequence are neighbours.
    assert ranks(state.sp_group) == [rank // 2 * 2, rank // 2 * 2 + 1]
    assert ranks(state.group("dp_shard")) == [rank % 2, rank % 2 + 2]
    assert (state.dp_size, state.dp_rank, state.sp_rank) == (2, rank // 2, rank % 2)
    assert state.fsdp_size == 4 and ranks(state.fsdp_mesh.get_group()) == [0, 1, 2, 3]
    # ep=2 folded out of dp_shard x sp = 4: the innermost pairs exchange tokens.
    assert ranks(state.ep_group) == [rank // 2 * 2, rank // 2 * 2 + 1]
    assert (state.ep_size, state.ep_rank) == (2, rank % 2)
    assert ranks(state.expert_fsdp_mesh.get_group()) == [rank % 2, rank % 2 + 2]

    hsdp = init_parallel(dp_replicate=2, sp=2, ep=2)
    assert hsdp.fsdp_mesh.mesh_dim_names == ("dp_replicate", "dp_shard_sp")
    assert ranks(hsdp.fsdp_mesh.get_group("dp_shard_sp")) == [rank // 2 * 2, rank // 2 * 2 + 1]
    assert hsdp.expert_fsdp_mesh.mesh_dim_names == ("dp_replicate", "ep_shard")
    assert (hsdp.dp_size, hsdp.dp_rank) == (2, rank // 2)

    wide_ep = init_parallel(dp_shard=4, ep=4)
    assert ranks(wide_ep.ep_group) == [0, 1, 2, 3] and wide_ep.expert_fsdp_mesh.size() == 1


def test_groups_at_world_4():
    run_distributed(_groups_at_world_4, 4)
