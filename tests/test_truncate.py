"""``loom truncate`` on tiny upstream checkpoints of every model Loom accepts (each port and
each upstream family), saved sharded by upstream's ``save_pretrained``: the result loads
in upstream's ``from_pretrained`` with no missing or unexpected key, and computes exactly
what the original model's first layers compute (per-layer attention types, dense layers
of MoE models and the vision tower included). Bad input is one ``error:`` line naming the
file or key, exit status 2, and no DST."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from _vlm import vlm_batch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from loom.models.registry import PORTS, UPSTREAM_FAMILIES
from loom.trainer.cli import main

TOY = Path(__file__).resolve().parent / "toy_config"
INDEX = "model.safetensors.index.json"
MODELS = [*PORTS, *UPSTREAM_FAMILIES]
LAYERS, KEEP, WINDOW, SEQ = 4, 2, 4, 12


def toy(name: str) -> dict:
    """The toy config with ``LAYERS`` decoder layers and every per-layer list a truncation
    must cut made uneven: sliding-window layers from the second on (or alternating), MoE
    layers 1 and 3 dense."""
    raw = json.loads((TOY / f"{name}_toy/config.json").read_text())
    text = raw.get("text_config", raw)
    text["num_hidden_layers"] = LAYERS
    if "layer_types" in text:
        text["layer_types"] = ["sliding_attention", "full_attention"] * (LAYERS // 2)
        text["sliding_window"] = WINDOW
    elif name in ("qwen2", "qwen3", "qwen2_5_vl"):
        text.update(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    if "mlp_only_layers" in text:
        text["mlp_only_layers"] = [1, 3]
    return raw


def auto(config):
    vlm = getattr(config, "vision_config", None) is not None
    return AutoModelForImageTextToText if vlm else AutoModelForCausalLM


def save_upstream(raw: dict, out: Path):
    """A seeded random upstream model of config ``raw``, saved sharded with an index."""
    config = AutoConfig.for_model(**raw)
    torch.manual_seed(0)
    model = auto(config).from_config(config, attn_implementation="eager").eval()
    model.save_pretrained(out, max_shard_size="100KB")
    assert len(set(json.loads((out / INDEX).read_text())["weight_map"].values())) > 1
    (out / "chat_template.jinja").write_text("{{ messages }}")  # a file to copy along
    return model


def inputs(config) -> dict:
    if getattr(config, "vision_config", None) is not None:
        return vlm_batch(config).upstream_inputs(config)  # two rows, three images
    gen = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, config.vocab_size, (2, SEQ), generator=gen)}


def logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


def load(path: Path):
    config = AutoConfig.from_pretrained(path)
    model, info = auto(config).from_pretrained(
        path, output_loading_info=True, attn_implementation="eager"
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched key
    return model.eval()


def text_layers(model):
    return getattr(model.model, "language_model", model.model)


def first_layers(state: dict, keep: int) -> dict:
    """The state dict without the text decoder's layers from ``keep`` on."""
    layer = re.compile(r"(?:^|\.)layers\.(\d+)\.")
    return {k: v for k, v in state.items() if not ((m := layer.search(k)) and int(m[1]) >= keep)}


def truncate(*args) -> int:
    return main(["truncate", *map(str, args)])


@pytest.mark.parametrize("name", MODELS)
def test_truncated_checkpoint_is_the_first_layers(name, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    original = save_upstream(toy(name), src)
    assert truncate(src, dst, "--layers", KEEP) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"src", "dst"}  # no partial folder left

    before = json.loads((src / "config.json").read_text())
    after = json.loads((dst / "config.json").read_text())
    text_before, text_after = (c.get("text_config", c) for c in (before, after))
    assert text_after["num_hidden_layers"] == KEEP
    if "layer_types" in text_before:
        assert text_after["layer_types"] == text_before["layer_types"][:KEEP]
        assert len(set(text_after["layer_types"])) == 2  # both kinds survive the cut
    if "mlp_only_layers" in text_before:
        assert text_after["mlp_only_layers"] == [1]
    changed = {"num_hidden_layers", "layer_types", "mlp_only_layers"}
    assert {k: v for k, v in text_after.items() if k not in changed} == {
        k: v for k, v in text_before.items() if k not in changed
    }
    assert after.get("vision_config") == before.get("vision_config")  # whole tower kept
    assert (dst / "chat_template.jinja").read_text() == "{{ messages }}"
    assert (dst / "generation_config.json").is_file()
    assert len(set(json.loads((dst / INDEX).read_text())["weight_map"].values())) > 1

    truncated = load(dst)
    # upstream's model of the truncated config, holding the original's first layers
    reference = auto(truncated.config).from_config(truncated.config, attn_implementation="eager")
    reference.load_state_dict(first_layers(original.state_dict(), KEEP), strict=True)
    batch = inputs(original.config)
    got = logits(truncated, batch)
    assert torch.equal(got, logits(reference.eval(), batch))
    # and the original model itself, run through its first layers only
    text_layers(original).layers = text_layers(original).layers[:KEEP]
    assert torch.equal(got, logits(original, batch))


VLMS = [name for name in MODELS if "vision_config" in json.loads((TOY / f"{name}_toy/config.json").read_text())]  # fmt: skip


@pytest.mark.parametrize("name", VLMS)
def test_vision_layers(name, tmp_path):
    """--vision-layers 2 of 3 blocks: the block lists keep numbers below 2, and a deepstack
    merger kept moves to its new place in the list ([2, 0] -> [0]: merger 1 -> 0)."""
    raw = toy(name)
    vision = raw["vision_config"]
    vision["depth"] = 3
    if "deepstack_visual_indexes" in vision:
        vision["deepstack_visual_indexes"] = [2, 0]
    if "fullatt_block_indexes" in vision:
        vision["fullatt_block_indexes"] = [0, 2]
    src, dst = tmp_path / "src", tmp_path / "dst"
    original = save_upstream(raw, src)
    assert truncate(src, dst, "--layers", KEEP, "--vision-layers", 2) == 0
    after = json.loads((dst / "config.json").read_text())["vision_config"]
    assert after["depth"] == 2
    assert after.get("deepstack_visual_indexes", [0]) == [0]
    assert after.get("fullatt_block_indexes", [0]) == [0]

    truncated = load(dst)
    state = {}
    for key, tensor in first_layers(original.state_dict(), KEEP).items():
        if ".blocks.2." in key or ".deepstack_merger_list.0." in key:
            continue
        state[key.replace(".deepstack_merger_list.1.", ".deepstack_merger_list.0.")] = tensor
    reference = auto(truncated.config).from_config(truncated.config, attn_implementation="eager")
    reference.load_state_dict(state, strict=True)
    batch = inputs(original.config)
    assert torch.equal(logits(truncated, batch), logits(reference.eval(), batch))


def test_one_file_stays_one_file(tmp_path):
    """A checkpoint in one file gives one file, without an index."""
    config = AutoConfig.for_model(**toy("llama"))
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "src")
    assert truncate(tmp_path / "src", tmp_path / "dst", "--layers", 1) == 0
    assert sorted(p.name for p in (tmp_path / "dst").glob("model*")) == ["model.safetensors"]
    load(tmp_path / "dst")


# ------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded") / "llama"
    save_upstream(toy("llama"), out)
    return out


def _shard(src: Path, index: int = 0) -> Path:
    names = sorted(set(json.loads((src / INDEX).read_text())["weight_map"].values()))
    return src / names[index]


def no_config(src: Path) -> tuple[list, str]:
    (src / "config.json").unlink()
    return ["--layers", 2], rf"{src} has no config.json"


def zero_layers(src: Path) -> tuple[list, str]:
    return ["--layers", 0], rf"--layers 0: num_hidden_layers in {src}/config.json is 4"


def too_many_layers(src: Path) -> tuple[list, str]:
    return ["--layers", 5], rf"--layers 5: num_hidden_layers in {src}/config.json is 4"


def vision_layers_without_vision(src: Path) -> tuple[list, str]:
    return ["--layers", 2, "--vision-layers", 1], rf"{src}/config.json has no vision_config"


def missing_shard(src: Path) -> tuple[list, str]:
    shard = _shard(src, 1)
    shard.unlink()
    return ["--layers", 2], rf"{src / INDEX} lists {shard.name}, which does not exist"


def key_not_in_shard(src: Path) -> tuple[list, str]:
    index = json.loads((src / INDEX).read_text())
    key = "model.norm.weight"
    wrong = next(f for f in index["weight_map"].values() if f != index["weight_map"][key])
    index["weight_map"][key] = wrong
    (src / INDEX).write_text(json.dumps(index))
    return ["--layers", 2], rf"{src / wrong} lacks '{re.escape(key)}', which {src / INDEX}"


def truncated_shard(src: Path) -> tuple[list, str]:
    shard = _shard(src)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size - 100])
    return ["--layers", 2], rf"{shard}: tensor '[\w.]+' ends at byte \d+, past the end"


def garbage_shard(src: Path) -> tuple[list, str]:
    shard = _shard(src)
    shard.write_bytes(b"not a safetensors file")
    return ["--layers", 2], rf"{shard}: not a safetensors file, or truncated"


BAD = [no_config, zero_layers, too_many_layers, vision_layers_without_vision, missing_shard,
       key_not_in_shard, truncated_shard, garbage_shard]  # fmt: skip


@pytest.mark.parametrize("bad", BAD, ids=[b.__name__ for b in BAD])
def test_bad_input_is_one_error_line(bad, sharded, tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "out" / "dst"
    shutil.copytree(sharded, src)
    args, expected = bad(src)
    assert truncate(src, dst, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(expected, err), err
    assert not dst.exists() and not (tmp_path / "out" / ".dst.partial").exists()


def test_existing_dst_is_refused(sharded, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert truncate(sharded, dst, "--layers", 2) == 2
    assert f"error: {dst} already exists" in capsys.readouterr().err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
