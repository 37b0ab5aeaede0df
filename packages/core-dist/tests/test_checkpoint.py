"""DCP checkpoints: resume at another world size (2 -> 4, 4 -> 1) gives the parameters,
optimizer state, scheduler, data state and next losses of an uninterrupted run; a save
killed midway leaves the previous checkpoint loadable."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _tiny_model import IGNORE_INDEX, TinyLM, global_batch, token_loss_sum
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict

from loom.dist.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from loom.dist.export import full_tensor
from loom.dist.fsdp import apply_fsdp, mixed_precision
from loom.dist.mesh import destroy_parallel, init_parallel
from loom.dist.testing import assert_close, run_distributed


def _build(seed: int):
    """A sharded model, its optimizer and scheduler on this world."""
    state = init_parallel()
    torch.manual_seed(seed)
    model = TinyLM().to(state.device)
    apply_fsdp(model, model.layers, state.fsdp_mesh, mixed_precision(torch.device("cpu")))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    return state, model, optimizer, scheduler


def _train(state, model, optimizer, scheduler, steps: range) -> list[float]:
    """One optimizer step per global batch; returns the global mean token losses."""
    losses = []
    for step in steps:
        ids, labels = (
            t.tensor_split(state.dp_size)[state.dp_rank].to(state.device)
            for t in global_batch(step)
        )
        tokens = (global_batch(step)[1] != IGNORE_INDEX).sum().item()
        local = token_loss_sum(model, ids, labels)
        (local * state.fsdp_size / tokens).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        dist.all_reduce(loss := local.detach().clone())
        losses.append(loss.item() / tokens)
    return losses


def _snapshot(model, optimizer) -> dict[str, torch.Tensor]:
    """Full (gathered) parameters and AdamW moments, by parameter name."""
    snap = {}
    for name, param in model.named_parameters():
        snap[name] = full_tensor(param).cpu()
        for moment in ("exp_avg", "exp_avg_sq"):
            snap[f"{name}.{moment}"] = full_tensor(optimizer.state[param][moment]).cpu()
    return snap


def _train_save_continue(root: str) -> dict:
    state, model, optimizer, scheduler = _build(seed=0)
    _train(state, model, optimizer, scheduler, range(1, 4))
    save_checkpoint(Path(root), 3, model, optimizer, scheduler, {"next_step": 4, "epoch": 0})
    snapshot = _snapshot(model, optimizer)
    draws = (torch.rand(3), random.random())  # the RNG streams just after the save
    losses = _train(state, model, optimizer, scheduler, range(4, 7))
    return {"snapshot": snapshot, "losses": losses, "lr": scheduler.get_last_lr(), "draws": draws}


def _resume(root: str, uninterrupted: list[dict]) -> None:
    state, model, optimizer, scheduler = _build(seed=123)  # other weights: loading must count
    path = latest_checkpoint(Path(root))
    assert path == Path(root) / "step_3"
    resumed = load_checkpoint(path, model, optimizer, scheduler)
    assert (resumed.step, resumed.data_state) == (3, {"next_step": 4, "epoch": 0})
    assert resumed.saved_world_size == len(uninterrupted)
    reference = uninterrupted[0]
    for name, value in _snapshot(model, optimizer).items():
        assert_close(value, reference["snapshot"][name], f"resumed {name}")
    rank = dist.get_rank()
    assert resumed.rng_restored == (rank < len(uninterrupted))
    if resumed.rng_restored:
        draws = uninterrupted[rank]["draws"]
        assert torch.equal(torch.rand(3), draws[0]) and random.random() == draws[1]
    losses = _train(state, model, optimizer, scheduler, range(4, 7))
    assert_close(torch.tensor(losses), torch.tensor(reference["losses"]), "next 3 losses")
    assert scheduler.get_last_lr() == pytest.approx(reference["lr"])


@pytest.mark.parametrize(("save_world", "load_world"), [(2, 4), (4, 1)], ids=["2to4", "4to1"])
def test_resume_at_another_world_size(tmp_path, save_world, load_world):
    uninterrupted = run_distributed(_train_save_continue, save_world, str(tmp_path))
    run_distributed(_resume, load_world, str(tmp_path), uninterrupted)


def _save_first(root: str) -> dict:
    state, model, optimizer, scheduler = _build(seed=0)
    _train(state, model, optimizer, scheduler, range(1, 2))
    save_checkpoint(Path(root), 1, model, optimizer, scheduler, {"next_step": 2})
    return _snapshot(model, optimizer)


def _die_while_saving(root: str) -> None:
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    state, model, optimizer, scheduler = _build(seed=0)
    load_checkpoint(Path(root) / "step_1", model, optimizer, scheduler)
    _train(state, model, optimizer, scheduler, range(2, 3))
    write_data = FileSystemWriter.write_data

    def write_then_die(self, plan, planner):
        write_data(self, plan, planner).wait()  # this rank's shards are on disk ...
        os._exit(17)  # ... and the process dies before the checkpoint is complete

    FileSystemWriter.write_data = write_then_die
    save_checkpoint(Path(root), 2, model, optimizer, scheduler, {"next_step": 3})


def _recover(root: str, snapshot: dict) -> None:
    _, model, optimizer, scheduler = _build(seed=123)
    path = latest_checkpoint(Path(root))
    assert path == Path(root) / "step_1"
    assert load_checkpoint(path, model, optimizer, scheduler).data_state == {"next_step": 2}
    for name, value in _snapshot(model, optimizer).items():
        assert_close(value, snapshot[name], f"step_1 after the crash: {name}")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(Path(root) / ".step_2.partial", model, optimizer, scheduler)
    dist.barrier()
    save_checkpoint(Path(root), 2, model, optimizer, scheduler)  # over the crashed attempt
    save_checkpoint(Path(root), 1, model, optimizer, scheduler)  # replaces step_1
    assert latest_checkpoint(Path(root)) == Path(root) / "step_2"


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    snapshot = run_distributed(_save_first, 2, str(tmp_path))[0]
    run_distributed(_die_while_saving, 2, str(tmp_path), expect_exit=17)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".step_2.partial", "step_1"], names
    assert any((tmp_path / ".step_2.partial").iterdir()), "the killed save wrote no data"
    run_distributed(_recover, 2, str(tmp_path), snapshot)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1", "step_2"]


class NotPlainData:
    """Anything but plain data must not be unpickled from a checkpoint."""


def test_non_tensor_values_are_read_weights_only(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)  # one process, no launcher
    _, model, optimizer, scheduler = _build(seed=0)
    try:
        path = save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
        assert load_checkpoint(path, model, optimizer, scheduler).step == 1
        forged = tmp_path / "step_2"
        model_state, optim_state = get_state_dict(model, optimizer)
        train = {"step": NotPlainData(), "world_size": 1, "scheduler": "{}", "data": "{}"}
        dcp.save({"model": model_state, "optim": optim_state, "train": train}, checkpoint_id=forged)
        # DCP reports every rank's failure in one CheckpointException (a BaseException).
        with pytest.raises(CheckpointException, match="Weights only load failed"):
            load_checkpoint(forged, model, optimizer, scheduler)
    finally:
        destroy_parallel()
