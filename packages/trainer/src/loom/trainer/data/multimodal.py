"""Chat records with images and videos, for a vision-language model.

A message's ``content`` is a string or a list of parts: ``{"type": "text", "text": ...}``,
``{"type": "image", "image": "<path>"}`` (a local file, relative to the JSON-lines file)
and ``{"type": "video", "video": "<folder>" or ["<frame>", ...], "fps": 2}``: a video is
its frames, already sampled (a folder's image files in name order, or a list), at ``fps``
frames a second (default: the video processor's ``fps``, else 2). The chat template
renders one placeholder token per image or video; each is expanded here as the model's
processor (built offline from the model directory) expands it: an image to as many
placeholders as it has merged patches, a video the same per frame, with what the family
puts around (Qwen3-VL: each frame's timestamp). Loss on assistant turns only, never on
vision tokens. A record's images and frames are read again, from their paths, each time
its sample is drawn: the source holds token ids and paths, not pixels.

A bad record (not JSON, a missing or unreadable image or frame, placeholders that do not
match the images and videos, longer than a row) stops the run naming its file and line,
or is skipped and counted with ``data.strict: false``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loom.models.vlm_positions import mrope_positions, video_time_scales
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


FRAME_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class Video:
    frames: list[str]  # paths
    fps: float


def media(messages: list[dict], root: Path, default_fps: float) -> tuple[list[Path], list[Video]]:
    """The images (paths) and videos of a conversation, each in order."""
    images, videos = [], []
    for message in messages:
        content = message["content"]
        for part in content if isinstance(content, list) else ():
            kind = part.get("type")
            if kind == "image":
                value = part.get("image") or part.get("path")
                if not isinstance(value, str) or not value:
                    raise RecordError(f'an image part needs a file path in "image", found {part!r}')
                images.append(root / value)
            elif kind == "video":
                videos.append(Video(video_frames(part, root), video_fps(part, default_fps)))
    return images, videos


def video_frames(part: dict, root: Path) -> list[str]:
    value = part.get("video")
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return [str(root / v) for v in value]
    if not isinstance(value, str) or not value:
        raise RecordError(
            f'a video part needs a folder of frames or a list of frame paths in "video", '
            f"found {part!r}"
        )
    folder = root / value
    if folder.is_file():
        raise RecordError(
            f"video {folder} is a file; a video is a folder of its frames or a list of "
            "frame paths (extract the frames first)"
        )
    if not folder.is_dir():
        raise RecordError(f"video folder {folder} does not exist")
    frames = sorted(f for f in folder.iterdir() if f.suffix.lower() in FRAME_SUFFIXES)
    if not frames:
        raise RecordError(
            f"video folder {folder} holds no frames ({', '.join(sorted(FRAME_SUFFIXES))})"
        )
    return [str(f) for f in frames]


def video_fps(part: dict, default: float) -> float:
    fps = part.get("fps", default)
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise RecordError(f'a video\'s "fps" must be a positive number, found {fps!r}')
    return float(fps)


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
    videos: list[Video]
    video_grids: np.ndarray  # [videos, 3] int64
    video_scales: list[float] | None  # Qwen2.5-VL's temporal spacing per video, else None


class VlmSource:
    """An in-memory source of chat records with images and videos, read from a JSON-lines
    file."""

    def __init__(self, path: Path, field: str, processor, model_config, max_len: int, strict: bool):
        self.path, self.field, self.max_len = path, field, max_len
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.renderer = processor if getattr(processor, "chat_template", None) else self.tokenizer
        self.image_token_id = model_config.image_token_id
        self.video_token_id = model_config.video_token_id
        self.start_id = model_config.vision_start_token_id
        self.end_id = model_config.vision_end_token_id
        self.merge = model_config.vision_config.spatial_merge_size
        self.tokens_per_second = getattr(model_config.vision_config, "tokens_per_second", None)
        video_processor = getattr(processor, "video_processor", None)
        self.default_fps = float(getattr(video_processor, "fps", None) or 2.0)
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
        paths, videos = media(messages, self.path.parent, self.default_fps)
        grids = self._grids(read_images(paths)) if paths else np.zeros((0, 3), np.int64)
        expanded = [self._expand_video(video) for video in videos]
        text, spans = assistant_spans(self.renderer, messages)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        tokens = list(zip(encoded["input_ids"], encoded["offset_mapping"], strict=True))
        ids, supervised = [], []
        images = video = 0
        i = 0
        while i < len(tokens):
            token, (start, _) = tokens[i]
            i += 1
            if token == self.image_token_id:
                if images >= len(grids):
                    raise RecordError(
                        f"more image placeholders in the rendered conversation than images "
                        f"({len(grids)})"
                    )
                n = int(grids[images].prod()) // self.merge**2
                ids += [token] * n
                supervised += [False] * n
                images += 1
            elif token == self.video_token_id:
                if video >= len(videos):
                    raise RecordError(
                        f"more video placeholders in the rendered conversation than videos "
                        f"({len(videos)})"
                    )
                # the processor's expansion replaces <vision_start><video><vision_end>
                if not (
                    ids
                    and ids[-1] == self.start_id
                    and i < len(tokens)
                    and tokens[i][0] == self.end_id
                ):
                    raise RecordError(
                        "the chat template does not put a video's placeholder between the "
                        "vision start and end tokens"
                    )
                ids.pop(), supervised.pop()
                ids += expanded[video][0]
                supervised += [False] * len(expanded[video][0])
                video += 1
                i += 1
            else:
                ids.append(token)
                supervised.append(any(a <= start < b for a, b in spans))
        if images != len(grids):
            raise RecordError(f"{len(grids)} images but {images} image placeholders")
        if video != len(videos):
            raise RecordError(f"{len(videos)} videos but {video} video placeholders")
        if len(ids) > self.max_len:
            raise RecordError(
                f"the conversation is {len(ids)} tokens with its images and videos, longer "
                f"than data.max_seq_len {self.max_len} (a sample with images is never cut)"
            )
        labels = shift_labels(ids, supervised)
        if all(label == IGNORE_INDEX for label in labels):
            return None
        video_grids = np.asarray([g for _, g, _ in expanded], np.int64).reshape(-1, 3)
        seconds = [s for _, _, s in expanded]
        scales = None
        if videos and seconds[0] is not None:
            scales = video_time_scales(seconds, self.tokens_per_second)
        return Encoded(
            np.asarray(ids, np.int32),
            np.asarray(labels, np.int32),
            [str(p) for p in paths],
            grids,
            videos,
            video_grids,
            scales,
        )

    def _grids(self, images: list) -> np.ndarray:
        return np.asarray(self._process(images)["image_grid_thw"], dtype=np.int64)

    def _process(self, images: list) -> dict:
        # "pt": v4's fast image processor returns nothing else
        out = self.processor.image_processor(images=images, return_tensors="pt")
        return {k: v.numpy() for k, v in out.items()}

    def _video_kwargs(self, video: Video) -> dict:
        """The frames are the video already sampled: every one is kept, at ``fps``."""
        n = len(video.frames)
        metadata = {"total_num_frames": n, "fps": video.fps, "frames_indices": list(range(n))}
        return {
            "videos": [read_images([Path(f) for f in video.frames])],
            "video_metadata": [metadata],
            "fps": video.fps,
            "do_sample_frames": False,
            "return_tensors": "pt",
        }

    def _expand_video(self, video: Video) -> tuple[list[int], np.ndarray, float | None]:
        """What the processor puts in place of ``<vision_start><video><vision_end>`` for
        ``video``, its grid, and its seconds per temporal patch where the family uses them
        for positions (Qwen2.5-VL)."""
        start, end = self.tokenizer.convert_ids_to_tokens([self.start_id, self.end_id])
        placeholder = self.tokenizer.convert_ids_to_tokens(self.video_token_id)
        text = start + placeholder + end
        out = self.processor(text=[text], **self._video_kwargs(video))
        seconds = out.get("second_per_grid_ts")
        return (
            out["input_ids"][0].tolist(),
            out["video_grid_thw"][0].numpy().astype(np.int64),
            None if seconds is None else float(seconds[0]),
        )

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
        vision = Vision(np.empty(0), pixels, sample.grids)
        if sample.videos:
            frames = [self._video_pixels(video) for video in sample.videos]
            vision.pixel_values_videos = np.concatenate(frames).astype(np.float32)
            vision.video_grid_thw = sample.video_grids
        vision.mrope = mrope_positions(
            ids,
            sample.grids if len(sample.grids) else None,
            sample.video_grids if sample.videos else None,
            image_token_id=self.image_token_id,
            video_token_id=self.video_token_id,
            spatial_merge_size=self.merge,
            video_temporal_scale=sample.video_scales,
        )
        return ids, sample.labels.astype(np.int64), vision

    def _video_pixels(self, video: Video) -> np.ndarray:
        kwargs = self._video_kwargs(video)
        kwargs.pop("fps")  # the processor's, for Qwen2.5-VL's seconds per patch; not pixels
        out = self.processor.video_processor(**kwargs)
        return out["pixel_values_videos"].numpy()
