"""The patches every MoE port applies (qwen3_moe, mixtral), written once.

``moe_port(model, prefix, experts)`` builds the ``PatchConfig`` of one v5 MoE port whose
upstream module has the v5 MoE shape (``<Prefix>Experts`` with stacked ``gate_up_proj`` /
``down_proj``, a ``<Prefix>TopKRouter`` recorded as ``router_logits``, upstream's
``load_balancing_loss_func`` and ``<Prefix>ForCausalLM`` with ``router_aux_loss_coef``,
``num_experts``, ``num_experts_per_tok``): the dense ports' fused RMSNorm and rotary, the
experts replaced by the port's ``StackedExperts`` subclass, and the causal-LM forward
below; and, where upstream has one, the dense ports' fused SwiGLU in ``<Prefix>MLP``.
The functions are copied into the generated modules by loom-patchgen, headers and
markers included.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from loom.models.dense_patch_config import mlp_forward, rotary_v5
from loom.models.loss import causal_lm_loss
from loom.patchgen import PatchConfig, create_patch_from_external


# ================================================================
# Patch: <Prefix>ForCausalLM.forward
# 1. the loss is a fused linear cross-entropy over the (logits_to_keep-sliced) hidden
#    states: the [tokens, vocab] logits are never materialised when there are labels.
#    `shift_labels` (already aligned, as Loom's data pipeline gives them) or HF-style
#    `labels`; `num_items_in_batch` divides the summed loss
# 2. logits are computed only without labels (generation, evaluation)
# 3. the load-balancing aux loss is added with its coefficient only when it is a
#    tensor: upstream's helper returns the int 0 without router logits, and
#    `0.to(...)` would raise; the sum is out of place
# 4. `aux_loss_scale` weighs the aux term: Loom's trainer passes 1 / (micro-batches per
#    rank), so a step's aux loss is the mean over all its micro-batches on all ranks,
#    the same for a single process with accumulation and for data/expert parallelism
# ================================================================
def causal_lm_forward(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    labels=None,
    use_cache=None,
    output_router_logits=None,
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
    # --- Patch.4 ---
    aux_loss_scale = kwargs.pop("aux_loss_scale", 1.0)
    # --- Patch.4 ---
    output_router_logits = (
        output_router_logits
        if output_router_logits is not None
        else self.config.output_router_logits
    )
    outputs = self.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        output_router_logits=output_router_logits,
        **kwargs,
    )
    hidden_states = outputs.last_hidden_state
    slice_indices = (
        slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    )
    hidden_states = hidden_states[:, slice_indices, :]
    loss, logits = None, None
    # --- Patch.1 ---
    if labels is not None or shift_labels is not None:
        loss = causal_lm_loss(
            hidden_states, self.lm_head.weight, labels, shift_labels, num_items_in_batch
        )
    # --- Patch.1 ---
    # --- Patch.2 ---
    else:
        logits = self.lm_head(hidden_states)
    # --- Patch.2 ---
    aux_loss = None
    if output_router_logits:
        aux_loss = load_balancing_loss_func(  # noqa: F821 (upstream's, in the generated module)
            outputs.router_logits,
            self.num_experts,
            self.num_experts_per_tok,
            attention_mask,
        )
        # --- Patch.3 ---
        if not isinstance(aux_loss, torch.Tensor):
            aux_loss = None
        elif loss is not None:
            # --- Patch.4 ---
            scaled = aux_loss_scale * self.router_aux_loss_coef
            # --- Patch.4 ---
            loss = loss + scaled * aux_loss.to(loss.device)
        # --- Patch.3 ---
    return MoeCausalLMOutputWithPast(
        loss=loss,
        aux_loss=aux_loss,
        logits=logits,
        past_key_values=outputs.past_key_values,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
        router_logits=outputs.router_logits,
    )


def moe_port(
    model: str, prefix: str, experts: str, description: str, dense_mlp: bool = False
) -> PatchConfig:
    """The v5 port of ``transformers.models.<model>.modeling_<model>``; ``experts`` is the
    port's ``StackedExperts`` subclass as ``"module:Class"``; ``dense_mlp``: upstream also
    has a dense ``<Prefix>MLP`` (qwen3_moe's ``mlp_only_layers``), which gets the fused
    SwiGLU of the dense ports."""
    experts_module, experts_class = experts.split(":")
    config = PatchConfig(
        source_module=f"transformers.models.{model}.modeling_{model}",
        target_file=f"patched_modeling_{model}.py",
        description=description,
        transformers_majors=(5,),
    )
    config.replace_class(
        f"{prefix}RMSNorm",
        replacement=create_patch_from_external("loom.models.layers", "LoomRMSNorm"),
        description="Loom's fused RMSNorm (fp32 inside, one rounding)",
    )
    config.replace_class(
        f"{prefix}Experts",
        replacement=create_patch_from_external(experts_module, experts_class),
        description="stacked experts: eager loop / fused grouped GEMM / expert-parallel "
        "dispatch+combine; upstream's @use_experts_implementation rerouting is dropped",
    )
    if dense_mlp:
        config.override_method(
            f"{prefix}MLP.forward", replacement=mlp_forward, description="fused SwiGLU"
        )
    config.replace_function(
        "apply_rotary_pos_emb",
        replacement=rotary_v5,
        description="fused rotary embedding of q and k",
    )
    config.replace_function(
        "load_balancing_loss_func",
        replacement=create_patch_from_external("loom.models.moe_loss", "load_balancing_loss_func"),
        description="upstream's aux loss, with its sums taken over the whole sequence under "
        "sequence parallelism (each SP rank routes only its slice)",
    )
    config.override_method(
        f"{prefix}ForCausalLM.forward",
        replacement=causal_lm_forward,
        description="fused linear cross-entropy; logits only without labels; guarded aux loss",
    )
    config.add_import(
        "loom.kernels", names=["apply_rotary", "swiglu"] if dense_mlp else ["apply_rotary"]
    )
    config.add_import("loom.models.loss", names=["causal_lm_loss"])
    return config
