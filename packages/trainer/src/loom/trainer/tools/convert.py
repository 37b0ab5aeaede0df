"""``loom convert``: a Loom training checkpoint to an HF folder, and an HF folder to a Loom
checkpoint to start a run from.

``dcp_to_hf`` streams: it reads the checkpoint's metadata and the model's shapes (the
model is built on the meta device, so no weight is allocated), plans the HF shards as
the trainer's export does, and fills one output shard at a time, reading from DCP only
the tensors that shard needs and converting them through the port's ``to_hf`` (stacked
experts to the Hub's per-expert layout). Peak host memory is about one output shard plus
the largest tensor, whatever the world size the checkpoint was saved at. Under torchrun
the ranks write different shards. The files are those the trainer's ``hf/`` export
writes, byte for byte.

``hf_to_dcp`` builds the model as the trainer does (FSDP over the ranks, weights read
through the port's renames and converter: each rank holds its shard) and saves it as a
weights-only checkpoint of step 0 (``loom.dist.checkpoint.save_weights``);
``checkpoint.resume: DST`` starts a run from it with a fresh optimizer and data order.

Both write to a temporary sibling of DST and rename it at the end; an existing DST is
refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader, TensorStorageMetadata
from torch.distributed.checkpoint.api import CheckpointException

from loom.dist.export import DEFAULT_SHARD_BYTES, plan_shards, shard_names
from loom.dist.loading import INDEX_NAME, load_targets
from loom.trainer.errors import ConfigError
from loom.trainer.export import export_config, export_dtype

_METADATA = ".metadata"


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}  # fmt: skip


def parse_size(text: str) -> int:
    """``5GB``, ``200MiB``, ``1048576``: bytes (HF's units: GB = 10**9, GiB = 2**30)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match and match[2].upper()
    if not match or unit not in _UNITS or float(match[1]) <= 0:
        raise ConfigError(f"--max-shard-size {text!r}: expected a size such as 5GB or 200MiB")
    return int(float(match[1]) * _UNITS[unit])


def _partial(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.partial")


def refuse_existing(dst: Path) -> None:
    if dst.exists():
        raise ConfigError(f"{dst} exists: convert writes a new folder (remove it or pick another)")


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def saved_tensors(checkpoint: Path) -> dict[str, TensorStorageMetadata]:
    """The model tensors a Loom checkpoint holds (name -> shape and dtype)."""
    if not (checkpoint / _METADATA).is_file():
        raise ConfigError(f"{checkpoint} is not a Loom checkpoint (no {_METADATA} in it)")
    try:
        metadata = FileSystemReader(checkpoint).read_metadata()
    except Exception as err:  # a damaged metadata file: pickle, EOF, ...
        raise ConfigError(f"{checkpoint / _METADATA}: cannot read it: {err}") from None
    for name in sorted({item.relative_path for item in metadata.storage_data.values()}):
        if not (checkpoint / name).is_file():
            raise ConfigError(f"{checkpoint} lacks {name}, which its {_METADATA} names")
    return {
        key.removeprefix("model."): meta
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }


def run_model_path(checkpoint: Path) -> Path:
    """The model folder a run started from: ``model.path`` in its ``config.yaml``, two
    levels above ``checkpoints/step_<N>``."""
    config = checkpoint.resolve().parent.parent / "config.yaml"
    if not config.is_file():
        raise ConfigError(
            f"no config.yaml in {config.parent} to tell the model folder of {checkpoint}: "
            "pass --model with the HF folder the run started from"
        )
    return Path(yaml.safe_load(config.read_text())["model"]["path"])


def _model_on_meta(model_path: Path, attn_implementation: str = "eager"):
    from loom.trainer.model import build_model

    if not (model_path / "config.json").is_file():
        raise ConfigError(f"{model_path} has no config.json: not an HF model folder")
    return build_model(model_path, attn_implementation, meta=True)


def _check_shapes(checkpoint: Path, model_path: Path, saved: dict, targets: dict) -> None:
    missing = [k for k in targets if k not in saved]
    if missing:
        raise ConfigError(
            f"{checkpoint} lacks {len(missing)} tensors of the model in {model_path} "
            f"(another model's checkpoint?), e.g. {missing[0]!r}"
        )
    for key, target in targets.items():
        if tuple(saved[key].size) != tuple(target.shape):
            raise ConfigError(
                f"{checkpoint}: {key!r} is {tuple(saved[key].size)} but "
                f"{model_path / 'config.json'} makes it {tuple(target.shape)}"
            )


def _read(checkpoint: Path, keys: list[str], saved: dict) -> dict[str, torch.Tensor]:
    """Whole tensors ``keys`` from the checkpoint: DCP reads only their chunks."""
    state = {
        f"model.{k}": torch.empty(tuple(saved[k].size), dtype=saved[k].properties.dtype)
        for k in keys
    }
    try:
        with warnings.catch_warnings():  # "assuming ... a single process": as meant
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=checkpoint, no_dist=True)
    except (Exception, CheckpointException) as err:  # a missing or truncated .distcp file
        raise ConfigError(f"{checkpoint}: cannot read {keys[0]!r}: {_cause(err)}") from None
    return {k: state[f"model.{k}"] for k in keys}


def _cause(err: BaseException) -> str:
    """DCP wraps a rank's error (with its traceback) in a ``CheckpointException``."""
    for failure in getattr(err, "failures", {}).values():
        failure = failure[0] if isinstance(failure, tuple) else failure
        return f"{type(failure).__name__}: {failure}"
    return str(err)


def dcp_to_hf(
    checkpoint: Path,
    dst: Path,
    model: Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write ``checkpoint``'s model as an HF folder ``dst``; ``model``: the HF folder the
    run started from (its config, tokenizer or processor), by default the run's."""
    from loom.models.registry import model_type, port_hooks

    checkpoint, dst = Path(checkpoint), Path(dst)
    refuse_existing(dst)
    saved = saved_tensors(checkpoint)
    model_path = Path(model) if model is not None else run_model_path(checkpoint)
    built = _model_on_meta(model_path)
    targets = load_targets(built)  # a tied matrix once, as HF writes it
    _check_shapes(checkpoint, model_path, saved, targets)
    config = export_config(built.config, model_path)
    dtype = export_dtype(config)
    to_hf = port_hooks(model_type(built.config)).to_hf or dict
    outputs = {key: list(to_hf({key: t}).items()) for key, t in targets.items()}
    source = {name: key for key, outs in outputs.items() for name, _ in outs}
    hf_tensors = {n: t for outs in outputs.values() for n, t in outs}
    shards = plan_shards(hf_tensors, max_shard_bytes, dtype)
    names = shard_names(len(shards))
    rank, world = _rank_world()
    partial = _partial(dst)
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    try:
        for i, (keys, name) in enumerate(zip(shards, names, strict=True)):
            if i % world == rank:
                needed = list(dict.fromkeys(source[k] for k in keys))
                converted = to_hf(_read(checkpoint, needed, saved))
                part = {k: _cast(converted[k], dtype).contiguous() for k in keys}
                save_file(part, partial / name, metadata={"format": "pt"})
        _barrier()
        if rank == 0:
            if len(names) > 1:
                _write_index(partial, shards, names, hf_tensors, dtype)
            _write_companions(built, config, model_path, partial)
            os.replace(partial, dst)
    except BaseException:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    _barrier()
    return dst


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _write_index(out: Path, shards, names, tensors: dict, dtype) -> None:
    """The index the trainer's export writes (``loom.dist.export``)."""
    sizes = {n: t.numel() * _cast(t, dtype).dtype.itemsize for n, t in tensors.items()}
    weight_map = {key: name for keys, name in zip(shards, names, strict=True) for key in keys}
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _write_companions(built, config, model_path: Path, out: Path) -> None:
    """Config, generation config and tokenizer (a VLM's processor), as the export does."""
    from loom.models.registry import is_vision_language
    from loom.trainer.data.multimodal import load_processor
    from loom.trainer.model import load_tokenizer

    config.save_pretrained(out)
    if getattr(built, "generation_config", None) is not None:
        built.generation_config.save_pretrained(out)
    vlm = is_vision_language(built.config)
    (load_processor(model_path) if vlm else load_tokenizer(model_path)).save_pretrained(out)


def hf_to_dcp(src: Path, dst: Path) -> Path:
    """Write the HF folder ``src``'s weights as a Loom checkpoint ``dst`` (step 0, weights
    only), sharded over the ranks when run under torchrun."""
    from loom.dist.checkpoint import save_weights
    from loom.dist.loading import CheckpointError, materialize
    from loom.dist.mesh import destroy_parallel, init_parallel
    from loom.models.registry import load_weights
    from loom.trainer.config import MemoryConfig, ParallelConfig
    from loom.trainer.model import has_weights
    from loom.trainer.parallelize import parallelize

    src, dst = Path(src), Path(dst)
    refuse_existing(dst)
    if not has_weights(src):
        raise ConfigError(f"{src} holds no safetensors weights")
    owned = not dist.is_initialized()
    parallel = init_parallel()
    try:
        built = _model_on_meta(src, "eager")  # any family builds with eager; weights alike
        parallelize(built, parallel, memory=MemoryConfig(), parallel_config=ParallelConfig())
        materialize(built, parallel.device, init=lambda model: None)
        try:
            load_weights(built, src)
        except CheckpointError as err:
            raise ConfigError(f"{src}: {err}") from None
        return save_weights(dst, built)
    finally:
        if owned:
            destroy_parallel()
