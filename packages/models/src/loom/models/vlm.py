"""The training forward of Loom's vision-language ports (Qwen2.5-VL, Qwen3-VL), shared by
every major's generated module: the vision tower once on the micro-batch's images and
videos (or on a dummy image when it has neither), its features filled into the
placeholder tokens of this rank's slice of the sequence, then the text decoder with
Loom's attention and loss.

Why not upstream's ``<Prefix>Model.forward``: it computes the 3-D rotary positions from
the ``input_ids`` it is given (under sequence parallelism, a slice: wrong positions), it
hands the text decoder's attention keywords (``cu_seq_lens_q``) to the vision tower too,
and a rank with no image would skip the vision tower (one with images and videos would
call it twice), whose FSDP collectives the other ranks then wait on forever.

Under sequence parallelism the ranks of the group hold the same rows: each runs the vision
tower on its share of the micro-batch's images and videos (``vision_shards``: contiguous
runs of whole items balanced by patch count, so attention, which stays within an image,
a frame or its windows, needs nothing from another rank), all features are gathered, and
each rank keeps those of the placeholders in its slice (``vision_slices``). Both are
computed on the host by the trainer, so the forward never waits on the device to count
placeholders. Without ``vision_shards`` every rank runs the tower on every item.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPast

from loom.dist.ulysses import gather_outputs
from loom.models.attention import sequence_parallel_group

# Per SP rank: (first patch, end patch, first image, end image, features) of its images.
Shard = tuple[int, int, int, int, int]

MODALITIES = ("image", "video")


def vision_features(visual, pixels: torch.Tensor, grid_thw: torch.Tensor):
    """The vision tower's merged features [tokens, text hidden] and its deepstack features
    (a list, empty for a model without them), whatever the major returns."""
    out = visual(pixels, grid_thw=grid_thw)
    if isinstance(out, torch.Tensor):  # Qwen2.5-VL under v4
        return out, []
    if isinstance(out, tuple):  # Qwen3-VL under v4
        return out[0], list(out[1] or [])
    return out.pooler_output, list(getattr(out, "deepstack_features", None) or [])


def dummy_vision_input(visual) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest input the vision tower takes: one image of merge x merge patches, sized
    from its config, in the dtype its first layer computes in at call time (under FSDP
    mixed precision that is not the stored dtype), on its device."""
    config = visual.config
    merge = config.spatial_merge_size
    width = config.in_channels * config.temporal_patch_size * config.patch_size**2
    weight = visual.patch_embed.proj.weight
    pixels = torch.zeros(merge * merge, width, dtype=weight.dtype, device=weight.device)
    grid = torch.tensor([[1, merge, merge]], device=weight.device)
    return pixels, grid


def image_shards(patches: Sequence[int], features: Sequence[int], sp_size: int) -> list[Shard]:
    """Contiguous runs of whole images, one per SP rank, each ending at the image boundary
    nearest its equal share of the patches (a rank may get none)."""
    cum = np.cumsum([0, *patches])
    feature_cum = np.cumsum([0, *features])
    bounds = [0]
    for rank in range(1, sp_size):
        nearest = int(np.argmin(np.abs(cum - cum[-1] * rank / sp_size)))
        bounds.append(max(nearest, bounds[-1]))
    bounds.append(len(patches))
    return [
        (int(cum[a]), int(cum[b]), a, b, int(feature_cum[b] - feature_cum[a]))
        for a, b in itertools.pairwise(bounds)
    ]


def sharded_vision_features(visual, pixels, grid_thw, shards: list[Shard], group):
    """The features of every image, each computed by the SP rank whose shard holds it. A
    rank with no image runs the tower on a dummy image times zero (FSDP's collectives
    stay matched). The gather's backward sums every rank's gradient into the owner's."""
    first, end, image, image_end, _ = shards[dist.get_rank(group)]
    if image_end > image:
        local, deep = vision_features(visual, pixels[first:end], grid_thw[image:image_end])
    else:
        dummy, dummy_deep = vision_features(visual, *dummy_vision_input(visual))
        zero = 0.0 * sum(t.sum() for t in (dummy, *dummy_deep))
        local, deep = dummy[:0] + zero, [t[:0] + zero for t in dummy_deep]
    counts = [shard[4] for shard in shards]
    longest = max(counts)

    def gather(t: torch.Tensor) -> torch.Tensor:
        full = gather_outputs(F.pad(t, (0, 0, 0, longest - t.shape[0])), 0, group)
        return torch.cat([full.narrow(0, r * longest, n) for r, n in enumerate(counts)])

    return gather(local), [gather(t) for t in deep]


def has_deepstack(model) -> bool:
    return bool(getattr(model.visual, "deepstack_visual_indexes", None))


def vlm_model_forward(
    model,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    vision_slices: dict[str, torch.Tensor] | None = None,
    vision_shards: list[Shard] | None = None,
    **kwargs,
) -> BaseModelOutputWithPast:
    """``model``: the ``<Prefix>Model`` (``visual`` + ``language_model``). ``input_ids``
    [batch, seq]: this rank's slice; ``position_ids`` [4, batch, seq] (text positions, then
    the three rotary axes) or [3, batch, seq], sliced alike; pixels and grids: the whole
    micro-batch's. The tower runs once on the images, then the videos; ``vision_slices[
    modality]``: the indices of those joint features that fill this slice's placeholders
    of ``modality``, in order (all of the modality's when absent); ``vision_shards``: under
    SP, which of the joint items (images, then videos) each rank's tower runs on."""
    config = model.config
    kwargs.pop("second_per_grid_ts", None)  # video timing: in the positions already
    embeds = model.get_input_embeddings()(input_ids)
    inputs = {
        "image": (pixel_values, image_grid_thw),
        "video": (pixel_values_videos, video_grid_thw),
    }
    present = [m for m in MODALITIES if inputs[m][0] is not None]
    masks, deep_parts = {}, {}
    if present:
        # One tower call on the images and videos together (the tower works per item, so
        # the features are those of separate calls): every rank then calls it once per
        # forward whatever its micro-batch holds, and FSDP's collectives stay matched.
        pixels = torch.cat([inputs[m][0] for m in present])
        grid = torch.cat([inputs[m][1] for m in present])
        group = sequence_parallel_group(model)
        if vision_shards and group is not None:
            features, deep = sharded_vision_features(
                model.visual, pixels, grid, vision_shards, group
            )
        else:
            features, deep = vision_features(model.visual, pixels, grid)
        slices = vision_slices or _whole_slices(present, inputs, features.device, config)
        for modality in present:
            mask = input_ids == getattr(config, f"{modality}_token_id")
            index = slices[modality]
            if vision_slices is None and int(mask.sum()) != index.numel():
                raise ValueError(
                    f"{int(mask.sum())} {modality} placeholder tokens but {index.numel()} "
                    f"{modality} features from {tuple(inputs[modality][1].shape)} grids"
                )
            picked = features.index_select(0, index).to(embeds.dtype)
            embeds = embeds.masked_scatter(mask[..., None], picked)
            masks[modality] = mask
            deep_parts[modality] = [d.index_select(0, index) for d in deep]
    elif model.training:
        # A micro-batch without images still runs the vision tower (on a dummy image) and
        # adds its outputs times zero: every rank then takes part in the vision layers'
        # FSDP collectives, and their gradients are zeros rather than missing.
        features, deep = vision_features(model.visual, *dummy_vision_input(model.visual))
        embeds = embeds + 0.0 * sum(t.sum() for t in (features, *deep)).to(embeds.dtype)
    text_kwargs = {}
    if has_deepstack(model) and masks:
        visual_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for mask in masks.values():
            visual_mask |= mask
        text_kwargs = {
            "visual_pos_masks": visual_mask,
            "deepstack_visual_embeds": _deepstack_joint(visual_mask, masks, deep_parts),
        }
    return model.language_model(
        input_ids=None,
        inputs_embeds=embeds,
        position_ids=position_ids,
        **text_kwargs,
        **kwargs,
    )


def _whole_slices(present, inputs, device, config) -> dict[str, torch.Tensor]:
    """Every feature of each modality, as indices into the joint features (images first)."""
    merge = config.vision_config.spatial_merge_size
    out, start = {}, 0
    for modality in present:
        count = int(inputs[modality][1].prod(-1).sum()) // merge**2
        out[modality] = torch.arange(start, start + count, device=device)
        start += count
    return out


def _deepstack_joint(visual_mask, masks, deep_parts) -> list[torch.Tensor]:
    """Per deepstack layer, the features of every visual token in sequence order (images
    and videos interleaved as they appear), as upstream joins them."""
    if len(masks) == 1:
        return next(iter(deep_parts.values()))
    joint = []
    for image, video in zip(deep_parts["image"], deep_parts["video"], strict=True):
        out = image.new_zeros(int(visual_mask.sum()), image.shape[-1])
        out[masks["image"][visual_mask]] = image
        out[masks["video"][visual_mask]] = video
        joint.append(out)
    return joint


def check_positions(module, position_ids) -> None:
    """Under sequence parallelism the 3-D rotary positions cannot be computed from a
    slice of the sequence: they must come with the batch."""
    if position_ids is None and sequence_parallel_group(module) is not None:
        raise ValueError(
            "under sequence parallelism a vision-language model needs position_ids (the 3-D "
            "rotary positions of the whole row, from loom.models.vlm_positions), not None"
        )
