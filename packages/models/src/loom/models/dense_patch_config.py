"""The patches every dense Llama-family port applies (llama, qwen2, qwen3), written once.

``dense_port(model, prefix, major)`` builds the ``PatchConfig`` of one port for one
transformers major; each port's ``patch_config*.py`` is one call. The functions below are
copied into the generated modules by loom-patchgen, headers and markers included.

Every patch is exact in fp32 (the equivalence suite checks it against upstream); in
bf16 the fused kernels round once where upstream rounds twice.
"""

from __future__ import annotations

from loom.kernels import apply_rotary, swiglu
from loom.models.loss import causal_lm_output
from loom.patchgen import PatchConfig, create_patch_from_external


# ================================================================
# Patch: <Prefix>MLP.forward
# 1. one fused SwiGLU kernel for act(gate) * up when the activation is SiLU — the
#    [tokens, intermediate] activation is never stored twice; other activations keep
#    upstream's code
# ================================================================
def mlp_forward(self, x):
    # --- Patch.1 ---
    if self.config.hidden_act in ("silu", "swish"):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
    # --- Patch.1 ---
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj


# ================================================================
# Patch: apply_rotary_pos_emb
# 1. q and k rotated by one fused kernel — the same arithmetic as rotate_half
# ================================================================
def rotary_v5(q, k, cos, sin, unsqueeze_dim=1):
    # --- Patch.1 ---
    return apply_rotary(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    # --- Patch.1 ---


# ================================================================
# Patch: apply_rotary_pos_emb
# 1. q and k rotated by one fused kernel — the same arithmetic as rotate_half
# ================================================================
def rotary_v4(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    # --- Patch.1 ---
    return apply_rotary(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    # --- Patch.1 ---


# ================================================================
# Patch: <Prefix>ForCausalLM.forward
# 1. the loss is a fused linear cross-entropy over the (logits_to_keep-sliced) hidden
#    states: the [tokens, vocab] logits are never materialised when there are labels.
#    `shift_labels` (already aligned, as Loom's data pipeline gives them) or HF-style
#    `labels`; `num_items_in_batch` divides the summed loss (Loom passes the global
#    token count over the ranks that average gradients)
#    (loom.models.loss.causal_lm_output); logits are computed only without labels
# ================================================================
def causal_lm_forward_v5(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    labels=None,
    use_cache=None,
    logits_to_keep=0,
    **kwargs,
):
    r"""
    labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
        Labels for computing the language modeling loss, shifted inside; -100 is ignored.
    """
    # --- Patch.1 ---
    shift_labels = kwargs.pop("shift_labels", None)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    # --- Patch.1 ---
    outputs = self.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        **kwargs,
    )
    # --- Patch.1 ---
    return causal_lm_output(self, outputs, labels, shift_labels, num_items_in_batch, logits_to_keep)
    # --- Patch.1 ---


# ================================================================
# Patch: <Prefix>ForCausalLM.forward
# 1. the loss is a fused linear cross-entropy over the (logits_to_keep-sliced) hidden
#    states: the [tokens, vocab] logits are never materialised when there are labels.
#    `shift_labels` (already aligned, as Loom's data pipeline gives them) or HF-style
#    `labels`; `num_items_in_batch` divides the summed loss (Loom passes the global
#    token count over the ranks that average gradients)
#    (loom.models.loss.causal_lm_output); logits are computed only without labels
# ================================================================
def causal_lm_forward_v4(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    labels=None,
    use_cache=None,
    cache_position=None,
    logits_to_keep=0,
    **kwargs,
):
    r"""
    labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
        Labels for computing the language modeling loss, shifted inside; -100 is ignored.
    """
    # --- Patch.1 ---
    shift_labels = kwargs.pop("shift_labels", None)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    # --- Patch.1 ---
    outputs = self.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        cache_position=cache_position,
        **kwargs,
    )
    # --- Patch.1 ---
    return causal_lm_output(self, outputs, labels, shift_labels, num_items_in_batch, logits_to_keep)
    # --- Patch.1 ---


def dense_port(model: str, prefix: str, major: int) -> PatchConfig:
    """The port of ``transformers.models.<model>.modeling_<model>`` for one major."""
    config = PatchConfig(
        source_module=f"transformers.models.{model}.modeling_{model}",
        target_file=f"patched_modeling_{model}.py",
        description=f"{prefix} with Loom's fused kernels and fused causal-LM loss",
        transformers_majors=(major,),
    )
    config.replace_class(
        f"{prefix}RMSNorm",
        replacement=create_patch_from_external("loom.models.layers", "LoomRMSNorm"),
        description="Loom's fused RMSNorm (fp32 inside, one rounding)",
    )
    config.override_method(
        f"{prefix}MLP.forward", replacement=mlp_forward, description="fused SwiGLU"
    )
    config.replace_function(
        "apply_rotary_pos_emb",
        replacement=rotary_v5 if major >= 5 else rotary_v4,
        description="fused rotary embedding of q and k",
    )
    config.override_method(
        f"{prefix}ForCausalLM.forward",
        replacement=causal_lm_forward_v5 if major >= 5 else causal_lm_forward_v4,
        description="fused linear cross-entropy; logits only without labels",
    )
    config.add_import("loom.kernels", names=["apply_rotary", "swiglu"])
    config.add_import("loom.models.loss", names=["causal_lm_output"])
    return config
