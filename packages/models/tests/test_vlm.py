"""Loom's vision-language ports compute what upstream HF computes (CPU, fp32).

Image+text, image+video+text and text-only batches, every attention backend: the loss and every
parameter's gradient, by name, against upstream eager. Packed rows (several samples
with their images in one row) against each sample alone. The 3-D rotary positions of
``loom.models.vlm_positions`` against upstream's ``get_rope_index``. 20 AdamW steps
against the upstream class. A micro-batch without images still runs the vision tower.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _grads import assert_grads_match, assert_tensors_match, convert_all, grads_by_name
from _ports import CASES, MAJOR, TOY, VLM, backend_params, params
from _vlm import Video, token_types, vlm_batch
from transformers import AutoConfig

from loom.models import build_model
from loom.models.registry import model_class, model_type, port_hooks
from loom.models.vlm_positions import mrope_positions

# One sample per row, rows of equal length: what upstream takes without a padding mask.
SINGLE = (([(1, 4, 4), (1, 2, 4)],), ([(1, 2, 4), (1, 4, 4)],))
TEXT_ONLY = (([],), ([],))
# Images and videos of 2 temporal patches, in either order.
VIDEOS = (([(1, 4, 4), Video(2, 2, 4)],), ([Video(2, 2, 4), (1, 4, 4)],))


def upstream(name: str, attn: str = "eager"):
    config = AutoConfig.from_pretrained(TOY / f"{name}_toy")
    torch.manual_seed(0)
    import transformers

    cls = getattr(transformers, model_class(config)[0].__name__)
    return cls._from_config(config, attn_implementation=attn)


def port(name: str, backend: str, reference):
    model = build_model(TOY / f"{name}_toy", attn_implementation=backend)
    model.load_state_dict(to_port(reference, reference.state_dict()))
    return model


def to_port(reference, tensors: dict) -> dict:
    """Upstream's tensors (weights or gradients: the maps are linear) in the port's layout,
    through the port's checkpoint converter (v4's transposed stacked experts)."""
    factory = port_hooks(model_type(reference.config)).converter
    return tensors if factory is None else convert_all(factory(reference.config), tensors)


def assert_port_grads_match(model, reference, rtol: float, atol: float) -> None:
    assert_grads_match(model, reference, rtol, atol, rename=lambda t: to_port(reference, t))


def upstream_loss(model, batch, reduction="mean") -> torch.Tensor:
    inputs = {k: v for k, v in batch.upstream_inputs(model.config).items() if v is not None}
    logits = model(**inputs).logits
    return F.cross_entropy(
        logits.flatten(0, 1), batch.labels.flatten(), ignore_index=-100, reduction=reduction
    )


def port_loss(model, batch, num_items=None) -> torch.Tensor:
    return model(
        **batch.port_inputs(), shift_labels=batch.labels, num_items_in_batch=num_items
    ).loss


@pytest.mark.parametrize(("name", "backend"), backend_params(VLM))
@pytest.mark.parametrize("rows", [SINGLE, VIDEOS, TEXT_ONLY], ids=["images", "videos", "text_only"])
def test_forward_backward_matches_upstream(name, backend, rows):
    reference = upstream(name)
    model = port(name, backend, reference)
    batch = vlm_batch(reference.config, rows)
    want = upstream_loss(reference, batch)
    want.backward()
    got = port_loss(model, batch)
    got.backward()
    case = CASES[name]
    torch.testing.assert_close(got, want, rtol=case.rtol, atol=case.atol)
    # text only: upstream never runs the vision tower (no gradient: zeros by name), the
    # port runs it on a dummy image times zero (gradient exactly zero)
    assert_port_grads_match(model, reference, rtol=case.rtol, atol=case.atol)


@pytest.mark.parametrize("name", params(VLM))
def test_text_only_micro_batch_runs_the_vision_tower(name):
    """What keeps FSDP's collectives matched when one rank's micro-batch has no image:
    every vision parameter gets a gradient (zeros), not None."""
    model = build_model(TOY / f"{name}_toy", attn_implementation="loom_sdpa")
    port_loss(model, vlm_batch(model.config, TEXT_ONLY)).backward()
    visual = dict(model.model.visual.named_parameters())
    assert all(p.grad is not None for p in visual.values()), [
        n for n, p in visual.items() if p.grad is None
    ]
    assert all(not p.grad.any() for p in visual.values())


@pytest.mark.parametrize(("name", "backend"), backend_params(VLM, ("loom_sdpa", "loom_varlen")))
def test_packed_rows_equal_separate_samples(name, backend):
    """Rows of several samples with their images (and padding) against each sample cut
    out of the rows and run alone through upstream: summed loss and every gradient."""
    reference = upstream(name)
    model = port(name, backend, reference)
    packed = vlm_batch(reference.config)
    got = port_loss(model, packed, num_items=1)
    got.backward()
    want = 0
    reference.zero_grad()
    grids = iter(packed.image_grid_thw.tolist()) if packed.image_grid_thw is not None else None
    patch_start = 0
    for r, lengths in enumerate(packed.lengths):
        start = 0
        for n in lengths:
            ids = packed.input_ids[r : r + 1, start : start + n]
            labels = packed.labels[r : r + 1, start : start + n]
            if (labels != -100).any():
                images = int((ids == reference.config.vision_start_token_id).sum())
                sample_grids = [next(grids) for _ in range(images)]
                patches = sum(t * h * w for t, h, w in sample_grids)
                inputs = {"input_ids": ids}
                if images:
                    inputs["pixel_values"] = packed.pixel_values[
                        patch_start : patch_start + patches
                    ]
                    inputs["image_grid_thw"] = torch.tensor(sample_grids)
                    if MAJOR >= 5:
                        inputs["mm_token_type_ids"] = (ids == reference.config.image_token_id).int()
                    else:
                        inputs["position_ids"] = packed.position_ids[
                            :, r : r + 1, start : start + n
                        ]
                patch_start += patches
                logits = reference(**inputs).logits
                want = want + F.cross_entropy(
                    logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
                )
            start += n
    want.backward()
    case = CASES[name]
    torch.testing.assert_close(got, want, rtol=case.rtol, atol=case.atol)
    assert_port_grads_match(model, reference, rtol=case.rtol, atol=case.atol * 10)


@pytest.mark.parametrize("name", params(VLM))
@pytest.mark.parametrize("rows", [SINGLE, VIDEOS], ids=["images", "videos"])
def test_positions_match_upstream_rope_index(name, rows):
    """Several images (and videos) per sample, of different grids, text between and after
    them."""
    reference = upstream(name)
    config = reference.config
    batch = vlm_batch(config, rows)
    assert not any(len(lengths) > 1 for lengths in batch.lengths)  # no padding
    kwargs = {
        k: v
        for k, v in batch.upstream_inputs(config).items()
        if k in ("video_grid_thw", "second_per_grid_ts") and v is not None
    }
    if MAJOR >= 5:
        kwargs["mm_token_type_ids"] = token_types(batch.input_ids, config)
    want, _ = reference.model.get_rope_index(
        batch.input_ids, image_grid_thw=batch.image_grid_thw, **kwargs
    )
    torch.testing.assert_close(batch.position_ids[1:], want, rtol=0, atol=0)


def test_positions_name_a_placeholder_count_that_fits_no_grid():
    ids = np.array([1, 9, 9, 9, 2])
    with pytest.raises(ValueError, match="3 placeholder tokens for a grid of 1x2x2"):
        mrope_positions(
            ids, np.array([[1, 4, 4]]), None, image_token_id=9, video_token_id=8,
            spatial_merge_size=2,
        )  # fmt: skip
    with pytest.raises(ValueError, match="1 runs of image placeholder tokens but 2 image grids"):
        mrope_positions(
            ids, np.array([[1, 2, 2], [1, 2, 2]]), None, image_token_id=9, video_token_id=8,
            spatial_merge_size=2,
        )  # fmt: skip


@pytest.mark.parametrize("name", params(VLM))
def test_generation_path_gives_upstream_logits(name):
    """Without labels the port runs upstream's model forward (positions computed there)."""
    reference = upstream(name)
    model = port(name, "eager", reference)
    batch = vlm_batch(reference.config, SINGLE)
    inputs = batch.upstream_inputs(reference.config)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits)


@pytest.mark.parametrize("name", params(VLM))
def test_sequence_parallel_needs_positions(name):
    """A slice of the row cannot give its 3-D positions: under SP a training forward
    without them is refused, not run with positions computed from the slice."""
    reference = upstream(name)
    model = port(name, "eager", reference)
    inputs = {**vlm_batch(reference.config, SINGLE).port_inputs(), "position_ids": None}
    labels = torch.zeros_like(inputs["input_ids"])
    for module in model.modules():
        module.loom_sp_group = object()  # what set_sequence_parallel sets: a group of 2+
    with pytest.raises(ValueError, match=r"under sequence parallelism .* needs position_ids"):
        model(**inputs, shift_labels=labels)


MOE_VLM = [name for name in VLM if CASES[name].moe]


@pytest.mark.parametrize("name", params(MOE_VLM))
@pytest.mark.parametrize("orientation", ["saved", "transposed"])
def test_checkpoint_in_either_orientation_and_export(name, orientation, tmp_path):
    """Upstream's save_pretrained (v4 and the Hub stack the experts as [E, H, 2I], v5 as
    [E, 2I, H]), and the same file with the experts turned the other way, both load into
    the port as upstream's weights; the port's export loads back into upstream equal."""
    from safetensors.torch import load_file, save_file

    reference = upstream(name)
    reference.save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf/model.safetensors"
    if orientation == "transposed":
        tensors = load_file(weights)
        save_file({k: v.transpose(1, 2).contiguous() if ".experts." in k else v for k, v in tensors.items()}, weights)  # fmt: skip
    model = build_model(tmp_path / "hf", init="pretrained")
    want = to_port(reference, reference.state_dict())
    assert_tensors_match(model.state_dict(), want, 0.0, 0.0, what="weight")
    export = port_hooks(model_type(model.config)).to_hf(
        {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    )
    save_file({k: v.contiguous() for k, v in export.items()}, weights)
    back = type(reference).from_pretrained(tmp_path / "hf")
    assert_tensors_match(back.state_dict(), reference.state_dict(), 0.0, 0.0, what="weight")


STEPS, LR = 20, 3e-3


def _train(model, loss_fn, batches) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, eps=1e-6, weight_decay=0.01, foreach=False)  # fmt: skip
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, batches[step % len(batches)])
        loss.backward()
        for param in model.parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", params(VLM))
def test_trains_as_upstream(name):
    """20 AdamW steps on image+text batches: every step's loss at rel 1e-5, every weight
    (vision tower included) within a tenth of a step of upstream's."""
    reference = upstream(name)
    model = port(name, "loom_varlen", reference)
    batches = [vlm_batch(reference.config, SINGLE, seed=s) for s in range(3)]
    want = _train(reference, upstream_loss, batches)
    got = _train(model, port_loss, batches)
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert abs(g - w) <= 1e-6 + 1e-5 * abs(w), f"step {step}: loss {g}, upstream {w}"
    assert want[-1] < want[0] - 0.5, f"the toy should learn: {want}"
    got_params = {n: p.detach() for n, p in model.named_parameters()}
    want_params = to_port(reference, {n: p.detach() for n, p in reference.named_parameters()})
    assert_tensors_match(got_params, want_params, 0.0, LR / 10, what="parameter after training")
    assert set(grads_by_name(model)) == set(want_params)
