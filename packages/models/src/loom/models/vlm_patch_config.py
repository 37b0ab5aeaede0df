"""The patches of Loom's vision-language ports (qwen3_vl; qwen2_5_vl and qwen3_vl_moe
build on them), written once: the text decoder gets the dense ports' fused RMSNorm,
SwiGLU and rotary, and ``<Prefix>ForConditionalGeneration.forward`` runs Loom's training
forward (``loom.models.vlm``) with the fused loss over ``text_config.vocab_size``.

Generation (no labels, or a cache) keeps upstream's ``<Prefix>Model.forward``, which
computes the rotary positions itself; under sequence parallelism positions must come
with the batch, and their absence is an error.
"""

from __future__ import annotations

import torch

from loom.kernels import apply_rotary
from loom.models.dense_patch_config import mlp_forward, rotary_v4, rotary_v5
from loom.models.loss import loss_or_logits
from loom.models.vlm import check_positions, vlm_model_forward
from loom.patchgen import PatchConfig, create_patch_from_external


# ================================================================
# Patch: <Prefix>ForConditionalGeneration.forward
# 1. training (labels or shift_labels, position ids given): Loom's multimodal forward —
#    the vision tower on the micro-batch's patches (under SP each rank on its share of
#    the images, vision_shards; a dummy image when it has none), features into this
#    rank's placeholders, text decoder with Loom's attention
#    (loom.models.vlm.vlm_model_forward); otherwise upstream's model forward
# 2. the loss is a fused linear cross-entropy over the hidden states (no full logits),
#    as in the text ports (loom.models.loss.loss_or_logits)
# ================================================================
def vlm_causal_lm_forward_v5(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    labels=None,
    pixel_values=None,
    pixel_values_videos=None,
    image_grid_thw=None,
    video_grid_thw=None,
    mm_token_type_ids=None,
    logits_to_keep=0,
    **kwargs,
):
    r"""
    labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
        Labels for computing the language modeling loss, shifted inside; -100 is ignored.
    image_grid_thw (`torch.LongTensor` of shape `(num_images, 3)`, *optional*):
        The temporal, height and width of each image's feature grid.
    video_grid_thw (`torch.LongTensor` of shape `(num_videos, 3)`, *optional*):
        The temporal, height and width of each video's feature grid.
    """
    # --- Patch.1 ---
    shift_labels = kwargs.pop("shift_labels", None)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    vision_slices = kwargs.pop("vision_slices", None)
    vision_shards = kwargs.pop("vision_shards", None)
    check_positions(self, position_ids)
    training = labels is not None or shift_labels is not None
    if training and position_ids is not None and inputs_embeds is None and past_key_values is None:
        outputs = vlm_model_forward(
            self.model,
            input_ids,
            position_ids,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
            vision_slices=vision_slices,
            vision_shards=vision_shards,
            attention_mask=attention_mask,
            **kwargs,
        )
    else:
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            position_ids=position_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            mm_token_type_ids=mm_token_type_ids,
            **kwargs,
        )
    # --- Patch.1 ---
    # --- Patch.2 ---
    loss, logits = loss_or_logits(
        self, outputs, labels, shift_labels, num_items_in_batch, logits_to_keep
    )
    # --- Patch.2 ---
    return Qwen3VLCausalLMOutputWithPast(  # noqa: F821 (a name of the generated module)
        loss=loss,
        logits=logits,
        past_key_values=outputs.past_key_values,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
        rope_deltas=getattr(outputs, "rope_deltas", None),
    )


# ================================================================
# Patch: <Prefix>ForConditionalGeneration.forward
# 1. training (labels or shift_labels, position ids given): Loom's multimodal forward —
#    the vision tower on the micro-batch's patches (under SP each rank on its share of
#    the images, vision_shards; a dummy image when it has none), features into this
#    rank's placeholders, text decoder with Loom's attention
#    (loom.models.vlm.vlm_model_forward); otherwise upstream's model forward
# 2. the loss is a fused linear cross-entropy over the hidden states (no full logits),
#    as in the text ports (loom.models.loss.loss_or_logits)
# ================================================================
def vlm_causal_lm_forward_v4(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    labels=None,
    pixel_values=None,
    pixel_values_videos=None,
    image_grid_thw=None,
    video_grid_thw=None,
    cache_position=None,
    logits_to_keep=0,
    **kwargs,
):
    r"""
    labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
        Labels for computing the language modeling loss, shifted inside; -100 is ignored.
    image_grid_thw (`torch.LongTensor` of shape `(num_images, 3)`, *optional*):
        The temporal, height and width of each image's feature grid.
    video_grid_thw (`torch.LongTensor` of shape `(num_videos, 3)`, *optional*):
        The temporal, height and width of each video's feature grid.
    """
    # --- Patch.1 ---
    shift_labels = kwargs.pop("shift_labels", None)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    vision_slices = kwargs.pop("vision_slices", None)
    vision_shards = kwargs.pop("vision_shards", None)
    check_positions(self, position_ids)
    training = labels is not None or shift_labels is not None
    if training and position_ids is not None and inputs_embeds is None and past_key_values is None:
        outputs = vlm_model_forward(
            self.model,
            input_ids,
            position_ids,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
            vision_slices=vision_slices,
            vision_shards=vision_shards,
            attention_mask=attention_mask,
            **kwargs,
        )
    else:
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            position_ids=position_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            cache_position=cache_position,
            **kwargs,
        )
    # --- Patch.1 ---
    # --- Patch.2 ---
    loss, logits = loss_or_logits(
        self, outputs, labels, shift_labels, num_items_in_batch, logits_to_keep
    )
    # --- Patch.2 ---
    return Qwen3VLCausalLMOutputWithPast(  # noqa: F821 (a name of the generated module)
        loss=loss,
        logits=logits,
        past_key_values=outputs.past_key_values,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
        rope_deltas=getattr(outputs, "rope_deltas", None),
    )


# ================================================================
# Patch: <Prefix>Model.__init__
# 1. the vision tower and the text decoder are this module's classes, not whatever
#    AutoModel maps their configs to (upstream's unpatched ones)
# ================================================================
def vlm_model_init_v5(self, config):
    super().__init__(config)
    # --- Patch.1 ---
    self.visual = Qwen3VLVisionModel._from_config(config.vision_config)  # noqa: F821
    self.language_model = Qwen3VLTextModel._from_config(config.text_config)  # noqa: F821
    # --- Patch.1 ---
    self.rope_deltas = None  # cache rope_deltas here

    # Initialize weights and apply final processing
    self.post_init()


# ================================================================
# Patch: apply_multimodal_rotary_pos_emb (Qwen2.5-VL under v4)
# 1. the three axes' sections of cos and sin joined as upstream does, then Loom's fused
#    rotary (loom.kernels.apply_rotary)
# ================================================================
def multimodal_rotary_v4(q, k, cos, sin, mrope_section, unsqueeze_dim=1):
    # --- Patch.1 ---
    sections = mrope_section * 2
    cos = torch.cat([m[i % 3] for i, m in enumerate(cos.split(sections, dim=-1))], dim=-1)
    sin = torch.cat([m[i % 3] for i, m in enumerate(sin.split(sections, dim=-1))], dim=-1)
    return apply_rotary(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    # --- Patch.1 ---


def vlm_port(
    model: str,
    prefix: str,
    major: int,
    *,
    norm: str | None = None,
    norm_imported: bool = False,
    mlp: str | None = None,
    multimodal_rotary: bool = False,
    vision_class: str | None = None,
) -> PatchConfig:
    """The port of ``transformers.models.<model>.modeling_<model>`` for one major.

    ``norm``, ``mlp``: the text decoder's RMSNorm and MLP classes (default
    ``<Prefix>TextRMSNorm``, ``<Prefix>TextMLP``); ``norm_imported``: the module imports
    its norm from another model's module, where it is rebound to Loom's instead.
    ``multimodal_rotary``: the module joins the rotary axes' sections in
    ``apply_multimodal_rotary_pos_emb`` (Qwen2.5-VL under v4), not in its rotary class.
    ``vision_class``: the vision tower's class (default ``<Prefix>VisionModel``).
    """
    norm = norm or f"{prefix}TextRMSNorm"
    config = PatchConfig(
        source_module=f"transformers.models.{model}.modeling_{model}",
        target_file=f"patched_modeling_{model}.py",
        description=f"{prefix} with Loom's fused kernels, fused loss and multimodal forward",
        transformers_majors=(major,),
    )
    if norm_imported:
        config.drop_import_names(norm)
        config.add_import("loom.models.layers", names=["LoomRMSNorm"])
        config.add_post_import_block(f"{norm} = LoomRMSNorm  # Loom's fused RMSNorm")
    else:
        config.replace_class(
            norm,
            replacement=create_patch_from_external("loom.models.layers", "LoomRMSNorm"),
            description="Loom's fused RMSNorm (fp32 inside, one rounding)",
        )
    config.override_method(
        f"{mlp or prefix + 'TextMLP'}.forward", replacement=mlp_forward, description="fused SwiGLU"
    )
    if multimodal_rotary:
        config.replace_function(
            "apply_multimodal_rotary_pos_emb",
            replacement=multimodal_rotary_v4,
            description="fused rotary embedding of the text decoder's q and k",
        )
    else:
        config.replace_function(
            "apply_rotary_pos_emb",
            replacement=rotary_v5 if major >= 5 else rotary_v4,
            description="fused rotary embedding of the text decoder's q and k",
        )
    if major >= 5:
        config.override_method(
            f"{prefix}Model.__init__",
            replacement=vlm_model_init_v5,
            description="the sub-models from this module (AutoModel would build upstream's)",
            name_map={
                "Qwen3VLVisionModel": vision_class or f"{prefix}VisionModel",
                "Qwen3VL": prefix,
            },
        )
    forward = vlm_causal_lm_forward_v5 if major >= 5 else vlm_causal_lm_forward_v4
    config.override_method(
        f"{prefix}ForConditionalGeneration.forward",
        replacement=forward,
        description="Loom's multimodal training forward; fused linear cross-entropy",
        name_map={"Qwen3VL": prefix},
        # a model's own parameters (Qwen2.5-VL's use_cache, second_per_grid_ts) arrive in
        # **kwargs and reach upstream's model forward unchanged
        allow_signature_change=True,
    )
    config.add_import("loom.kernels", names=["apply_rotary", "swiglu"])
    config.add_import("loom.models.loss", names=["loss_or_logits"])
    config.add_import("loom.models.vlm", names=["check_positions", "vlm_model_forward"])
    return config
