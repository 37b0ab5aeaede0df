"""Vision-language training through ``loom train`` (CPU, gloo, FSDP2 always on): for
every VLM port, sp 2 gives one process's per-step loss and grad norm and the same
exported weights, and so does data parallelism where one rank's micro-batch has an
image and the other's does not (the dummy vision forward keeps FSDP's collectives
matched); ``freeze_vit`` leaves every vision weight as it was; bad records are one
``error:`` line naming file and line; the export loads in upstream transformers with
its processor."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples/tiny-vlm"
TOY = ROOT / "tests/toy_config"
RTOL = 1e-5


# Each VLM port: its processor class (the example's processor files serve every family).
FAMILIES = {
    "qwen3_vl": "Qwen3VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl_moe": "Qwen3VLProcessor",
}


def model_dir(out: Path, family: str) -> Path:
    """The example's tokenizer and processor with ``family``'s toy config (the example's
    vocabulary and special tokens), seeded random weights in model.safetensors."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    model = out / "model"
    shutil.copytree(EXAMPLE / "model", model)
    if family != "qwen3_vl":  # the example is a qwen3_vl
        example = json.loads((model / "config.json").read_text())
        config = json.loads((TOY / f"{family}_toy/config.json").read_text())
        for key in ("image_token_id", "video_token_id", "vision_start_token_id",
                    "vision_end_token_id"):  # fmt: skip
            config[key] = example[key]
        config["text_config"]["vocab_size"] = example["text_config"]["vocab_size"]
        (model / "config.json").write_text(json.dumps(config))
        processor = json.loads((model / "preprocessor_config.json").read_text())
        processor["processor_class"] = FAMILIES[family]
        (model / "preprocessor_config.json").write_text(json.dumps(processor))
    torch.manual_seed(0)
    upstream = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model))
    weights = {k: v.contiguous() for k, v in upstream.state_dict().items() if k != "lm_head.weight"}
    save_file(weights, model / "model.safetensors")
    return model


def conversations(out: Path, images: int = 1, text_only: int = 7) -> Path:
    """``images`` conversations about an image, then ``text_only`` without one: with one
    conversation per row and 4 rows a step, a rank of two can hold an image while the
    other holds none."""
    lines = (EXAMPLE / "conversations.jsonl").read_text().splitlines()
    data = out / "data.jsonl"
    records = []
    for line in lines[:images]:
        record = json.loads(line)
        for message in record["messages"]:
            for part in message["content"] if isinstance(message["content"], list) else ():
                if part["type"] == "image":
                    part["image"] = str(EXAMPLE / part["image"])
        records.append(record)
    for i in range(text_only):
        records.append({"messages": [
            {"role": "user", "content": f"Say the number {i}."},
            {"role": "assistant", "content": f"The number is {i}."},
        ]})  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return data


def video_conversations(out: Path) -> Path:
    """A conversation about a clip (the square moving right: the example's frames), one
    about an image, six without either: in steps with both, a rank of two may hold the
    video while the other holds the image or nothing."""
    clip = out / "clip"
    clip.mkdir()
    for i, name in enumerate(["red-left-90", "red-left-130", "red-right-130", "red-right-170"]):
        shutil.copy(EXAMPLE / f"images/{name}.png", clip / f"{i}.png")
    video = {"type": "video", "video": str(clip), "fps": 2}
    records = [{"messages": [
        {"role": "user", "content": [video, {"type": "text", "text": "Where is the square?"}]},
        {"role": "assistant", "content": "It moves right."},
    ]}]  # fmt: skip
    lines = conversations(out, images=1, text_only=6).read_text().splitlines()
    data = out / "video.jsonl"
    data.write_text(json.dumps(records[0]) + "\n" + "\n".join(lines) + "\n")
    return data


def train_config(out: Path, data: Path, family: str, max_seq_len: int = 48) -> Path:
    config = out / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(model_dir(out, family))},
                # 44 tokens with its image, 47 without: one conversation per row
                "data": {"path": str(data), "format": "chat", "max_seq_len": max_seq_len},
                "train": {
                    "output_dir": "unused", "steps": 4, "global_batch_size": 4,
                    "micro_batch_size": 2,
                },
                "optim": {"lr": 1e-3, "warmup_steps": 1},
                "log": {"progress": False},
            }
        )
    )  # fmt: skip
    return config


def run(config: Path, out: Path, nproc: int, extra: list[str]) -> list[dict]:
    command = [sys.executable, "-m", "loom.trainer.cli", "train", str(config)]
    command += ["--nproc", str(nproc), "--train.output_dir", str(out), *extra]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_runs() -> dict:
    return {}


@pytest.fixture
def single(family, single_runs, tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    """One process's run of ``family`` (config, run directory, metrics), made once per
    module and shared by the tests that compare with it."""
    if family not in single_runs:
        out = tmp_path_factory.mktemp(family)
        config = train_config(out, conversations(out), family)
        records = run(config, out / "single", 1, [])
        assert sum(r["images"] for r in records) >= 2, "the image should be drawn in 2 epochs"
        single_runs[family] = config, out / "single", records
    return single_runs[family]


SP2 = ["--parallel.sp_size", "2"]
# Every VLM port under sp 2; qwen3_vl also under dp 2, 2 rows per rank: in the steps with
# the image one rank has it, the other none; the MoE port under ep 2 (with dp 2, the same
# split of rows) and sp 2 x ep 2.
LAYOUTS = [
    pytest.param(family, layout, extra, id=f"{family}-{layout}")
    for family, layout, extra in [
        ("qwen3_vl", "sp2", SP2), ("qwen3_vl", "dp2", []), ("qwen2_5_vl", "sp2", SP2),
        # experts spread over the ranks, and over the SP group
        ("qwen3_vl_moe", "ep2", ["--parallel.ep_size", "2"]),
        ("qwen3_vl_moe", "sp2xep2", [*SP2, "--parallel.ep_size", "2"]),
    ]
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("family", "layout", "extra"), LAYOUTS)
def test_layout_matches_single_process(family, layout, extra, single):
    config, reference_dir, reference = single
    out = config.parent / layout
    records = run(config, out, 2, extra)
    for want, got in zip(reference, records, strict=True):
        for key in ("loss", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=RTOL), (key, want, got)
        assert got["images"] == want["images"]
    want, got = (load_file(d / "hf/model.safetensors") for d in (reference_dir, out))
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "layouts"), [("qwen3_vl", {"sp2": SP2, "dp2": []}), ("qwen2_5_vl", {"sp2": SP2})]
)
def test_videos_train_alike_in_every_layout(family, layouts, tmp_path):
    """A video among the images (the processor's expansion, the joint vision tower call):
    sp 2, and dp 2 with the video and the image on different ranks, give one process's
    per-step loss and grad norm."""
    config = train_config(tmp_path, video_conversations(tmp_path), family, max_seq_len=96)
    reference = run(config, tmp_path / "single", 1, [])
    assert sum(r["videos"] for r in reference) >= 2 and sum(r["video_tokens"] for r in reference)
    for layout, extra in layouts.items():
        records = run(config, tmp_path / layout, 2, extra)
        for want, got in zip(reference, records, strict=True):
            for key in ("loss", "grad_norm"):
                assert got[key] == pytest.approx(want[key], rel=RTOL), (layout, key, want, got)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_loads_upstream_with_processor(single):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _, reference_dir, _ = single
    model, info = AutoModelForImageTextToText.from_pretrained(
        reference_dir / "hf", output_loading_info=True
    )
    assert not any(info.values()), info
    processor = AutoProcessor.from_pretrained(reference_dir / "hf")
    assert processor.image_processor.patch_size == model.config.vision_config.patch_size


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_vl"])
def test_freeze_vit_keeps_every_vision_weight(single):
    config, _, _ = single
    out = config.parent / "frozen"
    run(config, out, 1, ["--model.freeze_vit", "true"])
    start = load_file(
        Path(yaml.safe_load(config.read_text())["model"]["path"]) / "model.safetensors"
    )
    end = load_file(out / "hf/model.safetensors")
    vision = [k for k in start if k.startswith("model.visual.")]
    assert vision and all(torch.equal(start[k], end[k]) for k in vision)
    text = [k for k in start if k not in vision]
    assert all(not torch.equal(start[k], end[k]) for k in text if "norm" not in k)


def _bad(tmp_path: Path, record: dict) -> subprocess.CompletedProcess:
    good = json.loads((EXAMPLE / "conversations.jsonl").read_text().splitlines()[0])
    good["messages"][0]["content"][0]["image"] = str(EXAMPLE / good["messages"][0]["content"][0]["image"])  # fmt: skip
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump({
            "model": {"path": str(EXAMPLE / "model")},
            "data": {"path": str(data), "format": "chat", "max_seq_len": 64},
            "train": {"output_dir": str(tmp_path / "run"), "steps": 1, "global_batch_size": 1},
            "log": {"progress": False},
        })
    )  # fmt: skip
    command = [sys.executable, "-m", "loom.trainer.cli", "train", str(config)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _ask(content) -> dict:
    return {"messages": [
        {"role": "user", "content": content}, {"role": "assistant", "content": "Red."},
    ]}  # fmt: skip


def _corrupt(tmp_path: Path) -> str:
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"\x89PNG not really")
    return str(path)


BAD = {
    "missing image": (
        lambda tmp: _ask(
            [{"type": "image", "image": "no/such.png"}, {"type": "text", "text": "?"}]
        ),
        r"bad\.jsonl:2: image .*no/such\.png does not exist",
    ),
    "corrupt image": (
        lambda tmp: _ask(
            [{"type": "image", "image": _corrupt(tmp)}, {"type": "text", "text": "?"}]
        ),
        r"bad\.jsonl:2: cannot read image .*corrupt\.png",
    ),
    "more placeholders than images": (
        lambda tmp: _ask("<|vision_start|><|image_pad|><|vision_end|>What color?"),
        r"bad\.jsonl:2: more image placeholders in the rendered conversation than images \(0\)",
    ),
    "missing video": (
        lambda tmp: _ask([{"type": "video", "video": "clip/"}, {"type": "text", "text": "?"}]),
        r"bad\.jsonl:2: video folder .*clip does not exist",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_record_is_one_error_line(case, tmp_path):
    import re

    make, expected = BAD[case]
    done = _bad(tmp_path, make(tmp_path))
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(expected, errors[0]), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
