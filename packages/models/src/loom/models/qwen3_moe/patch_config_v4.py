"""Qwen3-MoE port for transformers v4.

Regenerate (under transformers 4.57.3): loom-patchgen generate loom.models.qwen3_moe.patch_config_v4 --diff

The MoE ports' patches (``loom.models.moe_patch_config``, v4 variants), and v4's
``Qwen3MoeSparseMoeBlock`` rewritten around Loom's experts: v4 holds the experts as an
``nn.ModuleList`` of ``Qwen3MoeMLP`` and loops over them inside the block's forward, so
the block's ``__init__`` builds a ``Qwen3MoeStackedExperts`` instead (v5's names and
layout: ``mlp.experts.gate_up_proj`` / ``down_proj``, so state dicts, the expert plan and
the converter are the v5 port's) and its forward keeps upstream's router (softmax, top-k,
``norm_topk_prob``) and return value ``(hidden_states, router_logits)``, which v4's
``OutputRecorder(Qwen3MoeSparseMoeBlock, index=1)`` records.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom.models.moe_patch_config import moe_port
from loom.models.qwen3_moe.experts import Qwen3MoeStackedExperts

config = moe_port(
    "qwen3_moe",
    "Qwen3Moe",
    experts="loom.models.qwen3_moe.experts:Qwen3MoeStackedExperts",
    description="Qwen3-MoE with Loom's stacked experts (eager/fused/EP), kernels and fused loss",
    dense_mlp=True,
    major=4,
)


# ================================================================
# Patch: Qwen3MoeSparseMoeBlock.__init__
# 1. the routed experts are one Qwen3MoeStackedExperts (stacked [E, 2I, H] / [E, H, I]
#    tensors: eager loop, fused grouped GEMM or expert-parallel), not an nn.ModuleList
#    of per-expert MLPs; drawn N(0, initializer_range) here, as v4's _init_weights would
#    draw upstream's nn.Linear experts
# ================================================================
@config.override_method(
    "Qwen3MoeSparseMoeBlock.__init__", description="the experts as Loom's stacked experts"
)
def sparse_moe_block_init(self, config):
    super().__init__()
    self.num_experts = config.num_experts
    self.top_k = config.num_experts_per_tok
    self.norm_topk_prob = config.norm_topk_prob

    # gating
    self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
    # --- Patch.1 ---
    self.experts = Qwen3MoeStackedExperts(config)
    self.experts.init_normal_(config.initializer_range)
    # --- Patch.1 ---


# ================================================================
# Patch: Qwen3MoeSparseMoeBlock.forward
# 1. the experts are computed by Qwen3MoeStackedExperts (its eager path is upstream's
#    loop, expert by expert); upstream's router math and return value are kept
# ================================================================
@config.override_method(
    "Qwen3MoeSparseMoeBlock.forward", description="upstream's router, then Loom's experts"
)
def sparse_moe_block_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """ """
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    hidden_states = hidden_states.view(-1, hidden_dim)
    # router_logits: (batch * sequence_length, n_experts)
    router_logits = self.gate(hidden_states)

    routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
    routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
    if self.norm_topk_prob:  # only diff with mixtral sparse moe block!
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
    # we cast back to the input dtype
    routing_weights = routing_weights.to(hidden_states.dtype)
    # --- Patch.1 ---
    # [tokens, hidden] -> [tokens, hidden], each token's top-k experts weighted
    final_hidden_states = self.experts(hidden_states, selected_experts, routing_weights)
    # --- Patch.1 ---
    final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
    return final_hidden_states, router_logits
