"""Chat records with images and videos become what upstream's processor and model make of
them, for each VLM family: the token ids with every placeholder expanded (a video's frames
and, for Qwen3-VL, their timestamps), the patches of images and videos, and the 3-D rotary
positions against the upstream model's ``get_rope_index``; loss only on the assistant's
answer. Bad video parts are named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText

from loom.trainer.data.multimodal import RecordError, VlmSource, load_processor
from loom.trainer.data.samples import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples/tiny-vlm"
MAJOR = int(transformers.__version__.split(".")[0])
# family: (processor class, video processor class)
FAMILIES = {
    "qwen3_vl": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"),
}


def model_dir(out: Path, family: str) -> Path:
    """The example's tokenizer and processor files with ``family``'s toy config (the
    example's vocabulary and special tokens)."""
    model = out / family
    shutil.copytree(EXAMPLE / "model", model)
    example = json.loads((model / "config.json").read_text())
    config = json.loads((ROOT / f"tests/toy_config/{family}_toy/config.json").read_text())
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        config[key] = example[key]
    config["text_config"]["vocab_size"] = example["text_config"]["vocab_size"]
    (model / "config.json").write_text(json.dumps(config))
    processor, video = FAMILIES[family]
    for name, key, value in (
        ("preprocessor_config.json", "processor_class", processor),
        ("video_preprocessor_config.json", "video_processor_type", video),
    ):
        data = json.loads((model / name).read_text())
        data[key] = value
        (model / name).write_text(json.dumps(data))
    return model


def frames(folder: Path, n: int, size=(40, 56)) -> Path:
    folder.mkdir()
    for i in range(n):
        pixels = np.full((*size, 3), 30 * i, np.uint8)
        pixels[:, : 8 * (i + 1)] = 255
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return folder


def record(*parts: dict) -> dict:
    return {
        "messages": [
            {"role": "user", "content": [*parts, {"type": "text", "text": "Which way?"}]},
            {"role": "assistant", "content": "Left."},
        ]
    }


def source(tmp_path: Path, family: str, records: list[dict]) -> VlmSource:
    model = model_dir(tmp_path, family)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    processor = load_processor(model)
    return VlmSource(data, "messages", processor, AutoConfig.from_pretrained(model), 4096, True)


IMAGE = {"type": "image", "image": str(EXAMPLE / "images/red-left-90.png")}
# (records' parts, fps of its videos): a video alone, an image then two videos (an odd
# frame count: the processor repeats the last frame), a video given as a list of frames
CASES = {
    "video": ([{"type": "video", "video": "clip5", "fps": 1}], 1.0),
    "image_and_videos": (
        [IMAGE, {"type": "video", "video": "clip5", "fps": 4}, {"type": "video", "video": "clip4", "fps": 4}],
        4.0,
    ),
    "frame_list": (
        [{"type": "video", "video": ["clip4/000.png", "clip4/002.png"], "fps": 0.5}],
        0.5,
    ),
}  # fmt: skip


def upstream_inputs(src: VlmSource, parts: list[dict], fps: float) -> dict:
    """The upstream processor on the rendered conversation, the frames given as sampled."""
    messages = record(*parts)["messages"]
    text = src.tokenizer.apply_chat_template(messages, tokenize=False)
    images = [Image.open(p["image"]).convert("RGB") for p in parts if p["type"] == "image"]
    videos, metadata = [], []
    for part in (p for p in parts if p["type"] == "video"):
        value = part["video"]
        paths = (
            [src.path.parent / v for v in value]
            if isinstance(value, list)
            else sorted((src.path.parent / value).iterdir())
        )
        videos.append([Image.open(p).convert("RGB") for p in paths])
        n = len(paths)
        metadata.append({"total_num_frames": n, "fps": fps, "frames_indices": list(range(n))})
    kwargs = {"images": images} if images else {}
    return src.processor(
        text=[text],
        videos=videos,
        video_metadata=metadata,
        fps=fps,
        do_sample_frames=False,
        return_tensors="pt",
        **kwargs,
    )


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("case", list(CASES))
def test_sample_matches_upstream_processor_and_positions(family, case, tmp_path):
    frames(tmp_path / "clip5", 5)
    frames(tmp_path / "clip4", 4, size=(48, 32))
    parts, fps = CASES[case]
    src = source(tmp_path, family, [record(*parts)])
    ids, labels, vision = src.fetch(0)
    want = upstream_inputs(src, parts, fps)
    np.testing.assert_array_equal(ids, want["input_ids"][0].numpy())
    np.testing.assert_array_equal(vision.video_grid_thw, want["video_grid_thw"].numpy())
    np.testing.assert_array_equal(vision.pixel_values_videos, want["pixel_values_videos"].numpy())
    if "pixel_values" in want:
        np.testing.assert_array_equal(vision.pixel_values, want["pixel_values"].numpy())
        np.testing.assert_array_equal(vision.image_grid_thw, want["image_grid_thw"].numpy())
    else:
        assert len(vision.image_grid_thw) == 0
    # loss on the answer only: "Left." and the end of the turn
    answer = src.tokenizer("Left.<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert labels[labels != IGNORE_INDEX].tolist() == answer

    config = AutoConfig.from_pretrained(src.path.parent / family)
    with torch.device("meta"):
        upstream = AutoModelForImageTextToText.from_config(config)
    keys = ["image_grid_thw", "video_grid_thw", "second_per_grid_ts"]
    keys += ["mm_token_type_ids"] if MAJOR >= 5 else []
    rope_inputs = {k: want[k] for k in keys if k in want}
    positions, _ = upstream.model.get_rope_index(want["input_ids"], **rope_inputs)
    np.testing.assert_array_equal(vision.mrope, positions[:, 0].numpy())


BAD = {
    "no such folder": ({"type": "video", "video": "nothing"}, r"video folder .*nothing does not exist"),
    "a video file": ({"type": "video", "video": "clip.mp4"}, r"clip\.mp4 is a file; a video is a folder"),
    "empty folder": ({"type": "video", "video": "empty"}, r"video folder .*empty holds no frames"),
    "missing frame": ({"type": "video", "video": ["clip5/000.png", "clip5/9.png"]}, r"image .*9\.png does not exist"),
    "bad fps": ({"type": "video", "video": "clip5", "fps": 0}, r'"fps" must be a positive number, found 0'),
    "no value": ({"type": "video"}, r'a video part needs a folder of frames or a list'),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_video_part_is_named(case, tmp_path):
    frames(tmp_path / "clip5", 5)
    (tmp_path / "empty").mkdir()
    (tmp_path / "clip.mp4").write_bytes(b"\x00")
    part, expected = BAD[case]
    src = source(tmp_path, "qwen3_vl", [record(IMAGE)])
    with pytest.raises(RecordError, match=expected):
        src.encode(record(part)["messages"])


def test_more_video_placeholders_than_videos(tmp_path):
    src = source(tmp_path, "qwen3_vl", [record(IMAGE)])
    messages = record()["messages"]
    messages[0]["content"] = "<|vision_start|><|video_pad|><|vision_end|>Which way?"
    with pytest.raises(RecordError, match=r"more video placeholders .* than videos \(0\)"):
        src.encode(messages)


@pytest.fixture
def parallel():
    from loom.dist.mesh import destroy_parallel, init_parallel

    state = init_parallel()
    yield state
    destroy_parallel()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_trainer_step_loss_equals_upstream_on_the_processor_inputs(family, parallel, tmp_path):
    """A packed row with an image and a video, through the trainer's collate and
    micro-step loss into a Loom port, against the upstream class with the same weights on
    what the upstream processor makes of the conversation: every pixel reaches the model."""
    from loom.models import build_model
    from loom.trainer.data.collate import VisionTokens
    from loom.trainer.data.packing import build_row
    from loom.trainer.train import micro_step_loss, to_device

    frames(tmp_path / "clip5", 5)
    frames(tmp_path / "clip4", 4, size=(48, 32))
    parts, fps = CASES["image_and_videos"]
    src = source(tmp_path, family, [record(*parts)])
    ids, labels, vision = src.fetch(0)
    model_path = tmp_path / family
    torch.manual_seed(0)
    model = build_model(model_path, attn_implementation="loom_sdpa", dtype=torch.float32)
    tokens = VisionTokens.of(model.config)
    row = build_row([(ids, labels, vision)], len(ids) + 6, pad_id=0)
    batch = to_device([row], torch.device("cpu"), parallel.sp_group, tokens)
    n = int((labels != IGNORE_INDEX).sum())
    got = micro_step_loss(model, batch, num_items=n, micro_batches=1)

    config = AutoConfig.from_pretrained(model_path)
    upstream = AutoModelForImageTextToText.from_config(config, attn_implementation="eager")
    result = upstream.load_state_dict(model.state_dict(), strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
    inputs = dict(upstream_inputs(src, parts, fps))
    inputs.pop("attention_mask")
    if MAJOR < 5:  # 4.57.3 would split the sample at every vision run (see test_vlm)
        text = torch.arange(len(ids))[None, None]
        inputs["position_ids"] = torch.cat([text, torch.from_numpy(vision.mrope)[:, None]])
    logits = upstream(**inputs).logits[0]
    want = torch.nn.functional.cross_entropy(
        logits, torch.from_numpy(labels), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    torch.testing.assert_close(got, want / n, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_layers_and_vision_blocks_change_nothing(parallel, tmp_path):
    """``memory.compile`` compiles the decoder layers and the vision blocks: the step's
    loss and every gradient stay those of the eager model (a row with an image and two
    videos)."""
    from loom.models import build_model
    from loom.trainer.data.collate import VisionTokens
    from loom.trainer.data.packing import build_row
    from loom.trainer.parallelize import compile_decoder_layers
    from loom.trainer.train import micro_step_loss, to_device

    frames(tmp_path / "clip5", 5)
    frames(tmp_path / "clip4", 4, size=(48, 32))
    src = source(tmp_path, "qwen3_vl", [record(*CASES["image_and_videos"][0])])
    ids, labels, vision = src.fetch(0)
    row = build_row([(ids, labels, vision)], len(ids), pad_id=0)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(tmp_path / "qwen3_vl", attn_implementation="loom_sdpa")
        if compiled:
            compile_decoder_layers(model)
        batch = to_device(
            [row], torch.device("cpu"), parallel.sp_group, VisionTokens.of(model.config)
        )
        loss = micro_step_loss(model, batch, num_items=1, micro_batches=1)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert any(n.startswith("model.visual.blocks") for n in want_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
