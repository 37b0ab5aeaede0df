"""Qwen3-VL-MoE port for transformers v4.

Regenerate (under transformers 4.57.3): loom-patchgen generate loom.models.qwen3_vl_moe.patch_config_v4 --diff

The vision-language ports' patches (v4 variants) and v4's ``Qwen3VLMoeTextSparseMoeBlock``
rewritten around Loom's experts: v4's ``Qwen3VLMoeTextExperts`` stacks the experts the
other way round (``x @ w``: ``gate_up_proj`` [E, H, 2I], ``down_proj`` [E, I, H]) and
takes dense routing weights, so the block builds a ``Qwen3VLMoeStackedExperts`` (v5's
names and layout, so state dicts, the expert plan and the converter are the v5 port's)
and keeps upstream's router (softmax, top-k, renormalised) and return value
``(hidden_states, router_logits)``, which v4's ``OutputRecorder`` records.
"""

from __future__ import annotations

import torch
from torch import nn

from loom.models.qwen3_vl_moe.experts import Qwen3VLMoeStackedExperts
from loom.models.vlm_patch_config import vlm_port

config = vlm_port("qwen3_vl_moe", "Qwen3VLMoe", major=4)
config.add_import("loom.models.qwen3_vl_moe.experts", names=["Qwen3VLMoeStackedExperts"])


# ================================================================
# Patch: Qwen3VLMoeTextSparseMoeBlock.__init__
# 1. the routed experts are one Qwen3VLMoeStackedExperts ([E, 2I, H] / [E, H, I]: eager
#    loop, fused grouped GEMM or expert-parallel), drawn N(0, initializer_range) here as
#    v4's _init_weights draws upstream's experts
# ================================================================
@config.override_method(
    "Qwen3VLMoeTextSparseMoeBlock.__init__", description="the experts as Loom's stacked experts"
)
def sparse_moe_block_init(self, config):
    super().__init__()
    self.hidden_size = config.hidden_size
    self.num_experts = config.num_experts
    self.top_k = config.num_experts_per_tok
    self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
    # --- Patch.1 ---
    self.experts = Qwen3VLMoeStackedExperts(config)
    self.experts.init_normal_(config.initializer_range)
    # --- Patch.1 ---


# ================================================================
# Patch: Qwen3VLMoeTextSparseMoeBlock.forward
# 1. the experts are computed by Qwen3VLMoeStackedExperts from the top-k indices and
#    weights; upstream's router math and return value are kept
# ================================================================
@config.override_method(
    "Qwen3VLMoeTextSparseMoeBlock.forward", description="upstream's router, then Loom's experts"
)
def sparse_moe_block_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """ """
    batch_size = hidden_states.shape[0]
    hidden_states = hidden_states.reshape(-1, self.hidden_size)
    router_logits = self.gate(hidden_states)
    routing_weights = torch.nn.functional.softmax(router_logits, dim=-1, dtype=torch.float)
    routing_weights, router_indices = torch.topk(routing_weights, self.top_k, dim=-1)
    routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
    routing_weights = routing_weights.to(hidden_states.dtype)
    # --- Patch.1 ---
    routed_out = self.experts(hidden_states, router_indices, routing_weights)
    routed_out = routed_out.reshape(batch_size, -1, self.hidden_size)
    # --- Patch.1 ---
    return routed_out, router_logits
