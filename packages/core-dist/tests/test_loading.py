"""Meta init, materialisation and streaming HF safetensors loading: values, converter
hook, error reports, and the memory bound (4 ranks each read only their shards)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _tiny_model import TinyLM
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import Shard

from loom.dist._safetensors_file import SafetensorsFile
from loom.dist.export import export_safetensors, full_tensor
from loom.dist.fsdp import apply_fsdp, mixed_precision
from loom.dist.loading import CheckpointError, load_safetensors, load_targets, materialize
from loom.dist.mesh import init_parallel
from loom.dist.plan import ParallelPlan
from loom.dist.testing import run_distributed

LAYERS, WIDTH = 32, 1024  # the memory test's model: 32 x 4 MiB = 128 MiB of fp32
EXPERTS = 4


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS))


class WithExperts(nn.Module):
    """Experts stacked on dim 0, as EP shards them; HF checkpoints store them one by one."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.experts = nn.Parameter(torch.randn(EXPERTS, 6, 4))


class StackExperts:
    """Converter: ``experts.<e>.weight`` ``[6, 4]`` each -> ``experts`` ``[E, 6, 4]``."""

    def __init__(self) -> None:
        self.parts: dict[int, torch.Tensor] = {}

    def can_handle(self, key: str) -> bool:
        return re.fullmatch(r"experts\.\d+\.weight", key) is not None

    def convert(self, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        self.parts[int(key.split(".")[1])] = tensor
        if len(self.parts) < EXPERTS:
            return []
        stacked = torch.stack([self.parts.pop(e) for e in range(EXPERTS)])
        return [("experts", stacked)]

    def finalize(self) -> None:
        if self.parts:
            raise ValueError(f"experts {sorted(self.parts)} arrived without their siblings")


def _hf_experts_checkpoint(model: WithExperts, path: Path, drop: int | None = None) -> None:
    tensors = {"proj.weight": model.proj.weight, "proj.bias": model.proj.bias}
    for e in range(EXPERTS):
        if e != drop:
            tensors[f"experts.{e}.weight"] = model.experts[e]
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, path)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_single_file_and_sharded_index_load_the_same_values(tmp_path):
    torch.manual_seed(0)
    source = TinyLM()
    save_file(_state(source), tmp_path / "model.safetensors")
    sharded = tmp_path / "sharded"
    export_safetensors(load_targets(source), sharded, max_shard_bytes=4096)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    for path in (tmp_path / "model.safetensors", sharded):
        with torch.device("meta"):
            model = TinyLM()
        materialize(model, torch.device("cpu"))
        report = load_safetensors(model, path)
        assert sorted(report.loaded) == sorted(source.state_dict())
        for name, value in model.state_dict().items():
            assert torch.equal(value, source.state_dict()[name]), name


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.float8_e4m3fn]
)
def test_reader_returns_any_region_of_any_dtype(tmp_path, dtype):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "cube": torch.randn(5, 6, 7, generator=generator),
        "matrix": torch.randn(4, 9, generator=generator),
        "scalar": torch.tensor(3.5),
    }
    tensors = {k: (v * 4).to(dtype) for k, v in tensors.items()}
    save_file(tensors, tmp_path / "t.safetensors")
    regions = {
        "cube": [
            (slice(1, 3), slice(0, 6), slice(0, 7)),  # whole trailing dims: one read
            (slice(0, 5), slice(2, 5), slice(0, 7)),  # Shard(1)
            (slice(2, 4), slice(1, 6), slice(3, 4)),  # Shard on every dimension
            (slice(0, 0), slice(0, 6), slice(0, 7)),  # an empty shard
        ],
        "matrix": [(slice(0, 4), slice(5, 9))],
        "scalar": [()],
    }
    with SafetensorsFile(tmp_path / "t.safetensors") as f:
        assert f.tensors["cube"].shape == (5, 6, 7) and f.tensors["cube"].dtype == dtype
        for key, cases in regions.items():
            assert torch.equal(f.read(key), tensors[key])
            for region in cases:
                assert torch.equal(f.read(key, region), tensors[key][region]), (key, region)


def test_truncated_file_names_file_and_tensor(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_state(TinyLM()), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: tensor '[\w.]+' ends at .*truncated"
    ):
        load_safetensors(TinyLM(), path)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=r"not a safetensors file, or truncated \(5 bytes"):
        load_safetensors(TinyLM(), path)
    path.write_bytes(data[:20])
    with pytest.raises(CheckpointError, match="truncated"):
        load_safetensors(TinyLM(), path)


def test_errors_list_unexpected_mismatched_and_missing_keys(tmp_path):
    state = _state(TinyLM())
    state["head.weight"] = torch.zeros(3, 3)
    state["extra.weight"] = torch.zeros(1)
    del state["layers.1.up.bias"]
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError) as error:
        load_safetensors(TinyLM(), tmp_path / "bad.safetensors")
    message = str(error.value)
    assert "head.weight: checkpoint (3, 3) vs model (32, 16)" in message
    assert "1 unexpected keys: extra.weight" in message

    del state["head.weight"], state["extra.weight"]
    save_file(state, tmp_path / "short.safetensors")
    with pytest.raises(ValueError, match=r"2 missing keys .*: head.weight, layers.1.up.bias"):
        load_safetensors(TinyLM(), tmp_path / "short.safetensors")
    report = load_safetensors(
        TinyLM(), tmp_path / "short.safetensors", allow_missing=["head.weight", "layers.1.up.bias"]
    )
    assert "head.weight" not in report.loaded


def test_index_naming_a_missing_file_is_an_error(tmp_path):
    weight_map = {"embed.weight": "model-00001-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"lists model-00001-of-00002\.safetensors"):
        load_safetensors(TinyLM(), tmp_path)
    save_file({"head.weight": torch.zeros(32, 16)}, tmp_path / "model-00001-of-00002.safetensors")
    with pytest.raises(ValueError, match=r"lacks 'embed\.weight', which model\.safetensors\.index"):
        load_safetensors(TinyLM(), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: no \*\.safetensors files"):
        load_safetensors(TinyLM(), tmp_path / "empty")
    with pytest.raises(CheckpointError, match=r"checkpoint .*/elsewhere does not exist"):
        load_safetensors(TinyLM(), tmp_path / "elsewhere")


def test_converter_stacks_experts_and_finalize_reports_leftovers(tmp_path):
    source = WithExperts()
    _hf_experts_checkpoint(source, tmp_path / "ok.safetensors")
    model = WithExperts()
    load_safetensors(model, tmp_path / "ok.safetensors", StackExperts())
    assert torch.equal(model.experts, source.experts)
    _hf_experts_checkpoint(source, tmp_path / "short.safetensors", drop=2)
    with pytest.raises(ValueError, match=r"experts \[0, 1, 3\] arrived without their siblings"):
        load_safetensors(WithExperts(), tmp_path / "short.safetensors", StackExperts())
    with pytest.raises(
        ValueError, match=r"4 unexpected keys: experts\.0\.weight; experts\.1\.weight"
    ):
        load_safetensors(WithExperts(), tmp_path / "ok.safetensors")


def _memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _peak_since_reset_kib() -> tuple[int, int]:
    """``(VmHWM, VmRSS)`` in KiB, then restart the peak counter at the current RSS."""
    peak, now = _memory_kib("VmHWM"), _memory_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    return peak, now


def _sharded_load_stays_below_model_size(checkpoint: str, experts_checkpoint: str) -> dict:
    state = init_parallel(ep=dist.get_world_size())
    _, start = _peak_since_reset_kib()
    with torch.device("meta"):
        model = Stack()
    apply_fsdp(model, model.layers, state.fsdp_mesh, mixed_precision(torch.device("cpu")))
    materialize(model, state.device)
    init_peak, loading_start = _peak_since_reset_kib()
    report = load_safetensors(model, Path(checkpoint))
    load_peak, _ = _peak_since_reset_kib()
    for file in sorted(Path(checkpoint).glob("*.safetensors")):
        with SafetensorsFile(file) as f:
            for key in f.tensors:
                loaded = full_tensor(model.get_parameter(key)).cpu()
                assert torch.equal(loaded, f.read(key)), key

    with torch.device("meta"):
        moe = WithExperts()
    ParallelPlan({"experts": (Shard(0),)}).apply(moe, state.ep_mesh)
    materialize(moe, state.device)
    load_safetensors(moe, Path(experts_checkpoint), StackExperts())
    assert moe.experts.to_local().shape[0] == EXPERTS // dist.get_world_size()
    return {
        "path_peak_kib": max(init_peak, load_peak) - start,
        "load_peak_kib": load_peak - loading_start,
        "bytes_read": report.bytes_read,
        "experts": full_tensor(moe.experts).cpu(),
    }


def test_sharded_load_peak_memory_per_rank_is_a_fraction_of_the_model(tmp_path):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to measure peak memory")
    torch.manual_seed(0)
    model = Stack()
    export_safetensors(
        load_targets(model), tmp_path / "hf", max_shard_bytes=LAYERS // 4 * WIDTH**2 * 4
    )
    experts = WithExperts()
    _hf_experts_checkpoint(experts, tmp_path / "experts.safetensors")
    model_kib = LAYERS * WIDTH * WIDTH * 4 // 1024
    del model
    results = run_distributed(
        _sharded_load_stays_below_model_size,
        4,
        str(tmp_path / "hf"),
        str(tmp_path / "experts.safetensors"),
    )
    print(
        "peak KiB per rank (whole path, loading):",
        [(r["path_peak_kib"], r["load_peak_kib"]) for r in results],
        "model",
        model_kib,
    )
    for rank, result in enumerate(results):
        assert result["bytes_read"] == model_kib * 1024 // 4, (
            f"rank {rank} read {result['bytes_read']} bytes"
        )
        # Build + shard + materialise + load: the rank's quarter (32 MiB), ~10 MiB of
        # runtime overhead and transients; a rank that ever held the whole model would
        # be at 128 MiB or more.
        assert result["path_peak_kib"] < model_kib // 2, (
            f"rank {rank}: building and loading raised RSS by {result['path_peak_kib']} KiB, "
            f"the whole model is {model_kib} KiB"
        )
        # Loading alone: plain reads of the rank's bytes (a memory-mapped reader: >= 1/8).
        assert result["load_peak_kib"] < model_kib // 8, (
            f"rank {rank}: loading alone raised RSS by {result['load_peak_kib']} KiB"
        )
        assert torch.equal(result["experts"], experts.experts.detach())
