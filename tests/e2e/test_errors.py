"""Bad input met inside the ranks (a model directory's weights or tokenizer) reaches the
user as the launcher's one ``error:`` line, exit status 2, no traceback, with and without
torchrun; the run it was to replace is kept."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples/tiny/train.yaml"
TINY = ROOT / "examples/tiny/model"


def _with_weights(model: Path) -> Path:
    """A copy of the tiny model with its weights (random, seeded) in model.safetensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    shutil.copytree(TINY, model)
    torch.manual_seed(0)
    weights = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).state_dict()
    weights.pop("lm_head.weight")  # tied to the embedding
    save_file({k: v.contiguous() for k, v in weights.items()}, model / "model.safetensors")
    return model


def truncated(tmp_path: Path) -> tuple[Path, list[str], str]:
    model = _with_weights(tmp_path / "truncated")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    expected = f"error: model.path: {weights}: tensor '[\\w.]+' ends at byte \\d+, past the end"
    return model, [], expected + r" of the file \(\d+ bytes\): the file is truncated"


def hidden_size_mismatch(tmp_path: Path) -> tuple[Path, list[str], str]:
    model = _with_weights(tmp_path / "mismatch")
    config = json.loads((model / "config.json").read_text())
    config["hidden_size"] = 32
    (model / "config.json").write_text(json.dumps(config))
    return (
        model,
        [],
        (
            rf"error: model.path: {model} does not fit the model \(saved from another config\?\): "
            r"\d+ shape mismatches: model.embed_tokens.weight: checkpoint \(384, 64\) vs "
            r"model \(384, 32\)"
        ),
    )


def tokenizer_beyond_vocab(tmp_path: Path) -> tuple[Path, list[str], str]:
    from transformers import AutoTokenizer

    model = tmp_path / "big-tokenizer"
    shutil.copytree(TINY, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    size = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<tool>", "</tool>"]})
    tokenizer.save_pretrained(model)
    data = tmp_path / "tools.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"Ada <tool>ran</tool> {i}"}) + "\n" for i in range(64))
    )
    return (
        model,
        ["--data.path", str(data)],
        (
            rf"error: model.path {model}: the tokenizer's largest token id is {size + 1} "
            rf"\({size + 2} tokens\), but the model's vocab_size is 384"
        ),
    )


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", [truncated, hidden_size_mismatch, tokenizer_beyond_vocab])
def test_rank_error_is_one_line(case, nproc, tmp_path):
    model, extra, expected = case(tmp_path)
    earlier = tmp_path / "run"
    earlier.mkdir()
    (earlier / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    command = [
        sys.executable, "-m", "loom.trainer.cli", "train", str(CONFIG), "--nproc", str(nproc),
        "--model.path", str(model), "--train.output_dir", str(earlier),
        "--train.overwrite", "true", "--train.steps", "2", "--data.max_seq_len", "64", *extra,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    # Every rank meets the same bad input; the launcher reports the lowest rank whose
    # report it found (torchrun may stop rank 0 before it writes one), naming it past 0.
    prefix = "" if nproc == 1 else r"(rank \d+: )?"
    message = expected.removeprefix("error: ")
    assert re.match(f"error: {prefix}{message}", errors[0]), (expected, errors[0])
    assert "Traceback" not in result.stderr, result.stderr
    assert sorted(p.name for p in earlier.iterdir()) == ["metrics.jsonl"]  # the earlier run
    assert "loss" in (earlier / "metrics.jsonl").read_text()
    assert not list(tmp_path.glob(".run.replaced*"))
