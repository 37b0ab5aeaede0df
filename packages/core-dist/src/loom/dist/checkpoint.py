"""Training checkpoints with torch.distributed.checkpoint (DCP), resumable at any world size.

A checkpoint ``<root>/step_<N>/`` holds the model and optimizer (sharded DTensors, so it
loads at any world size), the scheduler and data-loader state and the step (JSON text),
and every rank's RNG states. A weights-only checkpoint (``save_weights``: the model and
step 0, e.g. converted from HF) loads the model and leaves the rest as it starts. It is written to ``<root>/.step_<N>.partial`` and renamed
when every rank has finished, so a crash mid-save leaves the previous checkpoints as they
were; the rename needs ``root`` on a file system every rank sees (one node, or a shared
mount). Non-tensor values are read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import (
    DefaultLoadPlanner,
    FileSystemReader,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

_STEP_DIR = re.compile(r"step_(\d+)")
_METADATA = ".metadata"  # written by DCP last, once every rank's data is on disk


@dataclass(frozen=True)
class Resumed:
    """What ``load_checkpoint`` restored besides the model, optimizer and scheduler."""

    step: int
    data_state: dict[str, Any]
    saved_world_size: int
    rng_restored: bool  # False when this rank did not exist in the saving run
    weights_only: bool = False  # the model alone: optimizer, scheduler, data start afresh


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's planner unpickles non-tensor values with ``weights_only=False``; a checkpoint
    from elsewhere must not be able to run code, so only plain data is accepted."""

    def load_bytes(self, read_item, value) -> None:  # type: ignore[no-untyped-def]
        torch.load(value, weights_only=True)  # raises on anything but plain data
        value.seek(0)
        super().load_bytes(read_item, value)


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step}"


def latest_checkpoint(root: Path) -> Path | None:
    """The complete ``step_<N>`` folder under ``root`` with the highest ``N``, if any."""
    root = Path(root)
    if not root.is_dir():
        return None
    steps = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.fullmatch(p.name)) and (p / _METADATA).is_file()
    ]
    return max(steps)[1] if steps else None


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": json.dumps(random.getstate()),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    data_state: dict[str, Any] | None = None,
    device: torch.device | None = None,
    trainable_only: bool = False,
) -> Path:
    """Save a resumable checkpoint as ``<root>/step_<step>``; every rank calls it.

    ``data_state`` must be JSON-serialisable and the same on every rank (rank 0's copy is
    kept). ``device``: where CUDA RNG state lives, if any. ``trainable_only``: leave the
    frozen parameters out (LoRA: the base comes from its own checkpoint). Returns the
    final folder.
    """
    rank = dist.get_rank()
    final, partial = checkpoint_dir(root, step), Path(root) / f".step_{step}.partial"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # a crashed earlier attempt
        partial.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer, options=_options(trainable_only))
    model_state = _only_trainable(model, model_state) if trainable_only else model_state
    train = {
        "step": step,
        "world_size": dist.get_world_size(),
        "scheduler": json.dumps(scheduler.state_dict() if scheduler is not None else {}),
        "data": json.dumps(data_state or {}),
    }
    state = {"model": model_state, "optim": optim_state, "train": train}
    state[f"rng_rank{rank}"] = _rng_state(device or torch.device("cpu"))
    dcp.save(state, checkpoint_id=partial)
    dist.barrier()
    if rank == 0:
        _replace_dir(partial, final)
    dist.barrier()
    return final


def save_weights(final: Path, model: nn.Module) -> Path:
    """Save the model alone, as a checkpoint of step 0 that ``load_checkpoint`` reads
    (optimizer, scheduler and data start afresh); every rank calls it. Written to a
    temporary sibling and renamed at the end."""
    final = Path(final)
    partial = final.with_name(f".{final.name}.partial")
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    train = {"step": 0, "world_size": dist.get_world_size(), "scheduler": "{}", "data": "{}"}
    dcp.save({"model": get_model_state_dict(model), "train": train}, checkpoint_id=partial)
    dist.barrier()
    if dist.get_rank() == 0:
        _replace_dir(partial, final)
    dist.barrier()
    return final


def _replace_dir(new: Path, final: Path) -> None:
    """Rename ``new`` to ``final``; an existing ``final`` is moved aside first and removed
    only once ``new`` is in place."""
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    device: torch.device | None = None,
    trainable_only: bool = False,
) -> Resumed:
    """Restore a checkpoint saved by ``save_checkpoint``, at any world size.

    The model must be sharded (FSDP, plans) as it will train; the optimizer must be built
    over its parameters. RNG states are restored for the ranks that existed when it was
    saved. Raises ``FileNotFoundError`` when ``path`` is not a complete checkpoint.
    """
    path = Path(path)
    if not (path / _METADATA).is_file():
        raise FileNotFoundError(
            f"{path} is not a complete checkpoint (no {_METADATA}); "
            "latest_checkpoint(root) finds the newest complete one"
        )
    rank = dist.get_rank()
    saved_keys = FileSystemReader(path).read_metadata().state_dict_metadata
    if not any(key.startswith("optim.") for key in saved_keys):
        return _load_weights(path, model, saved_keys)
    options = _options(trainable_only)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    model_state = _only_trainable(model, model_state) if trainable_only else model_state
    train = {"step": 0, "world_size": 0, "scheduler": "", "data": ""}
    state: dict[str, Any] = {"model": model_state, "optim": optim_state, "train": train}
    rng_key = f"rng_rank{rank}"
    rng_template = _rng_template(saved_keys, rng_key)
    if rng_template:
        state[rng_key] = rng_template
    dcp.load(state, checkpoint_id=path, planner=_WeightsOnlyLoadPlanner())
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=options,
    )
    if scheduler is not None:
        scheduler.load_state_dict(json.loads(train["scheduler"]))
    if rng_template:
        _set_rng_state(state[rng_key], device or torch.device("cpu"))
    restored = bool(rng_template)
    return Resumed(train["step"], json.loads(train["data"]), train["world_size"], restored)


def _options(trainable_only: bool) -> StateDictOptions:
    # strict off with the frozen parameters left out: they are absent by design
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def _only_trainable(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """``ignore_frozen_params`` keeps a frozen matrix tied to another under its second
    name (``lm_head.weight``): drop what no trainable parameter is named."""
    trainable = {
        name.replace("_checkpoint_wrapped_module.", "")
        for name, param in model.named_parameters(remove_duplicate=False)
        if param.requires_grad
    }
    return {k: v for k, v in state.items() if k in trainable}


def _load_weights(path: Path, model: nn.Module, saved_keys: dict[str, Any]) -> Resumed:
    model_state = get_model_state_dict(model)
    train = {"step": 0, "world_size": 0, "scheduler": "", "data": ""}
    dcp.load(
        {"model": model_state, "train": train},
        checkpoint_id=path,
        planner=_WeightsOnlyLoadPlanner(),
    )
    set_model_state_dict(model, model_state)
    return Resumed(train["step"], json.loads(train["data"]), train["world_size"], False, True)


def _rng_template(saved: dict[str, Any], rng_key: str) -> dict[str, Any]:
    """Placeholders for this rank's saved RNG entries (empty if this rank saved none)."""
    prefix = f"{rng_key}."
    template: dict[str, Any] = {}
    for key, meta in saved.items():
        if key.startswith(prefix):
            tensor = isinstance(meta, TensorStorageMetadata)
            placeholder = torch.empty(meta.size, dtype=meta.properties.dtype) if tensor else None
            template[key[len(prefix) :]] = placeholder
    return template
