"""Mixtral port for transformers v4.

Regenerate (under transformers 4.57.3): loom-patchgen generate loom.models.mixtral.patch_config_v4 --diff

The MoE ports' patches (``loom.models.moe_patch_config``, v4 variants), and v4's
``MixtralSparseMoeBlock`` rewritten around Loom's experts: v4 holds the experts as an
``nn.ModuleList`` of ``MixtralBlockSparseTop2MLP`` (``w1`` / ``w3`` / ``w2``) and loops
over them inside the block's forward, so the block's ``__init__`` builds a
``MixtralStackedExperts`` instead and its forward keeps upstream's router (jitter,
softmax, top-k, renormalised) and return value ``(hidden_states, router_logits)``, which
v4's ``OutputRecorder(MixtralSparseMoeBlock, index=1)`` records. The decoder layer holds
the block as ``mlp``, v5's name, not v4's ``block_sparse_moe``: the parameter names, the
expert plan and the converter (which renames HF's ``block_sparse_moe`` keys) are the v5
port's. ``MixtralBlockSparseTop2MLP`` is left out (nothing uses it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom.models.mixtral.experts import MixtralStackedExperts
from loom.models.moe_patch_config import moe_port

config = moe_port(
    "mixtral",
    "Mixtral",
    experts="loom.models.mixtral.experts:MixtralStackedExperts",
    description="Mixtral with Loom's stacked experts (eager/fused/EP), kernels and fused loss",
    major=4,
)
config.exclude_from_output("MixtralBlockSparseTop2MLP")


# ================================================================
# Patch: MixtralSparseMoeBlock.__init__
# 1. the routed experts are one MixtralStackedExperts (stacked [E, 2I, H] / [E, H, I]
#    tensors: eager loop, fused grouped GEMM or expert-parallel), not an nn.ModuleList
#    of MixtralBlockSparseTop2MLP; drawn N(0, initializer_range) here, as v4's
#    _init_weights would draw upstream's nn.Linear experts
# ================================================================
@config.override_method(
    "MixtralSparseMoeBlock.__init__", description="the experts as Loom's stacked experts"
)
def sparse_moe_block_init(self, config):
    super().__init__()
    self.hidden_dim = config.hidden_size
    self.ffn_dim = config.intermediate_size
    self.num_experts = config.num_local_experts
    self.top_k = config.num_experts_per_tok

    # gating
    self.gate = nn.Linear(self.hidden_dim, self.num_experts, bias=False)
    # --- Patch.1 ---
    self.experts = MixtralStackedExperts(config)
    self.experts.init_normal_(config.initializer_range)
    # --- Patch.1 ---

    # Jitter parameters
    self.jitter_noise = config.router_jitter_noise


# ================================================================
# Patch: MixtralSparseMoeBlock.forward
# 1. the experts are computed by MixtralStackedExperts (its eager path is upstream's
#    loop, expert by expert); upstream's router math and return value are kept
# ================================================================
@config.override_method(
    "MixtralSparseMoeBlock.forward", description="upstream's router, then Loom's experts"
)
def sparse_moe_block_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """ """
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    if self.training and self.jitter_noise > 0:
        hidden_states *= torch.empty_like(hidden_states).uniform_(
            1.0 - self.jitter_noise, 1.0 + self.jitter_noise
        )
    hidden_states = hidden_states.view(-1, hidden_dim)
    # router_logits: (batch * sequence_length, n_experts)
    router_logits = self.gate(hidden_states)

    routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
    routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
    routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
    # we cast back to the input dtype
    routing_weights = routing_weights.to(hidden_states.dtype)
    # --- Patch.1 ---
    # [tokens, hidden] -> [tokens, hidden], each token's top-k experts weighted
    final_hidden_states = self.experts(hidden_states, selected_experts, routing_weights)
    # --- Patch.1 ---
    final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
    return final_hidden_states, router_logits


# ================================================================
# Patch: MixtralDecoderLayer.__init__
# 1. the MoE block is `mlp` (v5's name, Loom's layout), not `block_sparse_moe`
# ================================================================
@config.override_method("MixtralDecoderLayer.__init__", description="the MoE block as `mlp`")
def decoder_layer_init(self, config, layer_idx: int):
    super().__init__()
    self.hidden_size = config.hidden_size

    self.self_attn = MixtralAttention(config, layer_idx)  # noqa: F821 (the generated module's)

    # --- Patch.1 ---
    self.mlp = MixtralSparseMoeBlock(config)  # noqa: F821
    # --- Patch.1 ---
    self.input_layernorm = MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)  # noqa: F821
    self.post_attention_layernorm = MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)  # noqa: F821


# ================================================================
# Patch: MixtralDecoderLayer.forward
# 1. the MoE block is `mlp` (v5's name, Loom's layout), not `block_sparse_moe`
# ================================================================
@config.override_method("MixtralDecoderLayer.forward", description="the MoE block as `mlp`")
def decoder_layer_forward(
    self,
    hidden_states,
    position_embeddings,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    cache_position=None,
    **kwargs,
):
    residual = hidden_states

    hidden_states = self.input_layernorm(hidden_states)

    # Self Attention
    hidden_states, _ = self.self_attn(
        hidden_states=hidden_states,
        position_embeddings=position_embeddings,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        cache_position=cache_position,
        **kwargs,
    )
    hidden_states = residual + hidden_states

    # Fully Connected
    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)
    # --- Patch.1 ---
    hidden_states, _ = self.mlp(hidden_states)
    # --- Patch.1 ---
    hidden_states = residual + hidden_states

    return hidden_states
