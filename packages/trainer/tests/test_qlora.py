"""QLoRA's 4-bit base (torchao NF4) on a port, on the CPU: the quantized model computes
what LoRA on the dequantized base computes (loss and every adapter's gradient), stores
about half a byte a weight, and merges into the dequantized base; the trainer's limits
(CUDA, one GPU, sizes NF4 can block) are refused by name."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig

from loom.models import build_model
from loom.trainer.config import Config, LoraConfig
from loom.trainer.errors import ConfigError
from loom.trainer.lora import (
    QLORA_CPU,
    apply_lora,
    check_qlora,
    is_nf4,
    merge_adapters_,
    quantize_base,
)

# CI runs these in the qlora nox session, which installs torchao (pyproject's qlora group)
pytest.importorskip("torchao", reason="torchao is installed by the qlora nox session")

LORA = LoraConfig(rank=4, alpha=8)


def port(hidden: int = 128, heads: int = 4, kv_heads: int = 4) -> torch.nn.Module:
    config = AutoConfig.for_model(
        "qwen3", vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=hidden // heads, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(config, attn_implementation="loom_sdpa", dtype=torch.float32)
    apply_lora(model, LORA)
    with torch.no_grad():  # B is zeros at the start; random B gives every adapter a gradient
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.05)
    return model


def dequantized_copy(quantized: torch.nn.Module, plain: torch.nn.Module) -> torch.nn.Module:
    """``plain`` with each LoRA layer's base weight set to the NF4 weight's values."""
    reference = copy.deepcopy(plain)
    for layer in quantized.loom_lora_layers:
        weight = quantized.get_submodule(layer).base_layer.weight
        with torch.no_grad():
            reference.get_submodule(layer).base_layer.weight.copy_(weight.get_original_weight())
    return reference


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_nf4_base_computes_what_lora_on_the_dequantized_base_computes():
    plain = port()
    quantized = copy.deepcopy(plain)
    quantize_base(quantized)
    layers = quantized.loom_lora_layers
    assert len(layers) == 2 * 7
    assert all(is_nf4(quantized.get_submodule(n).base_layer.weight) for n in layers)
    reference = dequantized_copy(quantized, plain)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    want_loss, want = loss_and_grads(reference, ids)
    got_loss, got = loss_and_grads(quantized, ids)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert got.keys() == want.keys() and len(got) == 2 * len(layers)  # adapters only
    for name in want:
        assert want[name].abs().max() > 0, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
    for name in layers:  # and the values are NF4's
        original = plain.get_submodule(name).base_layer.weight.to(torch.bfloat16).float()
        check_nf4(original, reference.get_submodule(name).base_layer.weight, name)


# The 16 NormalFloat-4 levels (QLoRA, Dettmers et al. 2023, appendix E).
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])  # fmt: skip


def check_nf4(original: torch.Tensor, values: torch.Tensor, name: str) -> None:
    """Each block of 64 holds its absmax times the NF4 level nearest each weight's share
    of it; the absmax is itself stored in 8 bits per 256 blocks (double quantization),
    which costs a few tenths of a percent."""
    want, got = original.reshape(-1, 64), values.detach().float().reshape(-1, 64)
    scale_want, scale_got = want.abs().amax(1, keepdim=True), got.abs().amax(1, keepdim=True)
    nearest = (want / scale_want)[..., None].sub(NF4_LEVELS).abs().argmin(-1)
    levels = (got / scale_got)[..., None].sub(NF4_LEVELS).abs()
    assert levels.amin(-1).max() < 0.01, name  # every value sits on a level
    assert (levels.argmin(-1) == nearest).float().mean() > 0.99, name
    assert (scale_got / scale_want - 1).abs().mean() < 0.004, name


def test_checkpointing_and_mlp_tiles_compose_with_the_nf4_base():
    """Recomputed layers and tiled MLPs dequantize again in backward: same numbers."""
    from loom.trainer.memory import tile_mlps
    from loom.trainer.parallelize import enable_activation_checkpointing

    model = port()
    quantize_base(model)
    memory_saving = copy.deepcopy(model)
    enable_activation_checkpointing(memory_saving)
    tile_mlps(memory_saving, 8)
    memory_saving.train()
    model.train()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    want_loss, want = loss_and_grads(model, ids)
    got_loss, got = loss_and_grads(memory_saving, ids)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_nf4_storage_is_about_half_a_byte_a_weight():
    model = port()
    quantize_base(model)
    for name in model.loom_lora_layers:
        weight = model.get_submodule(name).base_layer.weight.data
        inner, _ = weight.__tensor_flatten__()
        stored = sum(getattr(weight, a).numel() * getattr(weight, a).element_size() for a in inner)
        assert 0.5 < stored / weight.numel() < 0.53, (name, stored / weight.numel())


def test_merge_adds_the_update_to_the_dequantized_base():
    model = port()
    quantize_base(model)
    layer = model.loom_lora_layers[0]
    module = model.get_submodule(layer)
    base = module.base_layer.weight.get_original_weight().float()
    update = module.lora_B.default.weight @ module.lora_A.default.weight * (8 / 4)
    merged = merge_adapters_(model, LORA)
    assert not any(is_nf4(p) for p in model.parameters())
    torch.testing.assert_close(merged[f"{layer}.weight"].float(), (base + update).detach())


def test_limits_are_refused_by_name():
    with pytest.raises(ConfigError, match="CUDA GPU only"):
        check_qlora(torch.device("cpu"), 1)
    assert "lora.quantize: none" in QLORA_CPU
    with pytest.raises(ConfigError, match="one GPU; this run has 2 ranks"):
        check_qlora(torch.device("cuda"), 2)
    model = port(kv_heads=2)  # k_proj: 64 x 128 weights
    with pytest.raises(ConfigError, match=r"k_proj has 8192 weights; NF4 quantizes in groups"):
        quantize_base(model)
    with pytest.raises(ValueError, match=r"needs lora\.rank > 0"):
        LoraConfig(quantize="nf4")
    raw = {"model": {"path": "m"}, "data": {"path": "d.jsonl"},
           "train": {"output_dir": "o", "steps": 1, "global_batch_size": 1},
           "lora": {"rank": 4, "quantize": "nf4"}}  # fmt: skip
    Config.model_validate(raw)
    for section, key in (("memory", "compile"), ("parallel", "cpu_offload")):
        with pytest.raises(ValueError, match=f"nf4 with {section}.{key} is not proven yet"):
            Config.model_validate(raw | {section: {key: True}})
