"""``loom truncate``: the first N decoder layers of an HF checkpoint folder, as a new
folder that ``from_pretrained`` loads: a real model small enough to test and debug with.

The config is rewritten: ``num_hidden_layers`` and the lists that hold one entry per
layer or layer numbers (a vision-language model's in ``text_config``). A vision-language
model keeps its whole vision tower unless ``vision_layers`` is given. Tensors are
streamed, one at a time, from the source's safetensors into output shards no larger than
the source's largest file, so at most one output shard is in memory. Everything else in
the folder (tokenizer, processor, generation config) is copied. The result is written
under a temporary sibling name and renamed once complete: an interrupted run leaves no
half-written ``DST``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from loom.dist.loading import INDEX_NAME, CheckpointError, checkpoint_files
from loom.trainer.errors import ConfigError

# Lists with one entry per decoder layer: the first N entries are kept.
PER_LAYER = ("layer_types", "no_rope_layers")
# Lists of decoder layer numbers (``decoder_sparse_step`` needs nothing: it counts from 0).
LAYER_NUMBERS = ("mlp_only_layers",)
# Lists of vision block numbers. A deepstack index also names a merger: the list's position.
VISION_NUMBERS = ("deepstack_visual_indexes", "fullatt_block_indexes")
# Files not copied: the weights (rewritten here) and any other format's copy of them.
WEIGHT_SUFFIXES = (".safetensors", ".index.json", ".bin", ".pt", ".pth", ".ckpt", ".h5",
                    ".msgpack", ".gguf")  # fmt: skip

_VISION = re.compile(r"(?:^|\.)(?:visual|vision_tower|vision_model)\.")
_TEXT_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_VISION_BLOCK = re.compile(r"(?:^|\.)(?:blocks|layers)\.(\d+)\.")
_MERGER = re.compile(r"(?<=deepstack_merger_list\.)\d+(?=\.)")


@dataclass(frozen=True)
class Truncated:
    path: Path
    layers: int
    of_layers: int
    tensors: int
    shards: int

    def __str__(self) -> str:
        return (
            f"wrote {self.path}: {self.layers} of {self.of_layers} decoder layers, "
            f"{self.tensors} tensors in {self.shards} safetensors file(s)"
        )


def read_config(src: Path) -> dict:
    path = src / "config.json"
    if not src.is_dir():
        raise ConfigError(f"{src} is not a folder: give an HF checkpoint folder")
    if not path.is_file():
        raise ConfigError(f"{src} has no config.json: not an HF checkpoint folder")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None


def _text_configs(config: dict) -> list[dict]:
    """The dicts that hold the text decoder's settings: a VLM's ``text_config``, and the
    top level where a causal LM (or an older, flat VLM config) keeps them."""
    found = [c for c in (config.get("text_config"), config) if isinstance(c, dict)]
    return [c for c in found if "num_hidden_layers" in c]


def _check_count(name: str, value: int, total: int, where: str) -> None:
    if not 1 <= value <= total:
        raise ConfigError(f"{name} {value}: {where} is {total}; choose a number from 1 to {total}")


def truncate_config(
    config: dict, layers: int, vision_layers: int | None, where: Path
) -> tuple[dict, dict[int, int]]:
    """A copy of ``config`` (config.json's dict) for the first ``layers`` decoder layers
    and ``vision_layers`` vision blocks (None: all), and the new position of each deepstack
    merger kept (old -> new)."""
    config = copy.deepcopy(config)
    texts = _text_configs(config)
    if not texts:
        raise ConfigError(f"{where}: no num_hidden_layers (in text_config for a VLM)")
    total = texts[0]["num_hidden_layers"]
    _check_count("--layers", layers, total, f"num_hidden_layers in {where}")
    for text in texts:
        text["num_hidden_layers"] = layers
        for name in PER_LAYER:
            if isinstance(text.get(name), list):
                text[name] = text[name][:layers]
        for name in LAYER_NUMBERS:
            if isinstance(text.get(name), list):
                text[name] = [i for i in text[name] if i < layers]
    if vision_layers is None:
        return config, {}
    return config, _truncate_vision(config, vision_layers, where)


def _truncate_vision(config: dict, keep: int, where: Path) -> dict[int, int]:
    vision = config.get("vision_config")
    if not isinstance(vision, dict):
        raise ConfigError(f"--vision-layers {keep}: {where} has no vision_config")
    depth_key = "depth" if "depth" in vision else "num_hidden_layers"
    if depth_key not in vision:
        raise ConfigError(f"{where}: vision_config has no depth or num_hidden_layers")
    _check_count(
        "--vision-layers", keep, vision[depth_key], f"vision_config.{depth_key} in {where}"
    )
    vision[depth_key] = keep
    mergers = {}
    for name in VISION_NUMBERS:
        if isinstance(vision.get(name), list):
            kept = [(j, i) for j, i in enumerate(vision[name]) if i < keep]
            vision[name] = [i for _, i in kept]
            if name == "deepstack_visual_indexes":
                mergers = {old: new for new, (old, _) in enumerate(kept)}
    return mergers


def renamer(layers: int, vision_layers: int | None, mergers: dict[int, int]) -> Callable:
    """``key -> key in the truncated checkpoint``, or None for a tensor dropped."""

    def rename(key: str) -> str | None:
        if _VISION.search(key) is None:
            match = _TEXT_LAYER.search(key)
            return key if match is None or int(match[1]) < layers else None
        if vision_layers is None:
            return key
        match = _VISION_BLOCK.search(key)
        if match is not None:
            return key if int(match[1]) < vision_layers else None
        match = _MERGER.search(key)
        if match is None:
            return key
        new = mergers.get(int(match[0]))
        return None if new is None else f"{key[: match.start()]}{new}{key[match.end() :]}"

    return rename


def source_files(src: Path) -> dict[Path, list[str]]:
    """The safetensors files of ``src`` and the keys to read from each, every header
    checked (present, readable, not truncated, holding what the index says) before any
    tensor is read."""
    index = src / INDEX_NAME
    try:
        files = checkpoint_files(src)
        for file, keys in files.items():
            present = set(checkpoint_files(file)[file])
            missing = [k for k in keys if k not in present]
            if missing:
                raise CheckpointError(f"{file} lacks {missing[0]!r}, which {index} places there")
    except CheckpointError as err:
        raise ConfigError(str(err)) from None
    except (ValueError, KeyError) as err:  # the index's JSON or its weight_map
        raise ConfigError(f"{index}: unreadable index ({err!r})") from None
    return files


class ShardWriter:
    """Safetensors shards of at most ``max_bytes`` of data (a larger tensor alone), each
    written as soon as it is full, named ``model-0000i-of-0000n`` (or ``model``) at the
    end, with ``model.safetensors.index.json`` when there are several."""

    def __init__(self, out: Path, max_bytes: int) -> None:
        self.out, self.max_bytes = out, max_bytes
        self.part: dict[str, torch.Tensor] = {}
        self.size = self.total = 0
        self.shards: list[list[str]] = []

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if self.part and self.size + tensor.nbytes > self.max_bytes:
            self._flush()
        self.part[key] = tensor
        self.size += tensor.nbytes
        self.total += tensor.nbytes

    def _flush(self) -> None:
        save_file(self.part, self._partial(len(self.shards)), metadata={"format": "pt"})
        self.shards.append(list(self.part))
        self.part, self.size = {}, 0

    def _partial(self, i: int) -> Path:
        return self.out / f"partial-{i}.safetensors"

    def close(self) -> int:
        """Write the last shard, name the shards and write the index; returns how many."""
        if self.part:
            self._flush()
        n = len(self.shards)
        names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        if n == 1:
            names = ["model.safetensors"]
        weight_map = {}
        for i, (keys, name) in enumerate(zip(self.shards, names, strict=True)):
            os.replace(self._partial(i), self.out / name)
            weight_map.update(dict.fromkeys(keys, name))
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return n


def copy_tensors(files: dict[Path, list[str]], rename: Callable, writer: ShardWriter) -> int:
    """Stream the tensors ``rename`` keeps into ``writer``, one source file open at a time;
    returns how many."""
    count = 0
    for file, keys in files.items():
        wanted = [(key, rename(key)) for key in keys]
        wanted = [(key, name) for key, name in wanted if name is not None]
        if not wanted:
            continue
        try:
            source = safe_open(file, framework="pt")
        except (SafetensorError, OSError) as err:
            raise ConfigError(f"{file}: unreadable safetensors file ({err})") from None
        with source:
            for key, name in wanted:
                writer.add(name, _read(source, file, key))
                count += 1
    return count


def _read(source, file: Path, key: str) -> torch.Tensor:
    try:
        return source.get_tensor(key)
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{file}: cannot read {key!r} ({err})") from None


def _copy_other_files(src: Path, out: Path) -> None:
    """Tokenizer, processor, chat template, generation config, README: every top-level
    file that is not the config or weights."""
    for path in sorted(src.iterdir()):
        if (
            path.is_file()
            and path.name != "config.json"
            and not path.name.endswith(WEIGHT_SUFFIXES)
        ):
            shutil.copy2(path, out / path.name)


def truncate(src: Path, dst: Path, layers: int, vision_layers: int | None = None) -> Truncated:
    """Write the first ``layers`` decoder layers (and ``vision_layers`` vision blocks) of
    the checkpoint folder ``src`` to the new folder ``dst``."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise ConfigError(f"{dst} already exists; truncate writes a new folder, choose another")
    config = read_config(src)
    new_config, mergers = truncate_config(config, layers, vision_layers, src / "config.json")
    files = source_files(src)
    of_layers = _text_configs(config)[0]["num_hidden_layers"]
    tmp = dst.with_name(f".{dst.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run that was killed
    try:
        tmp.mkdir(parents=True)
        writer = ShardWriter(tmp, max(file.stat().st_size for file in files))
        tensors = copy_tensors(files, renamer(layers, vision_layers, mergers), writer)
        shards = writer.close()
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
        _copy_other_files(src, tmp)
        tmp.rename(dst)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):  # a full disk, a folder we may not write to
            raise ConfigError(f"cannot write {dst}: {err}") from None
        raise
    return Truncated(dst, layers, of_layers, tensors, shards)
