"""Model init on the meta device and streaming of HF safetensors weights into it.

The order (DESIGN.md step 4): build the model under ``meta_parameters()``, apply the
parallel plan and FSDP, ``materialize`` (``to_empty`` + init: each rank allocates only
its shards), then ``load_safetensors``. Loading opens one safetensors file at a time and
reads, for every parameter, only the bytes of this rank's shard (plain reads, no memory
map), so no rank ever holds the full model. Tensors that go through a
``TensorConverter`` are read whole, one at a time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from loom.dist._safetensors_file import CheckpointError, SafetensorsFile

INDEX_NAME = "model.safetensors.index.json"
_SHOWN = 20  # keys listed per kind of problem in an error


class TensorConverter(Protocol):
    """Per-model translation of HF checkpoint tensors to the model's own layout
    (for example per-expert ``w1``/``w3`` stacked into one ``[experts, ...]`` tensor)."""

    def can_handle(self, key: str) -> bool:
        """True for checkpoint keys this converter consumes."""
        ...

    def convert(self, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Take one checkpoint tensor; return the model tensors it completes (possibly
        none yet, when it buffers until all the parts of a model tensor have arrived)."""
        ...

    def finalize(self) -> None:
        """Raise if parts are still buffered (the checkpoint lacked their siblings)."""
        ...


@dataclass
class LoadReport:
    """What ``load_safetensors`` did: model keys filled and bytes read on this rank."""

    loaded: list[str] = field(default_factory=list)
    bytes_read: int = 0


@contextmanager
def meta_parameters() -> Iterator[None]:
    """Build modules with their parameters on the meta device and their buffers computed.

    Buffers (rotary frequencies, embedding scales, masks) are computed at construction
    and are often not in checkpoints: under ``torch.device("meta")`` their values would
    be lost, and a module that only its own constructor knows how to fill (an embedding
    scaled by a constant) would silently compute with garbage. Each parameter is moved
    to meta as it is registered, so its CPU storage is never touched.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            attrs = dict(param.__dict__)
            meta = type(param)(param.to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(attrs)
            module._parameters[name] = meta

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def materialize(
    model: nn.Module, device: torch.device, init: Callable[[nn.Module], None] | None = None
) -> nn.Module:
    """Allocate a meta-device model on ``device`` (only each rank's shards) and initialise it.

    Buffers that hold values (built under ``meta_parameters``) keep them. ``init(model)``
    fills the rest; by default every submodule's ``reset_parameters()`` runs. A parameter
    shared by several modules (tied embeddings) stays one parameter: ``to_empty`` would
    give each module its own copy where FSDP has not already made them one.
    """
    kept = {name: buf for name, buf in model.named_buffers() if not buf.is_meta}
    shared: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            shared.setdefault(id(param), []).append((module, name))
    model.to_empty(device=device)
    for (first, first_name), *others in (users for users in shared.values() if len(users) > 1):
        for module, name in others:
            setattr(module, name, getattr(first, first_name))
    with torch.no_grad():
        for name, buf in kept.items():
            model.get_buffer(name).copy_(buf)
        if init is not None:
            init(model)
        else:
            for module in model.modules():
                if callable(getattr(module, "reset_parameters", None)):
                    module.reset_parameters()
    return model


def checkpoint_files(path: Path) -> dict[Path, list[str]]:
    """The safetensors files of an HF checkpoint and the keys each should hold.

    ``path``: a ``.safetensors`` file, or a directory with ``model.safetensors.index.json``
    (sharded) or with safetensors files. Raises ``CheckpointError`` naming what is missing.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_file():
        return {path: _file_keys(path)}
    index = path / INDEX_NAME
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files: dict[Path, list[str]] = {}
        for key, name in weight_map.items():
            files.setdefault(path / name, []).append(key)
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{index} lists {file.name}, which does not exist")
        return files
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{path}: no *.safetensors files and no {INDEX_NAME}")
    return {file: _file_keys(file) for file in found}


def _file_keys(file: Path) -> list[str]:
    with SafetensorsFile(file) as f:
        return list(f.tensors)


def load_targets(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and persistent buffers a checkpoint fills, tied ones once."""
    targets: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            targets[name] = tensor
    return targets


def _local_region(target: torch.Tensor) -> tuple[slice, ...]:
    """The part of the global tensor this rank stores (all of it unless a DTensor)."""
    if not isinstance(target, DTensor):
        return tuple(slice(0, n) for n in target.shape)
    (chunk,) = target.__create_chunk_list__()  # what torch.distributed.checkpoint reads
    return tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes, strict=True))


def fill_from_full(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of the whole tensor ``full`` into ``target`` (plain or a
    DTensor shard)."""
    _fill(target, full[_local_region(target)])


def add_from_full(target: torch.Tensor, full: torch.Tensor) -> None:
    """Add this rank's part of the whole tensor ``full`` to ``target``, in place."""
    local = target.to_local() if isinstance(target, DTensor) else target
    with torch.no_grad():
        local.add_(full[_local_region(target)].to(local.dtype))


def _fill(target: torch.Tensor, part: torch.Tensor) -> None:
    local = target.to_local() if isinstance(target, DTensor) else target
    with torch.no_grad():
        local.copy_(part)


def _problems(mismatched: list[str], unexpected: list[str], missing: list[str]) -> str:
    lines = []
    for kind, keys in (("shape mismatches", mismatched), ("unexpected keys", unexpected)):
        if keys:
            shown = "; ".join(keys[:_SHOWN]) + ("; ..." if len(keys) > _SHOWN else "")
            lines.append(f"{len(keys)} {kind}: {shown}")
    if missing:
        shown = ", ".join(missing[:_SHOWN]) + (", ..." if len(missing) > _SHOWN else "")
        lines.append(f"{len(missing)} missing keys (in the model, not in the checkpoint): {shown}")
    return ". ".join(lines)


def renamer(renames: Iterable[tuple[str, str]]) -> Callable[[str], str]:
    """Checkpoint key -> model key: each of ``renames`` (regex, replacement) in turn, on
    what the ones before made of the key."""
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in renames]

    def rename(key: str) -> str:
        for pattern, replacement in compiled:
            key = pattern.sub(replacement, key, count=1)
        return key

    return rename


def _check_headers(
    path: Path,
    files: dict[Path, list[str]],
    targets: dict[str, torch.Tensor],
    converter: TensorConverter | None,
    rename: Callable[[str], str],
) -> None:
    """Refuse, before reading any data, keys the model lacks and shapes that differ."""
    mismatched, unexpected = [], []
    for file, keys in files.items():
        with SafetensorsFile(file) as f:
            for key in keys:
                if key not in f.tensors:
                    raise CheckpointError(f"{file} lacks {key!r}, which {INDEX_NAME} places there")
                name = rename(key)
                if converter is not None and converter.can_handle(name):
                    continue
                if name not in targets:
                    unexpected.append(key)
                    continue
                shape = f.tensors[key].shape
                if shape != tuple(targets[name].shape):
                    mismatched.append(
                        f"{key}: checkpoint {shape} vs model {tuple(targets[name].shape)}"
                    )
    if mismatched or unexpected:
        raise CheckpointError(
            f"{path} does not fit the model (saved from another config?): "
            f"{_problems(mismatched, unexpected, [])}"
        )


def load_safetensors(
    model: nn.Module,
    path: Path,
    converter: TensorConverter | None = None,
    allow_missing: Iterable[str] = (),
    renames: Iterable[tuple[str, str]] = (),
) -> LoadReport:
    """Fill ``model``'s parameters and persistent buffers from an HF safetensors checkpoint.

    Every rank calls it (no collectives: each reads its own shards). Keys the model lacks,
    shape mismatches and model keys the checkpoint lacks (other than ``allow_missing``,
    exact names), like unreadable or truncated files, raise ``CheckpointError`` (a
    ``ValueError``) naming them. ``converter`` handles the checkpoint
    keys whose layout differs from the model's; ``renames`` (regex, replacement) map
    checkpoint keys saved under older module names (a port's ``renames``) first.
    """
    path = Path(path)
    files = checkpoint_files(path)
    targets = load_targets(model)
    rename = renamer(renames)
    _check_headers(path, files, targets, converter, rename)
    report = LoadReport()
    for file, keys in files.items():
        with SafetensorsFile(file) as f:
            for key in keys:
                name = rename(key)
                if converter is not None and converter.can_handle(name):
                    whole = f.read(key)
                    report.bytes_read += whole.nbytes
                    for converted, tensor in converter.convert(name, whole):
                        _fill_converted(targets, converted, tensor, key, report)
                    continue
                part = f.read(key, _local_region(targets[name]))  # only this rank's shard
                _fill(targets[name], part)
                report.loaded.append(name)
                report.bytes_read += part.nbytes
    if converter is not None:
        converter.finalize()
    missing = sorted(set(targets) - set(report.loaded) - set(allow_missing))
    if missing:
        raise CheckpointError(f"{path}: {_problems([], [], missing)}")
    return report


def _fill_converted(
    targets: dict[str, torch.Tensor],
    name: str,
    tensor: torch.Tensor,
    source: str,
    report: LoadReport,
) -> None:
    if name not in targets:
        raise CheckpointError(f"converter turned {source!r} into {name!r}, which the model lacks")
    target = targets[name]
    if tuple(tensor.shape) != tuple(target.shape):
        raise CheckpointError(
            f"converter turned {source!r} into {name!r} of shape {tuple(tensor.shape)}, "
            f"but the model's is {tuple(target.shape)}"
        )
    _fill(target, tensor[_local_region(target)])
    report.loaded.append(name)
