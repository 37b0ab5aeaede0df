"""``train.auto``'s rules, against the memory model: of the settings that fit, the one
``relative_speed`` ranks fastest is taken (large micro-batches and no checkpointing where
they fit, checkpointing where it buys a longer forward of a narrow model, sequence
parallelism only when a row does not fit); keys the config sets win; the config given is
never changed; nothing that fits is a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoConfig

from loom.trainer.config import load_config
from loom.trainer.errors import ConfigError
from loom.trainer.planner.auto import (
    HEADROOM,
    choose,
    explicit_keys,
    lora_rank_for,
    relative_speed,
)
from loom.trainer.planner.hardware import DeviceProfile
from loom.trainer.planner.memory import GIB, Setup, estimate
from loom.trainer.planner.plan import setup_of
from loom.trainer.planner.size import count_parameters

SHAPE = {  # a Qwen3-1.7B-like model: exact counts come from this config
    "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
    "head_dim": 128, "tie_word_embeddings": True,
}  # fmt: skip


def config_of(tmp_path: Path, overrides: list[str] = ()):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(SHAPE))
    raw = {
        "model": {"path": str(model)},
        "data": {"path": "data.jsonl", "max_seq_len": 8192},
        "train": {"output_dir": str(tmp_path / "run"), "steps": 1, "global_batch_size": 8},
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path, list(overrides)), AutoConfig.from_pretrained(model)


def gpu(gib: float) -> DeviceProfile:
    return DeviceProfile("test-gpu", gib, 1000.0, "nvlink")


def test_roomy_gpu_takes_the_fastest_settings(tmp_path):
    config, model = config_of(tmp_path)
    choice = choose(config, 1, gpu(4000), model)
    assert choice.config.train.micro_batch_size == 8  # the whole global batch per forward
    assert not choice.config.memory.activation_checkpointing
    assert choice.estimate.peak <= HEADROOM * 4000 * GIB


def test_tighter_gpus_get_smaller_micro_batches_then_checkpointing(tmp_path):
    config, model = config_of(tmp_path)
    seen = []
    for gib in (400, 120, 60, 45):
        c = choose(config, 1, gpu(gib), model).config
        seen.append((c.train.micro_batch_size, c.memory.activation_checkpointing))
        # what was chosen fits, and a faster neighbour would not
        assert estimate(model, setup_of(c, 1)).peak <= HEADROOM * gib * GIB
    assert seen[0][0] > seen[1][0]  # a smaller micro-batch first
    assert seen[-1][1] and not seen[0][1]  # checkpointing only where needed
    assert [m for m, _ in seen] != sorted(m for m, _ in seen)


def test_sequence_parallelism_only_when_one_row_does_not_fit(tmp_path):
    config, model = config_of(
        tmp_path, ["--data.max_seq_len", "1048576", "--train.global_batch_size", "4"]
    )
    one = estimate(model, setup_of(config.model_copy(), 4)).components
    choice = choose(config, 4, gpu(60), model)
    assert choice.config.parallel.sp_size > 1
    assert choice.changes["parallel.sp_size"] == choice.config.parallel.sp_size
    assert one["activations"] > 0


def test_keys_the_config_sets_win_and_the_input_is_untouched(tmp_path):
    config, model = config_of(tmp_path, ["--memory.activation_checkpointing", "false"])
    before = config.model_dump()
    assert "memory.activation_checkpointing" in explicit_keys(config)
    free = choose(config_of(tmp_path)[0], 1, gpu(45), model)
    assert free.config.memory.activation_checkpointing  # what the rules take unbound
    with pytest.raises(ConfigError, match="nothing fits"):  # the config's key is not flipped
        choose(config, 1, gpu(45), model)
    choice = choose(config, 1, gpu(55), model)
    assert not choice.config.memory.activation_checkpointing
    assert "memory.activation_checkpointing" not in choice.changes
    assert config.model_dump() == before


def test_nothing_fits_is_a_clear_error(tmp_path):
    config, model = config_of(tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"train.auto: nothing fits 1 x test-gpu \(4 GiB each\): .* needs .* GiB a GPU",
    ):
        choose(config, 1, gpu(4), model)


def test_speed_weighs_checkpointing_against_short_forwards():
    """Narrow models need long forwards to fill the GPU (a bigger micro-batch with
    checkpointing wins); wide ones are full at one row (no checkpointing wins)."""
    one, four_ac = Setup(seq=4096), Setup(seq=4096, micro=4, activation_checkpointing=True)
    assert relative_speed(four_ac, 1024) > relative_speed(one, 1024)
    two_ac = Setup(seq=4096, micro=2, activation_checkpointing=True)
    assert relative_speed(one, 4096) > relative_speed(two_ac, 4096)
    lora = Setup(seq=4096, lora_rank=16)
    assert relative_speed(lora, 2048) < relative_speed(one, 2048)  # less work per token
    assert relative_speed(Setup(seq=4096, lora_rank=16, lora_quantize=True), 2048) < (
        relative_speed(lora, 2048)
    )


def shaped(hidden: int, layers: int, inter: int) -> dict:
    return {"model_type": "llama", "vocab_size": 32000, "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": hidden // 128, "num_key_value_heads": 8}  # fmt: skip


def test_lora_rank_auto_grows_with_the_model():
    ranks = []
    for shape in (shaped(2048, 28, 6144), shaped(5120, 40, 13824), shaped(5120, 64, 27648),
                  shaped(8192, 80, 28672)):  # fmt: skip
        config = AutoConfig.for_model(**shape)
        ranks.append((count_parameters(config).category.value, lora_rank_for(config)))
    assert [c for c, _ in ranks] == ["small", "medium", "large", "xlarge"]
    values = [r for _, r in ranks]
    assert values == sorted(values) and len(set(values)) == 4
    assert all(8 <= r <= 256 and r % 4 == 0 for r in values)


def test_lora_rank_auto_under_train_auto(tmp_path):
    config, model = config_of(tmp_path, ["--lora.rank", "auto"])
    before = config.model_dump()
    roomy = choose(config, 1, gpu(4000), model)
    assert roomy.config.lora.rank == lora_rank_for(model) == 16  # a 1.7B model: small
    assert roomy.config.lora.alpha == 32.0 and roomy.changes["lora.rank"] == 16
    assert config.model_dump() == before and config.lora.rank == "auto"
    kept = choose(config_of(tmp_path, ["--lora.rank", "auto", "--lora.alpha", "8"])[0], 1,
                  gpu(4000), model)  # fmt: skip
    assert kept.config.lora.alpha == 8.0 and "lora.alpha" not in kept.changes
    fixed = choose(config_of(tmp_path, ["--lora.rank", "4"])[0], 1, gpu(4000), model)
    assert fixed.config.lora.rank == 4 and "lora.rank" not in fixed.changes


def test_lora_rank_auto_halves_where_memory_is_short(tmp_path, monkeypatch):
    import loom.trainer.planner.auto as auto

    config, model = config_of(tmp_path, ["--lora.rank", "auto"])
    monkeypatch.setitem(auto.LORA_RANKS, count_parameters(model).category, 256)
    least = ["--memory.activation_checkpointing", "true", "--memory.activation_offload",
             "true", "--train.micro_batch_size", "1"]  # fmt: skip

    def smallest(rank: int) -> float:
        return estimate(
            model, setup_of(config_of(tmp_path, ["--lora.rank", str(rank), *least])[0], 1)
        ).peak

    # a device between the two ranks' smallest steps: 256 does not fit anywhere, 128 does
    device = (smallest(256) + smallest(128)) / 2 / HEADROOM / GIB
    choice = choose(config, 1, gpu(device), model)
    assert choice.config.lora.rank == 128 and choice.changes["lora.rank"] == 128
    assert choice.config.lora.alpha == 256.0
    with pytest.raises(ConfigError, match="nothing fits"):
        choose(config, 1, gpu(1), model)


def test_lora_rank_auto_without_train_auto(tmp_path):
    from loom.trainer.train import auto_lora_rank

    config, model = config_of(tmp_path, ["--lora.rank", "auto"])
    resolved = auto_lora_rank(config)
    assert (resolved.lora.rank, resolved.lora.alpha) == (lora_rank_for(model), 32.0)
    assert config.lora.rank == "auto"
    with pytest.raises(
        ConfigError, match=r"lora.rank: .*must be 0 \(off\), a positive rank or auto"
    ):
        config_of(tmp_path, ["--lora.rank", "-2"])
