"""HF safetensors export of a sharded model: one file, or numbered shards + index."""

from __future__ import annotations

import json

import torch
from _tiny_model import TinyLM
from safetensors.torch import load_file

from loom.dist.export import export_safetensors, plan_shards
from loom.dist.fsdp import apply_fsdp, mixed_precision
from loom.dist.loading import INDEX_NAME, load_targets
from loom.dist.mesh import init_parallel
from loom.dist.testing import run_distributed


def test_plan_shards_fills_in_order_and_isolates_big_tensors():
    tensors = {
        "a": torch.zeros(10),
        "b": torch.zeros(10),
        "big": torch.zeros(100),
        "c": torch.zeros(5),
    }
    assert plan_shards(tensors, 80) == [["a", "b"], ["big"], ["c"]]
    assert plan_shards(tensors, 80, torch.bfloat16) == [["a", "b"], ["big"], ["c"]]
    assert plan_shards(tensors, 10**6) == [["a", "b", "big", "c"]]
    ints = {"ids": torch.zeros(10, dtype=torch.int64), "w": torch.zeros(10)}
    assert plan_shards(ints, 60, torch.bfloat16) == [["ids"], ["w"]]  # ints keep 8 bytes


def _export_sharded_model(out: str) -> dict[str, torch.Tensor]:
    state = init_parallel()
    torch.manual_seed(0)
    model = TinyLM().to(state.device)
    full = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
    apply_fsdp(model, model.layers, state.fsdp_mesh, mixed_precision(torch.device("cpu")))
    export_safetensors(load_targets(model), out + "/sharded", max_shard_bytes=4096)
    paths = export_safetensors(load_targets(model), out + "/sharded", dtype=torch.bfloat16)
    assert [p.name for p in paths] == ["model.safetensors"]
    return full


def test_export_from_two_ranks(tmp_path):
    full = run_distributed(_export_sharded_model, 2, str(tmp_path))[0]
    out = tmp_path / "sharded"
    # The second export (bf16, one file) replaced the first one's shards and index.
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    exported = load_file(out / "model.safetensors")
    assert exported.keys() == full.keys()
    for key, value in full.items():
        assert exported[key].dtype == torch.bfloat16
        assert torch.equal(exported[key], value.to(torch.bfloat16)), key


def _export_many_shards(out: str) -> None:
    state = init_parallel()
    torch.manual_seed(0)
    model = TinyLM().to(state.device)
    apply_fsdp(model, model.layers, state.fsdp_mesh, mixed_precision(torch.device("cpu")))
    export_safetensors(load_targets(model), out, max_shard_bytes=4096)


def test_sharded_export_writes_an_index(tmp_path):
    run_distributed(_export_many_shards, 2, str(tmp_path))
    torch.manual_seed(0)
    full = TinyLM().state_dict()
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    count = len(files)
    assert count > 2 and files == [
        f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)
    ]
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in full.values())
    assert not list(tmp_path.glob("*.tmp"))
    loaded = {}
    for name in files:
        part = load_file(tmp_path / name)
        assert all(index["weight_map"][k] == name for k in part)
        loaded.update(part)
    assert loaded.keys() == full.keys()
    for key, value in full.items():
        assert torch.equal(loaded[key], value), key
