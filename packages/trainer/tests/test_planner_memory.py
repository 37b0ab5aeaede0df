"""The planner's memory model and ``loom plan``: LoRA's trainable count is the adapters
peft actually injects; the components scale as the parallel layout and checkpointing
say; ``loom plan`` prints the components, the peak and whether it fits the device. How
close the model is to measured peaks is a GPU benchmark (benchmarks/memory_model.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from loom.models import build_model
from loom.trainer.cli import main
from loom.trainer.config import LORA_TARGETS, LoraConfig
from loom.trainer.lora import apply_lora, is_adapter
from loom.trainer.planner.memory import (
    NF4_BYTES,
    Setup,
    activation_bytes_per_token,
    estimate,
    lora_parameters,
    targeted_weights,
)
from loom.trainer.planner.size import count_parameters

ROOT = Path(__file__).resolve().parents[3]
TOY = ROOT / "tests/toy_config"


@pytest.mark.parametrize("name", ["llama", "qwen3", "qwen2"])
@pytest.mark.parametrize("targets", [tuple(LORA_TARGETS), ("q_proj", "v_proj")])
def test_lora_parameters_are_what_peft_injects(name, targets):
    config = AutoConfig.from_pretrained(TOY / f"{name}_toy")
    with torch.device("meta"):
        model = build_model(TOY / f"{name}_toy", attn_implementation="eager")
    apply_lora(model, LoraConfig(rank=4, targets=list(targets)))
    injected = sum(p.numel() for n, p in model.named_parameters() if is_adapter(n))
    assert lora_parameters(config, 4, targets) == injected


def test_components_follow_the_layout():
    config = AutoConfig.from_pretrained(TOY / "qwen3_toy")
    one = estimate(config, Setup(seq=256))
    four = estimate(config, Setup(seq=256, fsdp=4))
    assert four.components["params"] == one.components["params"] // 4
    assert four.components["optimizer"] == one.components["optimizer"] // 4
    sp = estimate(config, Setup(seq=256, fsdp=2, sp=2))
    assert (
        sp.components["activations"] * 2
        == estimate(config, Setup(seq=256, fsdp=2)).components["activations"]
    )
    ac = estimate(config, Setup(seq=256, activation_checkpointing=True))
    layers = config.num_hidden_layers
    per_token = activation_bytes_per_token(config)
    assert one.components["activations"] == layers * per_token * 256
    assert ac.components["activations"] == layers * 2 * config.hidden_size * 256 + per_token * 256
    lora = estimate(config, Setup(seq=256, lora_rank=4, lora_targets=tuple(LORA_TARGETS)))
    assert lora.components["optimizer"] < one.components["optimizer"] / 10
    total = count_parameters(config).total
    adapters = lora_parameters(config, 4, tuple(LORA_TARGETS))
    # the base is still held, frozen in bf16; QLoRA holds the targeted weights in NF4
    assert lora.components["params"] == 4 * adapters + 2 * (total - adapters)
    qlora = estimate(
        config,
        Setup(seq=256, lora_rank=4, lora_targets=tuple(LORA_TARGETS), lora_quantize=True),
    )
    quantized, largest = targeted_weights(config, tuple(LORA_TARGETS))
    assert largest == config.hidden_size * config.intermediate_size
    assert qlora.components["params"] == int(
        4 * adapters + 2 * (total - adapters - quantized) + NF4_BYTES * quantized
    )
    assert qlora.components["gathered"] == 2 * (total - quantized) + 2 * largest
    tiled = estimate(config, Setup(seq=256, mlp_tile=64))
    width = 2 * 3 * config.intermediate_size
    assert tiled.components["activations"] == layers * (per_token * 256 - width * (256 - 64))
    assert estimate(config, Setup(seq=256, mlp_tile=512)).components == one.components
    for e in (one, four, sp, ac, lora, qlora, tiled):
        static = sum(e.components[k] for k in ("params", "gathered", "optimizer"))
        forward = static + e.components["activations"] + e.components["loss"]
        assert e.peak == max(forward, static + e.components["grads"])


def _profile(tmp_path: Path, gib: float) -> Path:
    path = tmp_path / "gpu.yaml"
    path.write_text(
        json.dumps(
            {"name": "test-gpu", "memory_gib": gib, "bf16_tflops": 100, "interconnect": "pcie"}
        )
    )
    return path


def test_plan_prints_the_components_and_whether_they_fit(tmp_path, capsys):
    config = ROOT / "examples/tiny/train.yaml"
    assert main(["plan", str(config), "--device", str(_profile(tmp_path, 80))]) == 0
    out = capsys.readouterr().out
    for word in ("params", "optimizer", "activations", "loss", "step peak", "fits", "tokens/s"):
        assert word in out, word
    assert "does NOT fit" not in out
    assert main(["plan", str(config), "--device", str(_profile(tmp_path, 0.001))]) == 0
    assert "does NOT fit" in capsys.readouterr().out


def test_plan_refuses_a_gpu_count_the_layout_cannot_take(tmp_path, capsys):
    config = ROOT / "examples/tiny/train.yaml"
    code = main(
        ["plan", str(config), "--gpus", "3", "--parallel.sp_size", "2", "--device", "h100-sxm"]
    )
    assert code == 2
    assert (
        "--gpus 3 is not a multiple of parallel.dp_replicate x sp_size" in capsys.readouterr().err
    )


def test_plan_takes_the_configs_hardware_unless_told_otherwise(capsys):
    config = str(ROOT / "examples/tiny/train.yaml")
    assert main(["plan", config, "--hardware", "a100-40gb"]) == 0
    assert "a100-40gb memory" in capsys.readouterr().out
    assert main(["plan", config, "--hardware", "a100-40gb", "--device", "h200"]) == 0
    assert "h200 memory" in capsys.readouterr().out
