"""Every parallel layout trains the same model: CLI runs of the toy configs (CPU, gloo,
FSDP2 always on) over world sizes and sequence parallelism give the per-step loss and
grad norm of a single process, for 2 epochs of 2 steps each."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "tests/toy_config"
TOKENIZER = ROOT / "examples/tiny/model"
CORPUS = ROOT / "examples/tiny/corpus.jsonl"
RTOL = 1e-5  # fp32 on CPU; reductions run in a different order per layout
LAYOUTS = [  # (processes, extra overrides)
    (2, []),  # dp 2
    (2, ["--parallel.sp_size", "2"]),  # sp 2
]
# Experts spread over 2 ranks, and over the SP group. The router aux loss is a mean over
# micro-batches, so it is layout-independent across dp and ep; under SP its sums are taken
# over the whole sequence (loom.models.moe_loss).
MOE_LAYOUTS = [
    (2, []),
    (2, ["--parallel.ep_size", "2"]),
    (2, ["--parallel.sp_size", "2", "--parallel.ep_size", "2"]),
]
MOE = {"qwen3_moe", "mixtral"}


def toy_model_dir(name: str, out: Path) -> Path:
    """The toy config with the tiny example's tokenizer (and its vocabulary size)."""
    model = out / f"{name}_model"
    shutil.copytree(TOKENIZER, model)
    config = json.loads((TOY / f"{name}_toy/config.json").read_text())
    config["vocab_size"] = json.loads((TOKENIZER / "config.json").read_text())["vocab_size"]
    (model / "config.json").write_text(json.dumps(config))
    return model


def run(config: Path, out: Path, nproc: int, extra: list[str]) -> list[dict]:
    command = [sys.executable, "-m", "loom.trainer.cli", "train", str(config)]
    command += ["--nproc", str(nproc), "--train.output_dir", str(out), *extra]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "llama",
        "qwen2",
        "qwen3",
        "qwen3_moe",
        "mixtral",
    ],
)
def test_layouts_match_single_process(name, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(CORPUS.read_text().splitlines(keepends=True)[:6]))
    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(toy_model_dir(name, tmp_path))},
                "data": {"path": str(data), "max_seq_len": 64},
                "train": {
                    "output_dir": "unused", "steps": 4, "global_batch_size": 4,
                    "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 1,
                },
                "log": {"progress": False},
            }
        )
    )  # fmt: skip
    reference = run(config, tmp_path / "single", 1, [])
    assert reference[-1]["epoch"] >= 1.8, "the data should last about 2 steps per epoch"
    # The export is in HF's layout (per-expert keys for MoE): upstream's class loads it.
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "single/hf", output_loading_info=True)
    assert not any(info.values()), info
    for nproc, extra in MOE_LAYOUTS if name in MOE else LAYOUTS:
        records = run(config, tmp_path / f"run-{nproc}-{'-'.join(extra)}", nproc, extra)
        for want, got in zip(reference, records, strict=True):
            for key in ("loss", "grad_norm"):
                assert got[key] == pytest.approx(want[key], rel=RTOL), (extra, want, got)
