"""The patches every MoE port applies (qwen3_moe, mixtral), written once.

``moe_port(model, prefix, experts, major=...)`` builds the ``PatchConfig`` of one MoE
port whose upstream module has the v5 MoE shape (``<Prefix>Experts`` with stacked
``gate_up_proj`` / ``down_proj``, a ``<Prefix>TopKRouter`` recorded as ``router_logits``,
upstream's ``load_balancing_loss_func`` and ``<Prefix>ForCausalLM`` with
``router_aux_loss_coef``, ``num_experts``, ``num_experts_per_tok``) or, for v4, the v4
shape (a ``<Prefix>SparseMoeBlock`` with an ``nn.ModuleList`` of experts, returning
``(hidden_states, router_logits)``, which the port's v4 config rewrites): the dense
ports' fused RMSNorm and rotary, the experts replaced by the port's ``StackedExperts``
subclass (v5), and the causal-LM forwards below; and, where upstream has one, the dense
ports' fused SwiGLU in ``<Prefix>MLP``.
The functions are copied into the generated modules by loom-patchgen, headers and
markers included.
"""

from __future__ import annotations

from loom.models.dense_patch_config import mlp_forward, rotary_v4, rotary_v5
from loom.models.moe_loss import moe_causal_lm_output
from loom.patchgen import PatchConfig, create_patch_from_external


# ================================================================
# Patch: <Prefix>ForCausalLM.forward
# 1. Loom's arguments are taken out of kwargs before the decoder: `shift_labels`
#    (already aligned, as Loom's data pipeline gives them) and `num_items_in_batch`
#    (divides the summed loss)
# 2. the tail is loom.models.moe_loss.moe_causal_lm_output: the loss a fused linear
#    cross-entropy over the (logits_to_keep-sliced) hidden states, so the [tokens, vocab]
#    logits are never materialised when there are labels (`shift_labels` or HF-style
#    `labels`), and logits only without labels; the load-balancing aux loss added with
#    its coefficient only when it is a tensor (upstream's helper returns the int 0
#    without router logits, and `0.to(...)` would raise), out of place
# 3. `aux_loss_scale` weighs the aux term: Loom's trainer passes 1 / (micro-batches per
#    rank), so a step's aux loss is the mean over all its micro-batches on all ranks,
#    the same for a single process with accumulation and for data/expert parallelism
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
    # --- Patch.3 ---
    aux_loss_scale = kwargs.pop("aux_loss_scale", 1.0)
    # --- Patch.3 ---
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
    # --- Patch.2 ---
    return moe_causal_lm_output(
        self,
        outputs,
        labels,
        shift_labels,
        num_items_in_batch,
        logits_to_keep,
        attention_mask,
        output_router_logits,
        aux_loss_scale,
    )
    # --- Patch.2 ---


# ================================================================
# Patch: <Prefix>ForCausalLM.forward
# 1. Loom's arguments are taken out of kwargs before the decoder: `shift_labels`
#    (already aligned, as Loom's data pipeline gives them) and `num_items_in_batch`
#    (divides the summed loss)
# 2. the tail is loom.models.moe_loss.moe_causal_lm_output: the loss a fused linear
#    cross-entropy over the (logits_to_keep-sliced) hidden states, so the [tokens, vocab]
#    logits are never materialised when there are labels (`shift_labels` or HF-style
#    `labels`), and logits only without labels; the load-balancing aux loss added with
#    its coefficient only when it is a tensor (upstream's helper returns the int 0
#    without router logits, and `0.to(...)` would raise), out of place
# 3. `aux_loss_scale` weighs the aux term: Loom's trainer passes 1 / (micro-batches per
#    rank), so a step's aux loss is the mean over all its micro-batches on all ranks,
#    the same for a single process with accumulation and for data/expert parallelism
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
    output_router_logits=None,
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
    # --- Patch.3 ---
    aux_loss_scale = kwargs.pop("aux_loss_scale", 1.0)
    # --- Patch.3 ---
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
        cache_position=cache_position,
        **kwargs,
    )
    # --- Patch.2 ---
    return moe_causal_lm_output(
        self,
        outputs,
        labels,
        shift_labels,
        num_items_in_batch,
        logits_to_keep,
        attention_mask,
        output_router_logits,
        aux_loss_scale,
    )
    # --- Patch.2 ---


def moe_port(
    model: str,
    prefix: str,
    experts: str,
    description: str,
    dense_mlp: bool = False,
    major: int = 5,
) -> PatchConfig:
    """The port of ``transformers.models.<model>.modeling_<model>`` for one transformers
    major; ``experts`` is the port's ``StackedExperts`` subclass as ``"module:Class"``;
    ``dense_mlp``: upstream also has a dense ``<Prefix>MLP`` (qwen3_moe's
    ``mlp_only_layers``), which gets the fused SwiGLU of the dense ports.

    v5: the subclass replaces upstream's ``<Prefix>Experts``. v4 has no experts class (its
    ``<Prefix>SparseMoeBlock`` holds an ``nn.ModuleList`` of per-expert MLPs and loops over
    them inline): the subclass is imported, and the port's own config overrides the block's
    ``__init__`` and ``forward`` (its router math is the model's own)."""
    experts_module, experts_class = experts.split(":")
    config = PatchConfig(
        source_module=f"transformers.models.{model}.modeling_{model}",
        target_file=f"patched_modeling_{model}.py",
        description=description,
        transformers_majors=(major,),
    )
    config.replace_class(
        f"{prefix}RMSNorm",
        replacement=create_patch_from_external("loom.models.layers", "LoomRMSNorm"),
        description="Loom's fused RMSNorm (fp32 inside, one rounding)",
    )
    if major >= 5:
        config.replace_class(
            f"{prefix}Experts",
            replacement=create_patch_from_external(experts_module, experts_class),
            description="stacked experts: eager loop / fused grouped GEMM / expert-parallel "
            "dispatch+combine; upstream's @use_experts_implementation rerouting is dropped",
        )
    else:
        config.add_import(experts_module, names=[experts_class])
    if dense_mlp:
        config.override_method(
            f"{prefix}MLP.forward", replacement=mlp_forward, description="fused SwiGLU"
        )
    config.replace_function(
        "apply_rotary_pos_emb",
        replacement=rotary_v5 if major >= 5 else rotary_v4,
        description="fused rotary embedding of q and k",
    )
    config.replace_function(
        "load_balancing_loss_func",
        replacement=create_patch_from_external("loom.models.moe_loss", "load_balancing_loss_func"),
        description="upstream's aux loss, with upstream's parameters; the forward calls "
        "load_balancing_loss, which takes its sums over the whole sequence under sequence "
        "parallelism (each SP rank routes only its slice)",
    )
    config.override_method(
        f"{prefix}ForCausalLM.forward",
        replacement=causal_lm_forward_v5 if major >= 5 else causal_lm_forward_v4,
        description="fused linear cross-entropy; logits only without labels; guarded aux loss",
    )
    config.add_import(
        "loom.kernels", names=["apply_rotary", "swiglu"] if dense_mlp else ["apply_rotary"]
    )
    config.add_import("loom.models.moe_loss", names=["moe_causal_lm_output"])
    return config
