"""The ``loom`` command end to end on the embedded tiny example."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples/tiny/train.yaml"


def loom_train(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "loom.trainer.cli", "train", str(CONFIG), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tiny_example_learns(tmp_path):
    run = tmp_path / "run"
    result = loom_train("--train.output_dir", str(run), "--log.tensorboard", "true")
    assert result.returncode == 0, result.stderr
    records = metrics(run)
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < 0.3 * first, (first, last)
    for name in ("config.yaml", "loss.png", "throughput.png", "hf/model.safetensors"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run / "hf")
    tokenizer = AutoTokenizer.from_pretrained(run / "hf")
    ids = tokenizer("Ada had a small cat that lived near the", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < first / 2  # the exported weights are the trained ones

    # Training again from the export reads its safetensors: it starts where the run ended.
    resumed = tmp_path / "from-export"
    result = loom_train(
        "--model.path", str(run / "hf"), "--train.steps", "2", "--train.output_dir", str(resumed)
    )
    assert result.returncode == 0, result.stderr
    assert metrics(resumed)[0]["loss"] < first / 2

    again = loom_train("--train.output_dir", str(run))
    assert again.returncode == 2 and "already holds files" in again.stderr
    assert len(metrics(run)) == len(records)  # the earlier run is untouched


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    common = ["--train.steps", "6", "--train.micro_batch_size", "4", "--optim.warmup_steps", "2"]
    runs = {}
    for nproc in (1, 2):
        runs[nproc] = tmp_path / f"n{nproc}"
        result = loom_train(*common, "--nproc", str(nproc), "--train.output_dir", str(runs[nproc]))
        assert result.returncode == 0, result.stderr
    one, two = metrics(runs[1]), metrics(runs[2])
    assert len(one) == len(two) == 6
    for a, b in zip(one, two, strict=True):
        assert a["loss_tokens"] == b["loss_tokens"]
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"], (a, b)
    w1, w2 = (load_file(runs[n] / "hf/model.safetensors") for n in (1, 2))
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=1e-4, atol=1e-6, msg=key)


def test_bad_data_line_is_named_before_launch(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "broken"\n')
    result = loom_train(
        "--data.path", str(data), "--nproc", "2", "--train.output_dir", str(tmp_path / "r")
    )
    assert result.returncode == 2
    assert f"{data}:2: not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()
