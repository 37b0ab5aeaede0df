"""The trainer's vision-language switches on every VLM toy config: ``model.freeze_vit``
freezes exactly upstream's vision tower (its own class, built alone from the vision
config, names the parameters), ``optim.vision_lr`` puts exactly those in their group."""

import json
from pathlib import Path

import pytest

from loom.dist.mesh import destroy_parallel, init_parallel
from loom.trainer.config import load_config
from loom.trainer.errors import ConfigError
from loom.trainer.optim import param_groups
from loom.trainer.parallelize import build_parallel_model

ROOT = Path(__file__).resolve().parents[3]
VLM_TOYS = sorted(
    path.parent
    for path in (ROOT / "tests/toy_config").glob("*/config.json")
    if "vision_config" in json.loads(path.read_text())
)


@pytest.fixture
def parallel():
    state = init_parallel()
    yield state
    destroy_parallel()


def build(parallel, toy: Path, *flags: str):
    config = load_config(ROOT / "examples/tiny-vlm/train.yaml", ["--model.path", str(toy), *flags])
    return config, build_parallel_model(config, parallel)


def upstream_vision_names(model) -> set[str]:
    """The parameter names of upstream's vision model class built alone, as the VLM
    names them (``model.visual.``)."""
    cls = type(model.model.visual)
    alone = cls._from_config(model.config.vision_config)
    return {f"model.visual.{name}" for name, _ in alone.named_parameters()}


def test_there_are_vlm_toys():
    assert {"qwen2_5_vl_toy", "qwen3_vl_toy"} <= {toy.name for toy in VLM_TOYS}


@pytest.mark.parametrize("toy", VLM_TOYS, ids=lambda p: p.name)
@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_vit_freezes_exactly_the_vision_tower(parallel, toy, freeze):
    _, model = build(parallel, toy, "--model.freeze_vit", str(freeze).lower())
    names = {name for name, _ in model.named_parameters()}
    vision = upstream_vision_names(model)
    assert vision and vision < names  # the merger and deepstack mergers included
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == (vision if freeze else set())
    assert any(".language_model." in name for name in names - vision)


@pytest.mark.parametrize("toy", VLM_TOYS, ids=lambda p: p.name)
def test_vision_lr_groups_exactly_the_vision_tower(parallel, toy):
    config, model = build(parallel, toy, "--optim.vision_lr", "1e-4")
    text_group, vision_group = param_groups(model, config.optim)
    by_id = {id(p): name for name, p in model.named_parameters()}
    assert {by_id[id(p)] for p in vision_group["params"]} == upstream_vision_names(model)
    assert vision_group["lr"] == 1e-4 and "lr" not in text_group
    assert len(text_group["params"]) + len(vision_group["params"]) == len(by_id)


@pytest.mark.parametrize("toy", VLM_TOYS, ids=lambda p: p.name)
def test_vision_lr_with_a_frozen_tower_is_refused(parallel, toy):
    config, model = build(parallel, toy, "--optim.vision_lr", "1e-4", "--model.freeze_vit", "true")
    with pytest.raises(ConfigError, match=r"optim\.vision_lr: the model has no trainable vision"):
        param_groups(model, config.optim)
