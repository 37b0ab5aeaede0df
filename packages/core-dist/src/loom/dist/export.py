"""HF safetensors export of a (sharded) model: ``model.safetensors``, or numbered shards
plus ``model.safetensors.index.json`` when the model is bigger than one shard.

Tensors are gathered one at a time (``full_tensor``, collectives every rank joins)
and rank 0 writes a shard as soon as it is complete, so rank 0 holds at most one shard
and no rank holds the whole consolidated model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.placement_types import _StridedShard

from loom.dist.loading import INDEX_NAME

DEFAULT_SHARD_BYTES = 5 * 2**30  # HF's default max_shard_size


def _out_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """``dtype`` for floating tensors when given; integer tensors keep theirs."""
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def plan_shards(
    tensors: Mapping[str, torch.Tensor], max_shard_bytes: int, dtype: torch.dtype | None = None
) -> list[list[str]]:
    """Split keys, in order, into shards of at most ``max_shard_bytes`` (a tensor larger
    than that gets a shard of its own). Uses global shapes: no data is touched."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * _out_dtype(tensor, dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a (possibly sharded) tensor, on every rank. One mesh dim at a time:
    a tensor dim sharded over two mesh dims (an expert tensor under FSDP on top of EP,
    ``(_StridedShard(0), Shard(0))``) needs one all-gather per mesh dim, which DTensor's
    ``full_tensor()`` runs too, but in one call that warns it cannot merge them. The
    shard applied last is undone first: FSDP's strided one, then the rest from the last
    mesh dim to the first."""
    if not isinstance(tensor, DTensor):
        return tensor
    placements = list(tensor.placements)
    sharded = [i for i, p in enumerate(placements) if not p.is_replicate()]
    strided = [i for i in sharded if isinstance(placements[i], _StridedShard)]
    for dim in strided + [i for i in reversed(sharded) if i not in strided]:
        placements[dim] = Replicate()
        tensor = tensor.redistribute(placements=placements)
    return tensor.to_local()


def _gather(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    full = full_tensor(tensor)
    return full.detach().to(device="cpu", dtype=_out_dtype(full, dtype)).contiguous()


def _remove_stale(out_dir: Path, keep: set[str]) -> None:
    """Drop an earlier export's shards and index, which would mix with this one."""
    for path in [*out_dir.glob("model*.safetensors"), out_dir / INDEX_NAME]:
        if path.name not in keep and path.is_file():
            path.unlink()


def export_safetensors(
    tensors: Mapping[str, torch.Tensor],
    out_dir: Path,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    dtype: torch.dtype | None = None,
) -> list[Path]:
    """Write ``tensors`` (plain or DTensors; e.g. ``loading.load_targets(model)``) as HF
    safetensors under ``out_dir``; every rank calls it, rank 0 writes.

    Files are written under temporary names and renamed once all exist; the index comes
    last. ``dtype`` casts floating tensors (e.g. ``torch.bfloat16``). Returns the paths of
    the shard files.
    """
    out_dir = Path(out_dir)
    write = not dist.is_initialized() or dist.get_rank() == 0
    shards = plan_shards(tensors, max_shard_bytes, dtype)
    names = shard_names(len(shards))
    if write:
        out_dir.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for keys, name in zip(shards, names, strict=True):
        part = {}
        for key in keys:
            full = _gather(tensors[key], dtype)  # collective: every rank gathers
            if write:
                part[key] = full
        if write:
            save_file(part, out_dir / f"{name}.tmp", metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(keys, name))
    paths = [out_dir / name for name in names]
    if write:
        _remove_stale(out_dir, set(names))
        for path in paths:
            os.replace(f"{path}.tmp", path)
        if len(paths) > 1:
            total = sum(t.numel() * _out_dtype(t, dtype).itemsize for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    if dist.is_initialized():
        dist.barrier()
    return paths
