"""``loom convert``: a checkpoint trained at world 2 converts to exactly the files the
trainer's ``hf/`` export wrote, at any world size and shard size; HF -> Loom checkpoint
(world 2, sharded) -> HF gives the same tensors, byte for byte; a run started from a
converted checkpoint trains as one started from the HF folder; bad input is one
``error:`` line, and DST is never left behind."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples/tiny"
# The tiny example's qwen3 with its tokenizer, and a qwen3_moe toy (stacked experts in
# Loom, per-expert on the Hub) with the same vocabulary; each trained at world 2 with FSDP
# and sequence or expert parallelism.
LAYOUTS = {"qwen3": ["--parallel.sp_size", "2"], "qwen3_moe": ["--parallel.ep_size", "2"]}
FAMILIES = list(LAYOUTS)


def loom(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "loom.trainer.cli", *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def hf_model(out: Path, family: str) -> Path:
    """Seeded random weights, saved by upstream in several shards with an index."""
    model = out / f"{family}-hf"
    shutil.copytree(TINY / "model", model)
    config = AutoConfig.from_pretrained(model)
    if family == "qwen3_moe":
        toy = json.loads((ROOT / "tests/toy_config/qwen3_moe_toy/config.json").read_text())
        toy["vocab_size"] = config.vocab_size
        (model / "config.json").write_text(json.dumps(toy))
        config = AutoConfig.from_pretrained(model)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(model, max_shard_size="100KB")
    assert (model / "model.safetensors.index.json").is_file()
    return model


def tensors(folder: Path) -> dict[str, tuple[torch.dtype, bytes]]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                t = f.get_tensor(key)
                out[key] = (t.dtype, t.contiguous().view(torch.uint8).numpy().tobytes())
    return out


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def train(out: Path, model: Path, nproc: int, *extra: str) -> list[dict]:
    ok(loom(
        "train", TINY / "train.yaml", "--model.path", model, "--train.output_dir", out,
        "--train.steps", "3", "--checkpoint.every", "3", "--log.progress", "false",
        "--nproc", nproc, *extra,
    ))  # fmt: skip
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Per family: a run of 3 steps at world 2 (SP or EP) with its checkpoint and ``hf/``
    export."""
    runs = {}
    for family in FAMILIES:
        out = tmp_path_factory.mktemp(family)
        train(out / "run", hf_model(out, family), 2, *LAYOUTS[family])
        runs[family] = out / "run"
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_converts_to_the_export_at_any_world(family, trained, tmp_path):
    run = trained[family]
    checkpoint = run / "checkpoints/step_3"
    ok(loom("convert", "dcp-to-hf", checkpoint, tmp_path / "one"))
    want = files(run / "hf")
    got = files(tmp_path / "one")
    assert got.keys() == want.keys()
    for name in want:  # config.json too: the model's config as the export writes it
        assert got[name] == want[name], name
    # small shards: several files and an index, the same at 1 and 4 processes
    for nproc in (1, 4):
        out = tmp_path / f"small-{nproc}"
        ok(
            loom(
                "convert",
                "dcp-to-hf",
                checkpoint,
                out,
                "--max-shard-size",
                "40KB",
                "--nproc",
                nproc,
            )
        )
    small = files(tmp_path / "small-1")
    assert len([n for n in small if n.endswith(".safetensors")]) > 2
    assert files(tmp_path / "small-4") == small
    assert tensors(tmp_path / "small-1") == tensors(run / "hf")
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_without_a_step_gives_the_same_tensors(family, tmp_path):
    """HF -> Loom checkpoint at world 2 (each rank holds its FSDP shard) -> HF."""
    src = hf_model(tmp_path, family)
    ok(loom("convert", "hf-to-dcp", src, tmp_path / "dcp", "--nproc", 2))
    ok(loom("convert", "dcp-to-hf", tmp_path / "dcp", tmp_path / "back", "--model", src))
    got, want = tensors(tmp_path / "back"), tensors(src)
    if family == "qwen3_moe" and not any(".experts.0." in k for k in want):
        # this major saves the experts stacked; the export writes the Hub's per-expert
        # layout: compare through upstream's loader
        loaded = [
            AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (tmp_path / "back", src)
        ]
        assert loaded[0].keys() == loaded[1].keys()
        assert all(torch.equal(loaded[0][k], loaded[1][k]) for k in loaded[1])
        return
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == want[key], key


@pytest.mark.slow
def test_a_run_from_a_converted_checkpoint_trains_as_from_hf(tmp_path):
    src = hf_model(tmp_path, "qwen3")
    ok(loom("convert", "hf-to-dcp", src, tmp_path / "dcp"))
    direct = train(tmp_path / "direct", src, 1)
    converted = train(tmp_path / "converted", src, 1, "--checkpoint.resume", tmp_path / "dcp")
    for want, got in zip(direct, converted, strict=True):
        assert (got["loss"], got["grad_norm"]) == (want["loss"], want["grad_norm"])
    assert tensors(tmp_path / "converted/hf") == tensors(tmp_path / "direct/hf")


def _damaged(kind: str, run: Path, tmp: Path) -> tuple[list, str]:
    """(arguments, expected error) of each bad input; ``run``: a trained run to copy."""
    checkpoint = tmp / "ckpt"
    shutil.copytree(run / "checkpoints/step_3", checkpoint)
    data = sorted(checkpoint.glob("*.distcp"))
    model = yaml.safe_load((run / "config.yaml").read_text())["model"]["path"]
    common = ["convert", "dcp-to-hf", checkpoint, tmp / "out", "--model", model]
    if kind == "not a checkpoint":
        return [
            "convert",
            "dcp-to-hf",
            tmp,
            tmp / "out",
        ], r"is not a Loom checkpoint \(no \.metadata"
    if kind == "missing shard":
        data[-1].unlink()
        return common, rf"ckpt lacks {re.escape(data[-1].name)}, which its \.metadata names"
    if kind == "truncated file":
        data[0].write_bytes(data[0].read_bytes()[:100])
        return common, r"ckpt: cannot read '.*'"
    if kind == "shape mismatch":
        other = tmp / "other"
        shutil.copytree(model, other)
        config = json.loads((other / "config.json").read_text())
        config["intermediate_size"] *= 2
        (other / "config.json").write_text(json.dumps(config))
        return [
            *common[:4],
            "--model",
            other,
        ], r"'model\.layers\.0\.mlp\..*' is \(.*\) but .*other/config\.json makes it"
    if kind == "dst exists":
        (tmp / "out").mkdir()
        (tmp / "out/keep.txt").write_text("mine")
        return common, r"out exists: convert writes a new folder"
    if kind == "hf folder without weights":
        return [
            "convert",
            "hf-to-dcp",
            TINY / "model",
            tmp / "out",
        ], r"holds no safetensors weights"
    raise AssertionError(kind)


BAD = ["not a checkpoint", "missing shard", "truncated file", "shape mismatch", "dst exists",
       "hf folder without weights"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("kind", BAD)
def test_bad_input_is_one_error_line(kind, trained, tmp_path):
    args, expected = _damaged(kind, trained["qwen3"], tmp_path)
    done = loom(*args)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(expected, errors[0]), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    if kind == "dst exists":
        assert (tmp_path / "out/keep.txt").read_text() == "mine"
    else:
        assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".*partial"))
