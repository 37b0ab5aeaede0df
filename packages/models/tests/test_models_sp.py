"""Ulysses SP through Loom's attention backends: at sp 2 and 4 on CPU gloo, each port's
loss and gradients equal the single-process (sp=1) computation of the same packed rows."""

import pytest
import torch
import torch.distributed as dist
from _ports import DENSE, TOY, sp_params
from test_models_patch import packed_batch

from loom.dist.testing import run_distributed
from loom.dist.ulysses import slice_input
from loom.models import build_model
from loom.models.attention import set_sequence_parallel


def _batch(vocab: int):
    """test_models_patch's packed rows, with the samples' boundaries over the flat batch."""
    ids, labels, positions, lengths = packed_batch(vocab)
    ends = torch.tensor([n for row in lengths for n in row]).cumsum(0)
    cu = torch.cat([torch.zeros(1), ends]).to(torch.int32)
    return ids, labels, positions, cu


def _loss_and_grads(name: str, backend: str) -> tuple[float, dict[str, torch.Tensor]]:
    """On every rank of the world (the SP group): local slice, summed local loss."""
    torch.manual_seed(0)
    model = build_model(TOY / f"{name}_toy", attn_implementation=backend)
    group = dist.group.WORLD if dist.get_world_size() > 1 else None
    set_sequence_parallel(model, group)
    ids, labels, positions, cu = _batch(model.config.vocab_size)
    if group is not None:
        ids, labels, positions = (slice_input(t, 1, group) for t in (ids, labels, positions))
    varlen = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 16, "max_length_k": 16}
    out = model(
        input_ids=ids, position_ids=positions, shift_labels=labels, num_items_in_batch=1, **varlen
    )
    out.loss.backward()  # this rank's share of the summed loss
    loss = out.loss.detach()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    if group is not None:  # every rank saw other tokens: the total is the sum
        dist.all_reduce(loss)
        for g in grads.values():
            dist.all_reduce(g)
    return loss.item(), grads


@pytest.mark.parametrize(("name", "sp"), sp_params(DENSE, (2, 4)))
def test_sp_matches_single_process(name, sp):
    want_loss, want_grads = run_distributed(_loss_and_grads, 1, name, "loom_sdpa")[0]
    for loss, grads in run_distributed(_loss_and_grads, sp, name, "loom_sdpa"):
        assert loss == pytest.approx(want_loss, rel=1e-5)
        for key, want in want_grads.items():
            torch.testing.assert_close(grads[key], want, rtol=1e-5, atol=1e-6, msg=key)
