"""Ulysses sequence parallelism: each SP rank holds ``seq / sp`` tokens of a row, and
attention switches to ``heads / sp`` heads over the whole sequence with one all-to-all.

Gradient rule (the same as FSDP's): the objective is the *sum of every rank's local
loss*. So ``slice_input`` is a plain local slice (its backward leaves zeros outside this
rank's part; the data-parallel reduction adds the parts), and ``gather_outputs``
backward sums the gradients of every rank (reduce-scatter). A loss computed
identically on every SP rank after ``gather_outputs`` must be divided by ``sp``.

Every function takes the SP process group explicitly (``ParallelState.sp_group``).
The collective core, ``_all_to_all``, is one function so an asynchronous variant (start
the all-to-all of ``q`` while ``k`` and ``v`` are projected) can reuse it unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

Group = dist.ProcessGroup | None


def _check_divisible(x: torch.Tensor, dim: int, sp: int, what: str) -> None:
    if x.size(dim) % sp:
        raise ValueError(
            f"{what}: dimension {dim} of a tensor of shape {tuple(x.shape)} has size "
            f"{x.size(dim)}, which the sequence-parallel size {sp} does not divide"
        )


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: Group) -> torch.Tensor:
    """Split ``x`` along ``scatter_dim`` into ``sp`` parts, send part ``j`` to rank ``j``,
    and concatenate what arrives along ``gather_dim`` (in rank order)."""
    sp = dist.get_world_size(group)
    if sp == 1:
        return x
    send = torch.stack(x.tensor_split(sp, scatter_dim))  # [sp, *part]
    recv = torch.empty_like(send)  # recv[j]: rank j's part for this rank
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):  # type: ignore[override]
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad.contiguous(), gather_dim, scatter_dim, ctx.group), None, None, None


class _GatherOutputs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):  # type: ignore[override]
        ctx.dim, ctx.group = dim, group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        sp = dist.get_world_size(ctx.group)
        send = torch.stack(grad.tensor_split(sp, ctx.dim))  # [sp, *part]
        out = torch.empty_like(send[:1])  # [1, *part]: this rank's part, summed
        dist.reduce_scatter_tensor(out, send, group=ctx.group)
        return out[0], None, None


def slice_input(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """This rank's contiguous ``1/sp`` of ``x`` along ``dim`` (size must divide evenly).

    ``[batch, seq, ...] -> [batch, seq/sp, ...]`` for ``dim=1``.
    """
    sp, rank = dist.get_world_size(group), dist.get_rank(group)
    _check_divisible(x, dim, sp, "slice_input")
    return x.tensor_split(sp, dim)[rank]


def pad_to_multiple(
    x: torch.Tensor, dim: int, multiple: int, value: float = 0.0
) -> tuple[torch.Tensor, int]:
    """Pad the end of ``dim`` with ``value`` up to a multiple of ``multiple``.

    Returns the padded tensor and the number of padding entries added.
    """
    pad = -x.size(dim) % multiple
    if pad == 0:
        return x, 0
    widths = [0, 0] * (x.dim() - dim % x.dim())
    widths[-1] = pad  # F.pad lists (left, right) pairs from the last dimension back
    return F.pad(x, widths, value=value), pad


def pad_and_slice(
    x: torch.Tensor, dim: int, group: Group, multiple: int | None = None, value: float = 0.0
) -> tuple[torch.Tensor, int]:
    """Pad ``dim`` to a multiple of ``multiple`` (default: the SP size), then
    ``slice_input``. Returns this rank's part and the padding to ``unpad`` later.

    Use ``value=-100`` (the ignore index) for labels so padded tokens carry no loss.
    """
    sp = dist.get_world_size(group)
    multiple = multiple or sp
    if multiple % sp:
        raise ValueError(f"pad_and_slice: multiple={multiple} is not a multiple of sp={sp}")
    padded, pad = pad_to_multiple(x, dim, multiple, value)
    return slice_input(padded, dim, group), pad


def unpad(x: torch.Tensor, dim: int, pad: int) -> torch.Tensor:
    """Drop the last ``pad`` entries of ``dim`` (the inverse of ``pad_to_multiple``)."""
    return x.narrow(dim, 0, x.size(dim) - pad) if pad else x


def gather_outputs(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Concatenate every SP rank's ``x`` (same shape on every rank) along ``dim``;
    backward sums over ranks.

    ``[batch, seq/sp, ...] -> [batch, seq, ...]`` for ``dim=1``.
    """
    if dist.get_world_size(group) == 1:
        return x
    return _GatherOutputs.apply(x, dim, group)


def sum_over_ranks(x: torch.Tensor, group: Group) -> torch.Tensor:
    """The sum of every SP rank's ``x`` (same shape on every rank), on every rank; backward
    sums the gradients over ranks too, as for ``gather_outputs``: every rank's loss uses
    the total, and each rank's part gets the gradient of all of them."""
    if dist.get_world_size(group) == 1:
        return x
    return _SumOverRanks.apply(x, group)


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        total = x.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        total = grad.clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


def gather_seq_scatter_heads(
    x: torch.Tensor, seq_dim: int, head_dim: int, group: Group
) -> torch.Tensor:
    """Before attention: ``[batch, seq/sp, heads, dim] -> [batch, seq, heads/sp, dim]``
    (for ``seq_dim=1, head_dim=2``). Heads must divide by the SP size; for fewer KV
    heads use ``repeat_kv_for_sp`` first."""
    _check_divisible(x, head_dim, dist.get_world_size(group), "gather_seq_scatter_heads")
    return _AllToAll.apply(x, head_dim, seq_dim, group)


def gather_heads_scatter_seq(
    x: torch.Tensor, head_dim: int, seq_dim: int, group: Group
) -> torch.Tensor:
    """After attention: ``[batch, seq, heads/sp, dim] -> [batch, seq/sp, heads, dim]``
    (for ``head_dim=2, seq_dim=1``)."""
    _check_divisible(x, seq_dim, dist.get_world_size(group), "gather_heads_scatter_seq")
    return _AllToAll.apply(x, seq_dim, head_dim, group)


def repeat_kv_for_sp(kv: torch.Tensor, head_dim: int, num_q_heads: int, sp: int) -> torch.Tensor:
    """Repeat grouped-query KV heads so their count divides by ``sp`` and each SP rank's
    KV heads are the ones its query heads attend to.

    With ``g`` KV heads, each is repeated ``sp / gcd(g, sp)`` times (``repeat_interleave``
    keeps every query head's KV head in the same rank's slice). Possible whenever ``sp``
    divides the query heads; raises ``ValueError`` otherwise.
    """
    kv_heads = kv.size(head_dim)
    if num_q_heads % sp:
        raise ValueError(
            f"{num_q_heads} query heads cannot be split over sp={sp} ranks; choose an sp "
            f"that divides {num_q_heads}"
        )
    if num_q_heads % kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {kv_heads} KV heads")
    repeats = sp // math.gcd(kv_heads, sp)
    return kv.repeat_interleave(repeats, dim=head_dim) if repeats > 1 else kv
