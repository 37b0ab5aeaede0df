"""Chat records with images, for a vision-language model.

A message's ``content`` is a string or a list of parts: ``{"type": "text", "text": ...}``
and ``{"type": "image", "image": "<path>"}`` (a local file, relative to the JSON-lines
file). The chat template renders one placeholder token per image; each is expanded here
to as many placeholders as the image has merged patches (its grid from the model's image
processor, built offline from the model directory). Loss on assistant turns only, never
on placeholders. A record's images are read again, from their paths, each time its
sample is drawn: the source holds token ids and paths, not pixels.

A bad record (not JSON, a missing or unreadable image, placeholders that do not match
the images, longer than a row) stops the run naming its file and line, or is skipped
and counted with ``data.strict: false``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loom.models.vlm_positions import mrope_positions
from loom.trainer.data.packing import Vision
from loom.trainer.data.samples import IGNORE_INDEX, assistant_spans, shift_labels
from loom.trainer.data.sources import record_problem
from loom.trainer.errors import ConfigError, DataError


class RecordError(ValueError):
    """Why one record cannot be trained on (the caller adds file and line)."""


def load_processor(path: Path):
    """The model directory's processor (tokenizer + image processor), offline."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"model.path {path}: cannot load a processor: {err}") from None
    if not hasattr(processor, "image_processor"):
        raise ConfigError(
            f"model.path {path}: the processor ({type(processor).__name__}) has no image "
            "processor; a vision-language model needs its preprocessor_config.json"
        )
    return processor


def image_paths(messages: list[dict], root: Path) -> list[Path]:
    """The images of a conversation in order; videos are refused by name."""
    paths = []
    for message in messages:
        content = message["content"]
        for part in content if isinstance(content, list) else ():
            kind = part.get("type")
            if kind == "video":
                raise RecordError("video parts are not supported yet; use image parts")
            if kind == "image":
                value = part.get("image") or part.get("path")
                if not isinstance(value, str) or not value:
                    raise RecordError(f'an image part needs a file path in "image", found {part!r}')
                paths.append(root / value)
    return paths


def read_images(paths: list[Path]) -> list:
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        if not path.is_file():
            raise RecordError(f"image {path} does not exist")
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise RecordError(f"cannot read image {path}: {err}") from None
    return images


@dataclass
class Encoded:
    ids: np.ndarray  # [tokens] int32, placeholders expanded
    labels: np.ndarray  # [tokens] int32, shifted
    images: list[str]  # paths
    grids: np.ndarray  # [images, 3] int64


class VlmSource:
    """An in-memory source of chat records with images, read from a JSON-lines file."""

    def __init__(self, path: Path, field: str, processor, model_config, max_len: int, strict: bool):
        self.path, self.field, self.max_len = path, field, max_len
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.renderer = processor if getattr(processor, "chat_template", None) else self.tokenizer
        self.image_token_id = model_config.image_token_id
        self.video_token_id = model_config.video_token_id
        self.merge = model_config.vision_config.spatial_merge_size
        self.samples: list[Encoded] = []
        self.skipped = 0
        for line, problem, encoded in self._read():
            if problem is None and encoded is not None:
                self.samples.append(encoded)
            elif problem is not None:
                if strict:
                    raise DataError(f"{path}:{line}: {problem}")
                self.skipped += 1
        if not self.samples:
            raise DataError(f"{path}: holds no usable records")

    def _read(self):
        with self.path.open(encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    yield number, f"not valid JSON ({err.msg})", None
                    continue
                problem = record_problem(record, "chat", self.field)
                if problem:
                    yield number, problem, None
                    continue
                try:
                    yield number, None, self.encode(record[self.field])
                except RecordError as err:
                    yield number, str(err), None

    def encode(self, messages: list[dict]) -> Encoded | None:
        """Token ids with placeholders expanded and shifted labels; None when nothing is
        learned (no supervised token)."""
        paths = image_paths(messages, self.path.parent)
        grids = self._grids(read_images(paths)) if paths else np.zeros((0, 3), np.int64)
        text, spans = assistant_spans(self.renderer, messages)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, supervised = [], []
        placeholders = 0
        for token, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
            learn = any(a <= start < b for a, b in spans)
            if token == self.image_token_id:
                if placeholders >= len(grids):
                    raise RecordError(
                        f"more image placeholders in the rendered conversation than images "
                        f"({len(grids)})"
                    )
                n = int(grids[placeholders].prod()) // self.merge**2
                ids += [token] * n
                supervised += [False] * n
                placeholders += 1
                continue
            ids.append(token)
            supervised.append(learn)
        if placeholders != len(grids):
            raise RecordError(f"{len(grids)} images but {placeholders} image placeholders")
        if len(ids) > self.max_len:
            raise RecordError(
                f"the conversation is {len(ids)} tokens with its images, longer than "
                f"data.max_seq_len {self.max_len} (a sample with images is never cut)"
            )
        labels = shift_labels(ids, supervised)
        if all(label == IGNORE_INDEX for label in labels):
            return None
        return Encoded(
            np.asarray(ids, np.int32), np.asarray(labels, np.int32), [str(p) for p in paths], grids
        )

    def _grids(self, images: list) -> np.ndarray:
        return np.asarray(self._process(images)["image_grid_thw"], dtype=np.int64)

    def _process(self, images: list) -> dict:
        # "pt": v4's fast image processor returns nothing else
        out = self.processor.image_processor(images=images, return_tensors="pt")
        return {k: v.numpy() for k, v in out.items()}

    def __len__(self) -> int:
        return len(self.samples)

    def fetch(self, index: int) -> tuple[np.ndarray, np.ndarray, Vision]:
        sample = self.samples[int(index)]
        ids = sample.ids.astype(np.int64)
        if sample.images:
            out = self._process(read_images([Path(p) for p in sample.images]))
            pixels = np.asarray(out["pixel_values"], dtype=np.float32)
        else:
            image_processor = self.processor.image_processor
            size = 3 * image_processor.temporal_patch_size * image_processor.patch_size**2
            pixels = np.zeros((0, size), np.float32)
        mrope = mrope_positions(
            ids,
            sample.grids if len(sample.grids) else None,
            None,
            image_token_id=self.image_token_id,
            video_token_id=self.video_token_id,
            spatial_merge_size=self.merge,
        )
        return ids, sample.labels.astype(np.int64), Vision(mrope, pixels, sample.grids)
