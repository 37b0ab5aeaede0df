"""``loom verify`` on tiny upstream checkpoints of every model Loom accepts: Loom's model,
filled as the trainer fills it, gives upstream's logits and loss (exit 0); a model that
differs from upstream's fails (exit 1), within reach of ``--tolerance-factor``; bad input
is one ``error:`` line and exit status 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

import loom.trainer.tools.verify as verify_module
from loom.models.registry import PORTS, UPSTREAM_FAMILIES
from loom.trainer.cli import main

TOY = Path(__file__).resolve().parent / "toy_config"
# Qwen2.5-VL's save_pretrained writes its older key names (model.layers.*, visual.*), as
# the Hub holds them: the port's renames read them.
MODELS = [*PORTS, *UPSTREAM_FAMILIES]


def saved(name: str, out: Path) -> Path:
    """A seeded random upstream model of the toy config, as ``save_pretrained`` writes it."""
    config = AutoConfig.from_pretrained(TOY / f"{name}_toy")
    vlm = getattr(config, "vision_config", None) is not None
    torch.manual_seed(0)
    auto = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
    auto.from_config(config).save_pretrained(out)
    return out


def verify(*args) -> int:
    return main(["verify", *map(str, args)])


@pytest.mark.parametrize("name", MODELS)
def test_upstream_checkpoint_passes(name, tmp_path, capsys):
    code = verify(saved(name, tmp_path))
    out, err = capsys.readouterr()
    assert code == 0, out + err
    for row in ("logits", "loss"):
        assert re.search(rf"^{row} .* ok$", out, re.MULTILINE), out


def test_a_model_that_differs_fails(tmp_path, capsys, monkeypatch):
    """One tensor of Loom's model off by 5% (as a port or converter bug would leave it:
    a perturbed checkpoint would reach both sides alike) fails; a factor of 1000 admits it."""
    src = saved("qwen3", tmp_path)
    load = verify_module.load_loom

    def perturbed(*args):
        model = load(*args)
        with torch.no_grad():
            model.model.norm.weight.mul_(1.05)
        return model

    monkeypatch.setattr(verify_module, "load_loom", perturbed)
    assert verify(src) == 1
    out = capsys.readouterr().out
    for row in ("logits", "loss"):
        assert re.search(rf"^{row} .* FAIL$", out, re.MULTILINE), out
    assert "FAILED: logits and loss differ from upstream" in out
    assert verify(src, "--tolerance-factor", 1000) == 0


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_folder_without_config(tmp_path, capsys):
    assert verify(tmp_path) == 2
    assert f"{tmp_path} has no config.json" in _error(capsys)


def test_empty_batch(tmp_path, capsys):
    src = saved("llama", tmp_path)
    capsys.readouterr()  # save_pretrained's progress bar
    assert verify(src, "--batch", 0) == 2
    assert "--batch 0" in _error(capsys)


def test_model_type_without_port(tmp_path, capsys):
    config = {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert verify(tmp_path) == 2
    assert "model_type 'gpt2' has no Loom port" in _error(capsys)


def test_missing_tensor(tmp_path, capsys):
    src = saved("llama", tmp_path)
    weights = load_file(src / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert verify(src) == 2
    assert re.search(r"cannot load it: .*model\.norm\.weight", _error(capsys))


def test_folder_without_weights(tmp_path, capsys):
    (tmp_path / "config.json").write_text((TOY / "llama_toy/config.json").read_text())
    assert verify(tmp_path) == 2
    assert f"{tmp_path}: upstream AutoModelForCausalLM cannot load it" in _error(capsys)
