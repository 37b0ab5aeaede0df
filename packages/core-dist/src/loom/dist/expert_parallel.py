"""Expert parallelism: send each routed token to the rank that owns its expert, and back.

Experts are ``Shard(0)`` over the ``ep`` group: with ``E`` experts, ep rank ``r`` owns
experts ``[r * E/ep, (r + 1) * E/ep)``. ``dispatch`` sorts the ``tokens * top_k``
(token, expert) pairs by expert, exchanges them with one uneven all-to-all and regroups
what arrives by local expert; ``combine`` undoes each step and sums the ``top_k``
outputs of a token weighted by the router. Both are differentiable (the all-to-all's
backward is the all-to-all with the splits swapped), gradients reach the router
weights through ``combine``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

Group = dist.ProcessGroup | None


@dataclass(frozen=True)
class DispatchHandle:
    """What ``combine`` needs to undo ``dispatch``."""

    pair_order: torch.Tensor  # [tokens * top_k]: (token, k) pairs sorted by expert
    local_order: torch.Tensor  # [received]: received rows sorted by local expert
    send_splits: list[int]  # rows sent to each ep rank
    recv_splits: list[int]  # rows received from each ep rank
    top_k: int


class _AllToAllUneven(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):  # type: ignore[override]
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return _exchange(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        send_splits, recv_splits = ctx.splits
        return _exchange(grad, recv_splits, send_splits, ctx.group), None, None, None


def _exchange(
    x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: Group
) -> torch.Tensor:
    """Rows ``[sum(send_splits), ...] -> [sum(recv_splits), ...]`` over ``group``."""
    if dist.get_world_size(group) == 1:
        return x
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


def _inverse(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


def dispatch(
    hidden: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, group: Group
) -> tuple[torch.Tensor, list[int], DispatchHandle]:
    """Send each (token, expert) pair to the ep rank that owns the expert.

    ``hidden``: ``[tokens, dim]``; ``expert_ids``: ``[tokens, top_k]`` (int, global ids).
    Returns the rows this rank's experts must process, grouped by local expert
    (``[received, dim]``), the row count of each local expert (``E/ep`` ints, a rank may
    receive none at all), and the handle for ``combine``.
    """
    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    if num_experts % ep:
        raise ValueError(f"{num_experts} experts cannot be split evenly over ep={ep} ranks")
    if expert_ids.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"expert_ids has {expert_ids.shape[0]} rows but hidden has {hidden.shape[0]} tokens"
        )
    local_experts = num_experts // ep
    top_k = expert_ids.shape[1]
    flat_ids = expert_ids.flatten()  # [tokens * top_k]
    if flat_ids.numel() and (flat_ids.min() < 0 or flat_ids.max() >= num_experts):
        raise ValueError(f"ep rank {rank}: expert ids must lie in [0, {num_experts})")
    pair_order = torch.argsort(flat_ids, stable=True)
    rows = hidden[pair_order // top_k]  # [tokens, dim] -> [tokens * top_k, dim], by expert
    counts = torch.bincount(flat_ids, minlength=num_experts)  # [E]
    recv_counts = _exchange(counts, [local_experts] * ep, [local_experts] * ep, group)
    recv_counts = recv_counts.view(ep, local_experts)  # [source rank, local expert]
    send_splits = counts.view(ep, local_experts).sum(1).tolist()
    recv_splits = recv_counts.sum(1).tolist()
    received = _AllToAllUneven.apply(rows, send_splits, recv_splits, group)
    # Received rows are ordered (source rank, local expert); experts want them by expert.
    local_ids = torch.arange(local_experts, device=counts.device).repeat(ep)
    local_ids = local_ids.repeat_interleave(recv_counts.flatten())
    local_order = torch.argsort(local_ids, stable=True)
    handle = DispatchHandle(pair_order, local_order, send_splits, recv_splits, top_k)
    return received[local_order], recv_counts.sum(0).tolist(), handle


def combine(
    expert_out: torch.Tensor, weights: torch.Tensor, handle: DispatchHandle, group: Group
) -> torch.Tensor:
    """Return expert outputs to their tokens and sum them weighted by the router.

    ``expert_out``: ``[received, dim]`` in ``dispatch``'s order; ``weights``:
    ``[tokens, top_k]``. Returns ``[tokens, dim]``.
    """
    by_source = expert_out[_inverse(handle.local_order)]  # by (source rank, local expert)
    rows = _AllToAllUneven.apply(by_source, handle.recv_splits, handle.send_splits, group)
    pairs = rows[_inverse(handle.pair_order)]  # [tokens * top_k, dim] in (token, k) order
    pairs = pairs.view(weights.shape[0], handle.top_k, pairs.shape[-1])  # [tokens, top_k, dim]
    return (pairs * weights.unsqueeze(-1).to(pairs.dtype)).sum(1)
