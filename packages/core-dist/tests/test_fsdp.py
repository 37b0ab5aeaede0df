"""FSDP2 (and HSDP, and FSDP over SP ranks) gives a single process's loss, gradients,
clipped gradient norm and optimizer step on the same global batch, with ranks holding
unequal numbers of loss tokens and two micro-batches of gradient accumulation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from _tiny_model import IGNORE_INDEX, TinyLM, global_batch, token_loss_sum

from loom.dist.clip import clip_grad_norm_
from loom.dist.export import full_tensor
from loom.dist.fsdp import apply_fsdp, mixed_precision
from loom.dist.mesh import ParallelState, init_parallel
from loom.dist.testing import assert_close, run_distributed

MAX_NORM = 0.5  # below the gradient norm of the first step, so clipping really scales


def test_mixed_precision_policies():
    gpu = mixed_precision(torch.device("cuda"))
    assert (gpu.param_dtype, gpu.reduce_dtype) == (torch.bfloat16, torch.float32)
    cpu = mixed_precision(torch.device("cpu"))
    assert (cpu.param_dtype, cpu.reduce_dtype) == (torch.float32, torch.float32)


def _reference(model: TinyLM) -> dict[str, object]:
    """One AdamW step of ``model`` on the whole global batch in this process."""
    ids, labels = global_batch(0)
    tokens = (labels != IGNORE_INDEX).sum()
    loss = token_loss_sum(model, ids, labels) / tokens
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"loss": loss.detach(), "grads": grads, "norm": norm, "params": params}


def _local(tensor: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """This rank's block: rows by data-parallel rank, sequence by SP rank."""
    rows = tensor.tensor_split(state.dp_size)[state.dp_rank]
    return rows.tensor_split(state.sp_size, dim=1)[state.sp_rank].to(state.device)


def _sharded_step(model: TinyLM, state: ParallelState) -> dict[str, object]:
    ids, labels = (_local(t, state) for t in global_batch(0))
    local_tokens = (labels != IGNORE_INDEX).sum()
    counts = [torch.zeros_like(local_tokens) for _ in range(state.world_size)]
    dist.all_gather(counts, local_tokens)
    assert len({int(c) for c in counts}) > 1, "the batch should give ranks unequal token counts"
    tokens = sum(counts)
    loss_sum = torch.zeros((), device=state.device)
    micro = list(zip(ids.tensor_split(2), labels.tensor_split(2), strict=True))
    for i, (micro_ids, micro_labels) in enumerate(micro):
        model.set_requires_gradient_sync(i == len(micro) - 1)
        local = token_loss_sum(model, micro_ids, micro_labels)
        (local * state.fsdp_size / tokens).backward()  # FSDP averages over fsdp_size ranks
        loss_sum += local.detach()
    dist.all_reduce(loss_sum)
    grads = {n: full_tensor(p.grad) for n, p in model.named_parameters()}
    norm = clip_grad_norm_(model.parameters(), MAX_NORM)
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    params = {n: full_tensor(p) for n, p in model.named_parameters()}
    return {"loss": loss_sum / tokens, "grads": grads, "norm": norm, "params": params}


def _fsdp_matches_single_process(cases: list[dict]) -> None:
    for case in cases:
        torch.manual_seed(0)
        reference = TinyLM()
        model = copy.deepcopy(reference)
        expected = _reference(reference)
        state = init_parallel(**case["degrees"])
        model.to(state.device)
        # fp32 on every device: the comparison is exact arithmetic, not bf16 noise.
        policy = mixed_precision(torch.device("cpu"))
        offload = case.get("cpu_offload", False) and state.device.type == "cuda"
        apply_fsdp(model, model.layers, state.fsdp_mesh, policy, case["reshard"], offload)
        actual = _sharded_step(model, state)
        where = f"{case['degrees']}"
        assert_close(actual["loss"], expected["loss"], f"{where} loss")
        assert_close(actual["norm"], expected["norm"], f"{where} grad norm")
        for kind in ("grads", "params"):
            for name, value in expected[kind].items():
                assert_close(actual[kind][name], value, f"{where} {kind} {name}")


@pytest.mark.parametrize(
    ("world", "cases"),
    [
        (
            2,
            [
                {"degrees": {"dp_shard": 2}, "reshard": True},
                {"degrees": {"sp": 2}, "reshard": False, "cpu_offload": True},
            ],
        ),
        (
            4,
            [
                {"degrees": {"dp_shard": 4}, "reshard": True},
                {"degrees": {"dp_replicate": 2, "sp": 2}, "reshard": True},
            ],
        ),
    ],
    ids=["world2", "world4"],
)
def test_fsdp_matches_single_process(world, cases):
    run_distributed(_fsdp_matches_single_process, world, cases)
