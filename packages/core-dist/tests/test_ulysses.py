"""Ulysses primitives: attention computed through gather_seq_scatter_heads -> attention
-> gather_heads_scatter_seq on SP ranks equals full-sequence attention, values and
gradients, for padded lengths and grouped-query (fewer KV heads than SP ranks)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from loom.dist.testing import assert_close, rank_device, run_distributed
from loom.dist.ulysses import (
    gather_heads_scatter_seq,
    gather_outputs,
    gather_seq_scatter_heads,
    pad_and_slice,
    pad_to_multiple,
    repeat_kv_for_sp,
    slice_input,
    sum_over_ranks,
    unpad,
)

BATCH, DIM, HEAD_DIM = 2, 16, 4


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention, ``[batch, seq, heads, dim]`` in and out; KV heads repeated."""
    groups = q.size(2) // k.size(2)
    k, v = (t.repeat_interleave(groups, dim=2) for t in (k, v))
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
    return out.transpose(1, 2)


def _weights(heads: int, kv_heads: int, device: torch.device) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    shapes = [(DIM, heads * HEAD_DIM), (DIM, kv_heads * HEAD_DIM), (DIM, kv_heads * HEAD_DIM)]
    shapes.append((heads * HEAD_DIM, DIM))
    return [
        (torch.randn(s, generator=generator) / DIM**0.5).to(device).requires_grad_() for s in shapes
    ]


def _full(x: torch.Tensor, weights: list[torch.Tensor], heads: int, kv_heads: int):
    wq, wk, wv, wo = weights
    batch, seq, _ = x.shape
    q = (x @ wq).view(batch, seq, heads, HEAD_DIM)
    k, v = ((x @ w).view(batch, seq, kv_heads, HEAD_DIM) for w in (wk, wv))
    return _attend(q, k, v).flatten(2) @ wo


def _sequence_parallel(x_local, weights, heads, kv_heads, group):
    """The same layer on this rank's ``seq/sp`` tokens."""
    sp = dist.get_world_size(group)
    wq, wk, wv, wo = weights
    batch, local_seq, _ = x_local.shape
    q = (x_local @ wq).view(batch, local_seq, heads, HEAD_DIM)
    k, v = ((x_local @ w).view(batch, local_seq, kv_heads, HEAD_DIM) for w in (wk, wv))
    k, v = (repeat_kv_for_sp(t, 2, heads, sp) for t in (k, v))
    # [batch, seq/sp, heads, dim] -> [batch, seq, heads/sp, dim]
    q, k, v = (gather_seq_scatter_heads(t, 1, 2, group) for t in (q, k, v))
    out = gather_heads_scatter_seq(_attend(q, k, v), 2, 1, group)  # back to [b, seq/sp, ...]
    return out.flatten(2) @ wo


def _grads(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum over ranks: the objective is the sum of every rank's local loss."""
    grads = [t.grad.clone() for t in tensors]
    for grad in grads:
        dist.all_reduce(grad)
    for t in tensors:
        t.grad = None
    return grads


def _attention_matches_full_sequence() -> None:
    group, sp, device = dist.group.WORLD, dist.get_world_size(), rank_device()
    for seq in (8, 7):  # 7: padded to a multiple of sp
        for heads, kv_heads in ((4, 4), (4, 2), (4, 1)):
            where = f"sp={sp} seq={seq} heads={heads} kv_heads={kv_heads}"
            x = torch.randn(BATCH, seq, DIM, generator=torch.Generator().manual_seed(seq))
            x = x.to(device).requires_grad_()
            probe = torch.randn(BATCH, seq, DIM, generator=torch.Generator().manual_seed(1))
            probe = probe.to(device)
            weights = _weights(heads, kv_heads, device)
            expected = _full(x, weights, heads, kv_heads)
            (expected * probe).sum().backward()
            expected_grads = [g.grad.clone() for g in [x, *weights]]
            for g in [x, *weights]:
                g.grad = None

            # Loss on local tokens only.
            x_local, pad = pad_and_slice(x, 1, group)
            y_local = _sequence_parallel(x_local, weights, heads, kv_heads, group)
            probe_local, _ = pad_and_slice(probe, 1, group)  # padded tokens weigh zero
            (y_local * probe_local).sum().backward()
            full_y = unpad(gather_outputs(y_local.detach(), 1, group), 1, pad)
            assert_close(full_y, expected, f"{where}: output")
            for got, want, name in zip(_grads([x, *weights]), expected_grads, "xqkvo", strict=True):
                assert_close(got, want, f"{where}: local loss, grad of {name}")

            # The same loss computed on every rank after gathering (hence / sp).
            y_local = _sequence_parallel(
                pad_and_slice(x, 1, group)[0], weights, heads, kv_heads, group
            )
            y = unpad(gather_outputs(y_local, 1, group), 1, pad)
            ((y * probe).sum() / sp).backward()
            for got, want, name in zip(_grads([x, *weights]), expected_grads, "xqkvo", strict=True):
                assert_close(got, want, f"{where}: gathered loss, grad of {name}")

    with pytest.raises(ValueError, match="sequence-parallel size"):
        gather_seq_scatter_heads(torch.zeros(1, 2, sp + 1, 1), 1, 2, group)


@pytest.mark.parametrize("sp", [2, 4])
def test_attention_matches_full_sequence(sp):
    run_distributed(_attention_matches_full_sequence, sp)


def _slices_tile_the_input() -> None:
    group, rank, sp = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    x = torch.arange(2 * 4 * sp).view(2, 4 * sp).to(rank_device())
    assert torch.equal(slice_input(x, 1, group), x[:, 4 * rank : 4 * rank + 4])
    part, pad = pad_and_slice(x[:, :-1], 1, group, value=-100)
    assert pad == 1 and part.shape == (2, 4)
    if rank == sp - 1:
        assert (part[:, -1] == -100).all()
    with pytest.raises(ValueError, match="does not divide"):
        slice_input(x[:, :-1], 1, group)


def test_slices_tile_the_input():
    run_distributed(_slices_tile_the_input, 2)


def test_pad_to_multiple_and_unpad():
    x = torch.arange(10.0).view(2, 5)
    padded, pad = pad_to_multiple(x, 1, 4, value=-1.0)
    assert pad == 3 and padded.shape == (2, 8) and (padded[:, 5:] == -1).all()
    assert torch.equal(unpad(padded, 1, pad), x)
    padded, pad = pad_to_multiple(x, 0, 2)
    assert pad == 0 and padded is x


@pytest.mark.parametrize(
    ("kv_heads", "sp", "repeats"), [(8, 4, 1), (2, 4, 2), (1, 4, 4), (3, 2, 2), (2, 8, 4)]
)
def test_repeat_kv_for_sp_keeps_query_groups_together(kv_heads, sp, repeats):
    heads = 24
    kv = torch.arange(kv_heads).view(1, 1, kv_heads, 1)
    out = repeat_kv_for_sp(kv, 2, heads, sp)
    assert out.size(2) == kv_heads * repeats and out.size(2) % sp == 0
    # Query head h attends KV head h // (heads / kv_heads); on its rank it must find it at
    # local position (h % (heads/sp)) // (local query heads / local kv heads).
    local_q, local_kv = heads // sp, out.size(2) // sp
    for head in range(heads):
        rank, local = divmod(head, local_q)
        found = out[0, 0, rank * local_kv + local // (local_q // local_kv), 0]
        assert found == head // (heads // kv_heads)


def test_repeat_kv_for_sp_refuses_indivisible_query_heads():
    with pytest.raises(ValueError, match="6 query heads cannot be split over sp=4"):
        repeat_kv_for_sp(torch.zeros(1, 1, 2, 1), 2, 6, 4)


def _sum_over_ranks_has_the_total_gradient() -> None:
    group, rank, sp = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    parts = torch.randn(sp, 5, generator=torch.Generator().manual_seed(3)).to(rank_device())
    mine = parts[rank].clone().requires_grad_()
    total = sum_over_ranks(mine, group)
    assert_close(total, parts.sum(0), "sum")
    # Every rank computes the same loss of the total (hence / sp, as for a gathered loss):
    # each part's gradient is that of (sum of parts)**2, not of its own square.
    ((total**2).sum() / sp).backward()
    assert_close(mine.grad, 2 * parts.sum(0), "grad")


@pytest.mark.parametrize("sp", [2, 4])
def test_sum_over_ranks_has_the_total_gradient(sp):
    run_distributed(_sum_over_ranks_has_the_total_gradient, sp)
