"""Vision-language ports under sequence parallelism (CPU gloo, sp 2 and 4): on rows with
several images of different sizes and a video, each port's loss and every parameter's
gradient equal one process's, whether every rank runs the vision tower on all images and
videos or each on its share of whole items (``loom.models.vlm.image_shards``, images then
videos; at sp 4 one rank has none and runs the dummy image); with shards, each rank's
tower sees only its share's patches, in one call."""

import pytest
import torch
import torch.distributed as dist
from _ports import TOY, VLM, sp_params
from _vlm import Video, vlm_batch

from loom.dist.testing import run_distributed
from loom.dist.ulysses import slice_input
from loom.models import build_model
from loom.models.attention import set_sequence_parallel
from loom.models.vlm import image_shards

# Three images of 16, 8 and 8 patches and a video of 2 x 8 over two rows; rows padded to
# a multiple of 4.
ROWS = (([(1, 4, 4), (1, 2, 4)],), ([(1, 4, 2)], [Video(2, 2, 4)]))
PATCHES, FEATURES = [16, 8, 8, 16], [4, 2, 2, 4]
PAD_TO = 64


def _loss_and_grads(name: str, shard: bool) -> tuple[float, dict, list[int]]:
    torch.manual_seed(0)
    model = build_model(TOY / f"{name}_toy", attn_implementation="loom_sdpa")
    group = dist.group.WORLD if dist.get_world_size() > 1 else None
    set_sequence_parallel(model, group)
    config = model.config
    batch = vlm_batch(config, ROWS, pad_to=PAD_TO)
    seen = []  # the patches this rank's vision tower ran on, per call
    model.model.visual.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    ends = torch.tensor([n for row in batch.lengths for n in row]).cumsum(0)
    cu = torch.cat([torch.zeros(1), ends]).to(torch.int32)
    longest = max(max(row) for row in batch.lengths)
    kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest,
              "max_length_k": longest}  # fmt: skip
    ids, labels, positions = batch.input_ids, batch.labels, batch.position_ids
    if group is not None:
        sp, rank = dist.get_world_size(), dist.get_rank()
        part = slice(rank * PAD_TO // sp, (rank + 1) * PAD_TO // sp)
        slices, offset = {}, 0  # indices into the joint features: images, then videos
        for modality in ("image", "video"):
            is_token = ids == getattr(config, f"{modality}_token_id")
            order = is_token.reshape(-1).cumsum(0).reshape(ids.shape) - 1 + offset
            slices[modality] = order[:, part][is_token[:, part]]
            offset += int(is_token.sum())
        kwargs["vision_slices"] = slices
        if shard:
            kwargs["vision_shards"] = image_shards(PATCHES, FEATURES, sp)
        ids, labels = (slice_input(t, 1, group) for t in (ids, labels))
        positions = slice_input(positions, 2, group)
    out = model(
        input_ids=ids, position_ids=positions, pixel_values=batch.pixel_values,
        image_grid_thw=batch.image_grid_thw, pixel_values_videos=batch.pixel_values_videos,
        video_grid_thw=batch.video_grid_thw, shift_labels=labels, num_items_in_batch=1,
        **kwargs,
    )  # fmt: skip
    out.loss.backward()
    loss = out.loss.detach()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    if group is not None:  # each rank's loss covers its slice: the total is the sum
        dist.all_reduce(loss)
        for g in grads.values():
            dist.all_reduce(g)
    return loss.item(), grads, seen


@pytest.mark.parametrize("shard", [True, False], ids=["shards", "whole"])
@pytest.mark.parametrize(("name", "sp"), sp_params(VLM, (2, 4)))
def test_vlm_sp_matches_single_process(name, sp, shard):
    want_loss, want_grads, _ = run_distributed(_loss_and_grads, 1, name, False)[0]
    results = run_distributed(_loss_and_grads, sp, name, shard)
    for loss, grads, _ in results:
        assert loss == pytest.approx(want_loss, rel=1e-5)
        for key, want in want_grads.items():
            # fp32; with shards the vision tower's GEMMs on fewer patches sum in another
            # order (seen: 3e-6 on gradients up to 7)
            atol = 1e-5 if shard else 1e-6
            torch.testing.assert_close(grads[key], want, rtol=1e-5, atol=atol, msg=key)
    seen = [s for _, _, s in results]
    if not shard:
        assert all(s == [sum(PATCHES)] for s in seen), seen  # every rank: all patches
    else:
        shards = image_shards(PATCHES, FEATURES, sp)
        merge_square = 4  # the dummy image: merge x merge patches
        assert seen == [[end - first or merge_square] for first, end, *_ in shards], seen
