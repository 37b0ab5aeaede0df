"""What only the Mixtral port has (the rest is test_moe.py's, for both MoE ports):

- HF names Mixtral's MoE block ``block_sparse_moe``, Loom (both majors' ports, and v5
  in memory) ``mlp``: the router is renamed on the way in and back on export;
- Mixtral's attention passes ``config.sliding_window`` to the attention backend; Loom's
  backends have no window, so they refuse samples longer than it and are exact below.
"""

from __future__ import annotations

import pytest
import torch
from _ports import toy
from transformers import AutoConfig, AutoModelForCausalLM

from loom.dist.loading import load_safetensors
from loom.models import build_model
from loom.models.mixtral.converter import MixtralConverter, to_hf
from loom.models.registry import port_hooks

TOY = toy("mixtral")
E, INTER, HIDDEN = 4, 28, 40  # the toy's
RTOL, ATOL = 1e-5, 1e-6  # fp32 on CPU


def test_router_is_renamed_both_ways():
    converter = MixtralConverter(E, HIDDEN, INTER)
    router = torch.randn(E, HIDDEN)
    hf_key, loom_key = (
        "model.layers.1.block_sparse_moe.gate.weight",
        "model.layers.1.mlp.gate.weight",
    )
    assert converter.can_handle(hf_key) and not converter.can_handle(loom_key)
    assert converter.convert(hf_key, router) == [(loom_key, router)]
    # a stacked tensor under HF's block name is Loom's layout once renamed
    gate_up = torch.randn(E, 2 * INTER, HIDDEN)
    stacked = "model.layers.0.block_sparse_moe.experts.gate_up_proj"
    assert converter.convert(stacked, gate_up) == [("model.layers.0.mlp.experts.gate_up_proj", gate_up)]  # fmt: skip
    with pytest.raises(ValueError, match="not an expert tensor"):
        converter.convert("model.layers.0.self_attn.q_proj.weight", torch.zeros(1))
    converter.finalize()
    back = to_hf({loom_key: router, "model.norm.weight": torch.ones(HIDDEN)})
    assert set(back) == {hf_key, "model.norm.weight"} and back[hf_key] is router


def test_registry_hooks():
    hooks = port_hooks("mixtral")
    assert hooks.to_hf is to_hf and hooks.converter.__self__ is MixtralConverter
    assert hooks.expert_plan is port_hooks("qwen3_moe").expert_plan  # one shared plan


@pytest.mark.parametrize("backend", ["loom_sdpa", "loom_varlen"])
def test_sliding_window_refused_beyond_exact_below(backend, tmp_path):
    config = AutoConfig.from_pretrained(TOY)
    config.sliding_window = 8
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = build_model(config, attn_implementation=backend)
    hf.save_pretrained(tmp_path)  # HF's layout (per-expert keys), read by Loom's loader
    load_safetensors(model, tmp_path, MixtralConverter.from_config(config))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        short = ids[:, :8]  # no longer than the window: the window changes nothing
        want = hf(input_ids=short).logits
        torch.testing.assert_close(model(input_ids=short).logits, want, rtol=RTOL, atol=ATOL)
        with pytest.raises(ValueError, match=r"sliding_window=8, but a sample is 16 tokens"):
            model(input_ids=ids)
