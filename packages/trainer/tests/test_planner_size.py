import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoConfig, DeepseekV3Config, Qwen2MoeConfig, Qwen3Config

from loom.trainer.planner import size as size_module
from loom.trainer.planner.size import (
    BILLION,
    MILLION,
    ModelSize,
    SizeCategory,
    count_parameters,
    model_size,
    size_category,
    size_from_name,
)

TOYS = Path(__file__).resolve().parents[3] / "tests/toy_config"
TOY_NAMES = sorted(p.name for p in TOYS.iterdir() if (p / "config.json").is_file())
B, M = BILLION, MILLION


def upstream_model(toy: str):
    """The toy's upstream class, named by its config.json, instantiated (random weights)."""
    arch = json.loads((TOYS / toy / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch)._from_config(AutoConfig.from_pretrained(TOYS / toy))


@pytest.fixture(scope="module")
def counts() -> dict[str, ModelSize]:
    return {toy: count_parameters(TOYS / toy) for toy in TOY_NAMES}


# ---- exact counts ------------------------------------------------------------------------


def test_every_toy_family_is_covered():
    assert len(TOY_NAMES) >= 11  # dense, MoE and vision-language toys


@pytest.mark.parametrize("toy", TOY_NAMES)
def test_meta_count_equals_the_instantiated_upstream_model(toy, counts):
    model = upstream_model(toy)
    size = counts[toy]
    assert size.total == sum(p.numel() for p in model.parameters())  # tied: counted once
    assert size.exact and toy in size.source
    config = model.config.get_text_config()
    if getattr(model.config, "tie_word_embeddings", False):
        # counting every reference would count the shared embedding twice
        twice = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
        assert size.total == twice - config.vocab_size * config.hidden_size
    if getattr(model.config, "vision_config", None) is not None:
        assert size.vision == sum(p.numel() for p in model.model.visual.parameters()) > 0
        assert size.text == size.total - size.vision
    else:
        assert size.vision == 0 and size.text == size.total


def _dense_llama_like(c: dict, qk_norm: bool) -> int:
    """Total parameters of a llama-style decoder, by hand from config.json's numbers."""
    hidden, head_dim = c["hidden_size"], c["head_dim"]
    q_heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    attention = 2 * hidden * q_heads * head_dim + 2 * hidden * kv_heads * head_dim
    norms = 2 * hidden + (2 * head_dim if qk_norm else 0)
    layer = attention + 3 * hidden * c["intermediate_size"] + norms
    embeddings = c["vocab_size"] * hidden * (1 if c["tie_word_embeddings"] else 2)
    return c["num_hidden_layers"] * layer + hidden + embeddings


@pytest.mark.parametrize(("toy", "qk_norm"), [("llama_toy", False), ("qwen3_toy", True)])
def test_dense_totals_by_hand(toy, qk_norm, counts):
    config = json.loads((TOYS / toy / "config.json").read_text())
    expected = _dense_llama_like(config, qk_norm)
    assert counts[toy].total == counts[toy].active == expected
    assert counts[toy].routed_experts == 0


FULL_SIZE = {
    "llama": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
    "mixtral": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
    ),
}


@pytest.mark.parametrize(
    ("family", "total", "active", "category"),
    [
        ("llama", 8_030_261_248, 8_030_261_248, "small"),  # Llama-3.1-8B
        ("mixtral", 46_702_792_704, 12_879_925_248, "large"),  # Mixtral-8x7B: 46.7B, 12.9B
    ],
)
def test_published_sizes_at_full_scale(family, total, active, category):
    # the released models' configs (the hub's config.json numbers); totals as published
    size = count_parameters({"model_type": family, **FULL_SIZE[family]})
    assert (size.total, size.active, size.category) == (total, active, category)


def test_tied_embeddings_count_once():
    small = dict(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    tied = count_parameters(Qwen3Config(**small, tie_word_embeddings=True))
    untied = count_parameters(Qwen3Config(**small, tie_word_embeddings=False))
    assert untied.total - tied.total == 100 * 32


def _expert(hidden: int, inter: int, bias: bool = False) -> int:
    # gate, up and down projections of one expert (gpt-oss: with biases)
    return 3 * hidden * inter + (2 * inter + hidden if bias else 0)


# (toy, parameters of one routed expert, MoE layers, experts, experts per token), by hand
# from each toy's config.json: qwen3_moe's layer 1 and qwen3_vl_moe's layer 1 are dense
# (mlp_only_layers).
MOE_TOYS = [
    ("qwen3_moe_toy", _expert(48, 20), 2, 8, 3),
    ("mixtral_toy", _expert(40, 28), 2, 4, 2),
    ("gpt_oss_toy", _expert(64, 32, bias=True), 2, 4, 2),
    ("qwen3_vl_moe_toy", _expert(64, 48), 1, 4, 2),
]


@pytest.mark.parametrize(("toy", "expert", "layers", "experts", "top_k"), MOE_TOYS)
def test_moe_active_by_hand(toy, expert, layers, experts, top_k, counts):
    size = counts[toy]
    assert size.routed_experts == layers * experts * expert
    assert size.total - size.active == layers * (experts - top_k) * expert
    assert size.category == SizeCategory.SMALL


@pytest.mark.parametrize("toy", sorted(set(TOY_NAMES) - {t[0] for t in MOE_TOYS}))
def test_dense_toys_are_all_active(toy, counts):
    assert counts[toy].active == counts[toy].total and counts[toy].routed_experts == 0


def test_shared_experts_stay_active():
    # Qwen2-MoE: one shared expert beside the routed ones; a gate of its own
    config = Qwen2MoeConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=24,
        num_experts=4,
        num_experts_per_tok=1,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    size = count_parameters(config)
    assert size.routed_experts == 2 * 4 * _expert(16, 8)
    assert size.total - size.active == 2 * 3 * _expert(16, 8)  # the shared experts stay


def test_deepseek_shared_experts_and_dense_first_layers():
    # n_routed_experts; `shared_experts` modules; the first layer dense (first_k_dense_replace)
    config = DeepseekV3Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=8,
        n_shared_experts=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        q_lora_rank=8,
        kv_lora_rank=8,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=4,
    )
    size = count_parameters(config)
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert size.total == sum(p.numel() for p in model.parameters())
    assert size.total - size.active == 2 * (4 - 2) * _expert(16, 8)


def _module_with(**params: tuple[int, ...]) -> nn.Module:
    """A module whose parameters have the given dotted names and shapes."""
    root = nn.Module()
    for dotted, shape in params.items():
        *parents, leaf = dotted.split("__")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, nn.Parameter(torch.empty(shape, device="meta")))
    return root


def test_expert_layouts_it_cannot_read_are_refused(monkeypatch):
    config = AutoConfig.from_pretrained(TOYS / "qwen3_moe_toy")  # 8 experts, 3 per token
    # stacked experts must have the experts first
    odd = _module_with(layers__mlp__experts__gate_up_proj=(3, 4))
    monkeypatch.setattr(size_module, "meta_model", lambda config: odd)
    with pytest.raises(ValueError, match=r"experts.gate_up_proj of shape \(3, 4\)"):
        count_parameters(config)
    fine = _module_with(layers__mlp__experts__gate_up_proj=(8, 4), layers__mlp__gate=(8, 2))
    monkeypatch.setattr(size_module, "meta_model", lambda config: fine)
    assert count_parameters(config).active == 8 * 4 + 8 * 2 - 5 * 4
    config.num_experts_per_tok = 0  # unset
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        count_parameters(config)


def test_vision_language_model_without_a_known_vision_tower_is_refused(monkeypatch):
    config = AutoConfig.from_pretrained(TOYS / "qwen3_vl_toy")
    eyes = _module_with(model__eyes__proj=(4, 4), model__language_model__embed=(8, 4))
    monkeypatch.setattr(size_module, "meta_model", lambda config: eyes)
    with pytest.raises(ValueError, match="vision tower cannot be counted"):
        count_parameters(config)


def test_config_object_dict_and_directory_agree(counts):
    path = TOYS / "qwen3_moe_toy"
    raw = json.loads((path / "config.json").read_text())
    by_dict, by_config = count_parameters(raw), count_parameters(AutoConfig.from_pretrained(path))
    for other in (by_dict, by_config, model_size(path), model_size(raw)):
        assert (other.total, other.active, other.vision) == (
            counts["qwen3_moe_toy"].total,
            counts["qwen3_moe_toy"].active,
            counts["qwen3_moe_toy"].vision,
        )


def test_counting_leaves_the_config_alone():
    config = AutoConfig.from_pretrained(TOYS / "qwen3_toy")
    before = config.to_dict()
    count_parameters(config)
    assert config.to_dict() == before


@pytest.mark.parametrize("toy", TOY_NAMES)
def test_loom_builds_what_was_counted(toy, counts):
    # the class Loom trains (its port where there is one) has the parameters counted
    from loom.models.registry import build_model

    model = build_model(TOYS / toy, attn_implementation="eager")
    assert sum(p.numel() for p in model.parameters()) == counts[toy].total


def test_model_size_is_immutable(counts):
    with pytest.raises(dataclasses.FrozenInstanceError):
        counts["qwen3_toy"].total = 1


# ---- estimates from a name ---------------------------------------------------------------

NAMES = [
    # plain sizes, decimals, case
    ("7B", 7 * B),
    ("8b", 8 * B),
    ("1.5B", 1_500 * M),
    ("0.5b", 500 * M),
    ("100B", 100 * B),
    ("405B", 405 * B),
    ("500M", 500 * M),
    ("135m", 135 * M),
    # a version number before the size is no size
    ("llama-3.1-8b", 8 * B),
    ("Meta-Llama-3.1-70B-Instruct", 70 * B),
    ("Qwen2.5-0.5B-Instruct", 500 * M),
    ("Mistral-7B-v0.1", 7 * B),
    ("Mistral-7B-Instruct-v0.2", 7 * B),
    ("dolphin-2.9-llama3-8b", 8 * B),
    # separators and case
    ("llama_3_8b", 8 * B),
    ("llama 3 8b", 8 * B),
    ("LLAMA-3-8B", 8 * B),
    ("LlAmA-3-8b", 8 * B),
    ("mistral7b", 7 * B),
    # spelled out
    ("8 billion", 8 * B),
    ("8-billion", 8 * B),
    ("8_billion", 8 * B),
    ("8billion", 8 * B),
    ("1.5 Billion", 1_500 * M),
    ("500 million", 500 * M),
    ("7bn", 7 * B),
    # a mixture of experts: N x the size of one expert
    ("Mixtral-8x7B", 56 * B),
    ("mixtral-8x22b-instruct", 176 * B),
    ("8X7B", 56 * B),
    # BLOOM writes 1.7B as 1b7
    ("bloom-1b7", 1_700 * M),
    ("bloomz-7b1", 7_100 * M),
    # bits, context lengths and versions are no sizes
    ("Llama-7b-8bit", 7 * B),
    ("mpt-7b-8k", 7 * B),
    ("Qwen-7B-Chat-Int4", 7 * B),
    # several sizes: the first one
    ("llama-7b-vs-13b", 7 * B),
    # real hub ids
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 7 * B),
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", 14 * B),
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", 32 * B),
    ("deepseek-ai/DeepSeek-R1-Distill-Llama-70B", 70 * B),
    ("meta-llama/Llama-2-7b-hf", 7 * B),
    ("meta-llama/Llama-2-13b-chat-hf", 13 * B),
    ("meta-llama/Meta-Llama-3-8B", 8 * B),
    ("NousResearch/Hermes-2-Pro-Mistral-7B", 7 * B),
    ("TheBloke/Llama-2-13B-chat-GPTQ", 13 * B),
    ("HuggingFaceTB/SmolLM2-1.7B", 1_700 * M),
    ("openai/gpt-oss-20b", 20 * B),
    # known names without a number
    ("phi-2", 2_700 * M),
    ("phi2", 2_700 * M),
    ("Phi_2", 2_700 * M),
    ("microsoft/phi-2", 2_700 * M),
    ("microsoft/phi-1_5", 1_400 * M),
    ("Phi-3-mini-4k-instruct", 3_800 * M),
    ("microsoft/phi-4", 14 * B),
    ("gpt2", 124 * M),
    ("gpt2-xl", 1_500 * M),
    ("distilgpt2", 82 * M),
    ("deepseek-ai/DeepSeek-V3", 671 * B),
    ("deepseek-ai/DeepSeek-V2-Lite", 15_700 * M),
    ("mistralai/Mistral-Nemo-Instruct-2407", 12 * B),
]


@pytest.mark.parametrize(("name", "total"), NAMES)
def test_size_from_name(name, total):
    size = size_from_name(name)
    assert size is not None, name
    assert (size.total, size.active) == (total, total)
    assert not size.exact and name in size.source
    assert size.vision == size.routed_experts == 0


def test_active_size_in_the_name():
    size = size_from_name("Qwen/Qwen3-30B-A3B-Instruct-2507")
    assert (size.total, size.active) == (30 * B, 3 * B)
    assert size.category == SizeCategory.LARGE  # the total decides
    assert size_from_name("Qwen3-235B-A22B").active == 22 * B


@pytest.mark.parametrize(
    "name",
    [
        "",
        "   ",
        "b",
        "B",
        "x",
        "qwen",
        "llama3",
        "mistral",
        "my-model",
        "model-v2",
        "8bit",
        "ctx-32k",
        "Qwen1.5-MoE-A2.7B",
        "/",
    ],
)
def test_no_size_in_the_name(name):
    # family names alone name several sizes; an active size alone gives no total
    assert size_from_name(name) is None
    assert model_size(name) is None


@pytest.mark.parametrize(
    ("path", "total"),
    [
        ("./models/mistral-7b", 7 * B),
        ("models/llama-3.1-8b/", 8 * B),
        ("/ckpt/llama-3.1-8b/step-500", 8 * B),
        ("/data/7b-runs/qwen-0.5b", 500 * M),
        (Path("runs") / "phi-2", 2_700 * M),
        ("C:\\models\\gemma-2-9b-it", 9 * B),
    ],
)
def test_paths_without_config_read_their_folder_names(path, total):
    size = model_size(path)
    assert size is not None and size.total == total and not size.exact


def test_local_path_reads_its_config_before_its_name(tmp_path, counts):
    folder = tmp_path / "mistral-7b"
    folder.mkdir()
    assert model_size(folder).total == 7 * B  # no config.json: the name
    shutil.copy(TOYS / "qwen3_toy" / "config.json", folder / "config.json")
    size = model_size(folder)
    assert size.exact and size.total == counts["qwen3_toy"].total
    assert model_size(str(folder) + "/").total == counts["qwen3_toy"].total


def test_unreadable_config_falls_back_to_the_name(tmp_path, caplog):
    folder = tmp_path / "custom-13b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no_such_family"}))
    with caplog.at_level(logging.WARNING):
        size = model_size(folder)
    assert size.total == 13 * B and not size.exact
    assert "config.json" in caplog.text
    with pytest.raises(ValueError):
        count_parameters(folder)  # asked for exact counts: no guess


# ---- categories --------------------------------------------------------------------------

BOUNDARIES = [
    (0, "small"),
    (1, "small"),
    (7 * B, "small"),
    (10 * B - 1, "small"),
    (10 * B, "small"),
    (10 * B + 1, "medium"),
    (11 * B, "medium"),
    (20 * B, "medium"),
    (20 * B + 1, "large"),
    (21 * B, "large"),
    (50 * B, "large"),
    (50 * B + 1, "xlarge"),
    (51 * B, "xlarge"),
    (405 * B, "xlarge"),
]


@pytest.mark.parametrize(("params", "category"), BOUNDARIES)
def test_size_category_boundaries(params, category):
    assert size_category(params) == SizeCategory(category) == category


@pytest.mark.parametrize(
    ("name", "category"),
    [
        ("3B", "small"),
        ("7B", "small"),
        ("10B", "small"),
        ("10.5B", "medium"),
        ("11B", "medium"),
        ("14B", "medium"),
        ("20B", "medium"),
        ("21B", "large"),
        ("32B", "large"),
        ("50B", "large"),
        ("51B", "xlarge"),
        ("70B", "xlarge"),
        ("Mixtral-8x7B", "xlarge"),
        ("500M", "small"),
    ],
)
def test_category_of_named_sizes(name, category):
    assert size_from_name(name).category == category


def test_negative_count_is_refused():
    with pytest.raises(ValueError, match="negative"):
        size_category(-1)
