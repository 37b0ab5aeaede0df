"""Expert-parallel dispatch/combine equals a dense per-expert loop, forward and backward,
for random, skewed (every token to one expert) and empty (a rank receives or sends
nothing) routings; and a MoE layer under EP + FSDP (experts on the expert mesh, the
router on the dense mesh) gives a single process's gradients and clipped norm."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from loom.dist.clip import clip_grad_norm_
from loom.dist.expert_parallel import combine, dispatch
from loom.dist.export import full_tensor
from loom.dist.fsdp import apply_fsdp, mixed_precision
from loom.dist.mesh import init_parallel
from loom.dist.plan import ParallelPlan
from loom.dist.testing import assert_close, rank_device, run_distributed

EXPERTS, DIM, FFN = 8, 8, 12
EXPERT_PLAN = ParallelPlan({"w_in": (Shard(0),), "w_out": (Shard(0),)})


class Experts(nn.Module):
    """``EXPERTS`` two-layer MLPs stacked on dim 0 (the layout EP shards)."""

    def __init__(self) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(EXPERTS, DIM, FFN) / DIM**0.5)
        self.w_out = nn.Parameter(torch.randn(EXPERTS, FFN, DIM) / FFN**0.5)

    def forward(self, tokens: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """``tokens``: ``[rows, dim]`` grouped by local expert, ``counts[e]`` rows each."""
        w_in, w_out = (
            w.to_local() if isinstance(w, DTensor) else w for w in (self.w_in, self.w_out)
        )
        groups = tokens.split(counts)
        outs = [F.gelu(g @ w_in[e]) @ w_out[e] for e, g in enumerate(groups)]
        return torch.cat(outs) if outs else tokens[:0]


def dense_moe(x, ids, weights, experts: Experts) -> torch.Tensor:
    """Reference: every (token, k) pair through its expert, one at a time."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            y = F.gelu(x[t] @ experts.w_in[e]) @ experts.w_out[e]
            out[t] = out[t] + weights[t, k] * y
    return out


def _rank_data(rank: int, routing: str):
    """Tokens, router ids and weights of one rank; any rank can rebuild any rank's."""
    generator = torch.Generator().manual_seed(100 + rank)
    tokens = 0 if routing == "empty" and rank == 1 else 3 + 2 * rank
    x = torch.randn(tokens, DIM, generator=generator)
    if routing == "skewed":
        ids = torch.zeros(tokens, 1, dtype=torch.long)  # everything to expert 0 (rank 0)
    else:
        scores = torch.rand(tokens, EXPERTS, generator=generator)
        if routing == "empty":
            scores[:, EXPERTS // 2 :] = -1  # experts of the upper half: their ranks get none
        ids = scores.topk(2, dim=-1).indices
    weights = torch.rand(ids.shape, generator=generator).softmax(-1)
    return x, ids, weights


def _grad(t: torch.Tensor) -> torch.Tensor:
    """A rank without tokens has no path to its (empty) inputs in the dense loop."""
    return t.grad if t.grad is not None else torch.zeros_like(t)


def _dispatch_combine_matches_dense() -> None:
    group, rank, ep, device = (
        dist.group.WORLD,
        dist.get_rank(),
        dist.get_world_size(),
        rank_device(),
    )
    mesh = init_parallel(dp_shard=ep, ep=ep).ep_mesh
    for routing in ("random", "skewed", "empty"):
        torch.manual_seed(0)
        reference = Experts().to(device)
        experts = copy.deepcopy(reference)
        EXPERT_PLAN.apply(experts, mesh)
        # Reference: every rank's tokens through the dense loop; one summed loss.
        total, mine = 0.0, None
        for source in range(ep):
            x, ids, weights = (t.to(device) for t in _rank_data(source, routing))
            x.requires_grad_(), weights.requires_grad_()
            y = dense_moe(x, ids, weights, reference)
            total = total + (y * y.detach().sin()).sum()
            if source == rank:
                mine = (x, weights, y)
        total.backward()

        x, ids, weights = (t.to(device) for t in _rank_data(rank, routing))
        x.requires_grad_(), weights.requires_grad_()
        received, counts, handle = dispatch(x, ids, EXPERTS, group)
        if routing == "skewed":  # expert 0 lives on rank 0: the others receive nothing
            assert (received.shape[0] == 0) == (rank > 0)
        if routing == "empty":  # no upper-half expert is chosen, and rank 1 sends nothing
            assert (received.shape[0] == 0) == (rank >= ep // 2)
        y = combine(experts(received, counts), weights, handle, group)
        (y * y.detach().sin()).sum().backward()
        where = f"ep={ep} {routing}"
        assert_close(y, mine[2], f"{where}: output")
        assert_close(x.grad, _grad(mine[0]), f"{where}: token grad")
        assert_close(weights.grad, _grad(mine[1]), f"{where}: router weight grad")
        for name in ("w_in", "w_out"):
            sharded = getattr(experts, name).grad
            assert sharded.placements == (Shard(0),)
            expected = getattr(reference, name).grad
            assert_close(full_tensor(sharded), expected, f"{where}: {name} grad")

    x = torch.zeros(2, DIM, device=device)
    with pytest.raises(ValueError, match=rf"rank {rank}: expert ids must lie in \[0, {EXPERTS}\)"):
        dispatch(x, torch.tensor([[0], [EXPERTS]], device=device), EXPERTS, group)
    with pytest.raises(ValueError, match=f"7 experts cannot be split evenly over ep={ep}"):
        dispatch(x, torch.zeros(2, 1, dtype=torch.long, device=device), 7, group)


@pytest.mark.parametrize("ep", [2, 4])
def test_dispatch_combine_matches_dense(ep):
    run_distributed(_dispatch_combine_matches_dense, ep)


class MoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(DIM, EXPERTS, bias=False)
        self.experts = Experts()

    def forward(self, x: torch.Tensor, group) -> torch.Tensor:
        weights, ids = self.router(x).softmax(-1).topk(2, dim=-1)
        received, counts, handle = dispatch(x, ids, EXPERTS, group)
        return combine(self.experts(received, counts), weights, handle, group)


@contextlib.contextmanager
def _redistribute_warnings() -> Iterator[list[str]]:
    """DTensor's warnings that a redistribution runs one collective per mesh dim (each
    warned once per mesh, so the record of earlier ones is cleared first)."""
    from torch.distributed.tensor import _redistribute

    _redistribute._warned_flatten_issues.clear()
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger(_redistribute.__name__)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def _moe_under_ep_and_fsdp(degrees: dict) -> None:
    rank = dist.get_rank()
    torch.manual_seed(0)
    reference = MoE()
    model = copy.deepcopy(reference)
    loss = 0.0
    for source in range(dist.get_world_size()):
        x = _rank_data(source, "random")[0]
        w = reference.router(x).softmax(-1).topk(2, dim=-1)
        loss = loss + dense_moe(x, w.indices, w.values, reference.experts).square().sum()
    loss.backward()
    expected = {n: p.grad.clone() for n, p in reference.named_parameters()}
    expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
    assert expected_norm > 0.1, "the test needs a norm that clipping really scales"

    state = init_parallel(**degrees)
    model.to(state.device)
    EXPERT_PLAN.apply(model.experts, state.ep_mesh)
    apply_fsdp(
        model,
        [],
        state.fsdp_mesh,
        mixed_precision(torch.device("cpu")),
        experts=[model.experts],
        expert_mesh=state.expert_fsdp_mesh,
    )
    x = _rank_data(rank, "random")[0].to(state.device)
    local = model(x, state.ep_group).square().sum()
    (local * state.fsdp_size).backward()  # FSDP divides by fsdp_size: the sum remains
    for name, param in model.named_parameters():
        assert_close(full_tensor(param.grad), expected[name], f"{degrees}: {name} grad")
    with _redistribute_warnings() as warned:
        norm = clip_grad_norm_(model.parameters(), 0.1)
    assert not warned, f"{degrees}: clipping reduced dim by dim: {warned}"
    assert_close(norm, expected_norm, f"{degrees}: grad norm across the dense and expert meshes")
    for name, param in model.named_parameters():
        clipped = expected[name] * 0.1 / (expected_norm + 1e-6)
        assert_close(full_tensor(param.grad), clipped, f"{degrees}: clipped {name} grad")
    # What the HF export gathers: every parameter whole, without DTensor's warning.
    with _redistribute_warnings() as warned:
        gathered = {name: full_tensor(param) for name, param in model.named_parameters()}
    assert not warned, f"{degrees}: the export gathered dim by dim in one call: {warned}"
    for name, param in reference.named_parameters():
        assert torch.equal(gathered[name].cpu(), param.detach()), f"{degrees}: {name}"


@pytest.mark.parametrize(
    ("world", "degrees"),
    [
        (2, {"dp_shard": 2, "ep": 2}),
        (4, {"dp_shard": 4, "ep": 2}),
        (4, {"dp_replicate": 2, "ep": 2}),
    ],
    ids=["world2-ep2", "world4-ep2", "world4-hsdp-ep2"],
)
def test_moe_under_ep_and_fsdp_matches_single_process(world, degrees):
    run_distributed(_moe_under_ep_and_fsdp, world, degrees)
