"""Pieces of the training step against plain computations."""

import math

import numpy as np
import pytest
import torch

from loom.dist.export import full_tensor
from loom.dist.fsdp import apply_fsdp, mixed_precision
from loom.dist.mesh import destroy_parallel, init_parallel
from loom.trainer import memory
from loom.trainer.data.packing import build_row
from loom.trainer.data.samples import shift_labels
from loom.trainer.errors import LoomError
from loom.trainer.model import build_model, decoder_layers
from loom.trainer.parallelize import compile_decoder_layers, enable_activation_checkpointing
from loom.trainer.train import (
    StepResult,
    check_learns,
    forward_backward,
    rank_share,
    reduce_and_update,
    should_skip,
)


@pytest.fixture
def parallel():
    state = init_parallel()
    yield state
    destroy_parallel()


def rows(n=4, length=24):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        a, b = (
            torch.randint(2, 300, (k,), generator=gen).numpy() for k in (length // 2, length // 3)
        )
        samples = [(x, np.asarray(shift_labels(list(x), [True] * len(x)))) for x in (a, b)]
        out.append(build_row(samples, length, 1))
    return out


def grads(model):
    return {n: full_tensor(p.grad).clone() for n, p in model.named_parameters()}


def sharded_step(parallel, tiny_model_dir, prepare=lambda model: None):
    """Loss and gradients of one accumulated step (2 micro-batches) of the tiny model under
    FSDP, after ``prepare(model)``."""
    torch.manual_seed(0)
    model = build_model(tiny_model_dir)
    prepare(model)
    apply_fsdp(model, decoder_layers(model), parallel.fsdp_mesh, mixed_precision(parallel.device))
    batch = rows()
    tokens = sum(r.loss_tokens for r in batch)
    loss = float(forward_backward(model, rank_share(batch, 0, 1, 2), tokens, parallel))
    return loss, grads(model)


def sharded_and_plain(parallel, tiny_model_dir):
    """The tiny model under FSDP, and a plain copy with the same weights."""
    torch.manual_seed(0)
    model = build_model(tiny_model_dir)
    reference = build_model(tiny_model_dir)
    reference.load_state_dict(model.state_dict())
    apply_fsdp(model, decoder_layers(model), parallel.fsdp_mesh, mixed_precision(parallel.device))
    return model, reference


def plain_loss(model, batch, tokens):
    """Every token's cross-entropy over the whole batch / ``tokens``, row by row."""
    total = 0.0
    for r in batch:
        logits = model(
            input_ids=torch.from_numpy(r.input_ids)[None],
            position_ids=torch.from_numpy(r.position_ids)[None],
        ).logits[0]
        total += torch.nn.functional.cross_entropy(
            logits, torch.from_numpy(r.labels), ignore_index=-100, reduction="sum"
        )
    return total / tokens


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_changes_nothing(parallel, every, tiny_model_dir):
    loss, reference = sharded_step(parallel, tiny_model_dir)
    ac_loss, got = sharded_step(
        parallel, tiny_model_dir, lambda model: enable_activation_checkpointing(model, every)
    )
    assert loss == pytest.approx(ac_loss, rel=1e-6)
    for name, g in reference.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_loss_is_the_global_token_mean(parallel, tiny_model_dir):
    model, reference = sharded_and_plain(parallel, tiny_model_dir)
    batch = rows(3)
    tokens = sum(r.loss_tokens for r in batch)
    loss = float(forward_backward(model, rank_share(batch, 0, 1, 1), tokens, parallel))
    # Plain reference: every row separately with HF's own loss would weight rows equally;
    # Loom weights tokens equally across the whole global batch.
    expected = plain_loss(reference, batch, tokens)
    expected.backward()
    assert loss == pytest.approx(expected.item(), rel=1e-6)
    got = grads(model)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_accumulated_steps_see_each_update(parallel, tiny_model_dir):
    # At fsdp size 1 the gathered parameters stay between micro-batches; after the last
    # one they must be dropped, or the next step would run on the weights before the update.
    model, reference = sharded_and_plain(parallel, tiny_model_dir)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, reference)]
    batch = rows(4)
    tokens = sum(r.loss_tokens for r in batch)
    for step in range(3):
        loss = float(forward_backward(model, rank_share(batch, 0, 1, 1), tokens, parallel))
        expected = plain_loss(reference, batch, tokens)
        expected.backward()
        assert loss == pytest.approx(expected.item(), rel=1e-5), step
        for opt in optimizers:
            opt.step()
            opt.zero_grad()


def test_compiled_layers_change_nothing(parallel, tiny_model_dir):
    loss, reference = sharded_step(parallel, tiny_model_dir)
    compiled_loss, got = sharded_step(parallel, tiny_model_dir, compile_decoder_layers)
    assert loss == pytest.approx(compiled_loss, rel=1e-5)
    for name, g in reference.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_offloaded_inputs_change_nothing(parallel, tiny_model_dir, monkeypatch):
    moved = []

    def counted(tensor):
        packed = to_host(tensor)
        moved.append(packed is not tensor)
        return packed

    to_host = memory._to_host
    monkeypatch.setattr(memory, "_to_host", counted)
    monkeypatch.setattr(memory, "PIECE_BYTES", 256)  # several pieces per tensor
    monkeypatch.setattr(memory, "MIN_BYTES", 0)  # the tiny model's inputs too
    loss, reference = sharded_step(parallel, tiny_model_dir, enable_activation_checkpointing)
    got_loss, got = sharded_step(
        parallel,
        tiny_model_dir,
        lambda m: (enable_activation_checkpointing(m), memory.offload_checkpointed_inputs(m)),
    )
    layers = len(decoder_layers(build_model(tiny_model_dir)))
    assert sum(moved) == 2 * layers  # each layer's input, in each of 2 micro-batches
    marker = torch.empty(0, requires_grad=True)  # checkpoint saves one of these too
    assert to_host(marker) is marker
    assert loss == got_loss
    for name, g in reference.items():
        torch.testing.assert_close(got[name], g, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_tiled_mlps_change_nothing(parallel, tiny_model_dir, checkpointed):
    def prepare(model, tile=None):
        if checkpointed:
            enable_activation_checkpointing(model)
        if tile:
            memory.tile_mlps(model, tile)

    loss, reference = sharded_step(parallel, tiny_model_dir, prepare)
    # 24-token rows: tiles of 7 tokens leave a short last one.
    got_loss, got = sharded_step(parallel, tiny_model_dir, lambda m: prepare(m, 7))
    assert loss == pytest.approx(got_loss, rel=1e-6)
    for name, g in reference.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_config_turns_the_memory_options_on(parallel, tiny_model_dir):
    from loom.trainer.config import load_config
    from loom.trainer.parallelize import build_parallel_model

    on = ["--memory.activation_checkpointing", "true", "--memory.activation_offload", "true"]
    config = load_config(tiny_model_dir.parent / "train.yaml", [*on, "--memory.mlp_tile", "8"])
    layers = decoder_layers(build_parallel_model(config, parallel))
    assert all(x._gradient_checkpointing_func is memory._offloaded_checkpoint for x in layers)
    assert all(x.mlp.forward.func is memory._tiled_forward for x in layers)


def test_memory_options_reject_what_they_cannot_do(tiny_model_dir):
    from transformers import AutoConfig

    from loom.models import build_model as build_port

    with pytest.raises(LoomError, match="activation_offload needs"):
        memory.offload_checkpointed_inputs(build_model(tiny_model_dir))
    config = AutoConfig.for_model(
        "qwen3_moe", hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        num_experts=4, num_experts_per_tok=2, vocab_size=64,
    )  # fmt: skip
    with pytest.raises(LoomError, match=r"decoder layer 0 .* no dense mlp"):
        memory.tile_mlps(build_port(config, dtype=torch.float32), 8)


def test_nan_policy():
    fine = StepResult(1.0, 2.0, 10)
    assert not should_skip(fine, "stop", 1)
    for bad in (StepResult(math.nan, 1.0, 10), StepResult(1.0, math.inf, 10)):
        assert should_skip(bad, "skip", 3)
        with pytest.raises(LoomError, match=r"step 3: .* not finite"):
            should_skip(bad, "stop", 3)


def _linear_step(fused: bool, loss_scale: float, stop: float = 0.0):
    """One reduce_and_update of a linear layer whose loss is ``loss_scale`` times a sum."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, **({"fused": True} if fused else {}))
    for _ in range(2):  # the second step has optimizer state to keep or change
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss = model(torch.ones(2, 4)).sum() * loss_scale
        loss.backward()
        result, stepped = reduce_and_update(
            model, opt, loss.detach(), torch.tensor(stop), max_norm=1.0
        )
        if not stepped and math.isfinite(result.loss):
            opt.step()
        opt.zero_grad()
    return model, opt, before, result, stepped


def test_the_update_is_skipped_on_the_device(parallel):
    # The fused AdamW (the GPU's optimizer, also on CPU) skips a non-finite update itself,
    # so the step reads the device once, after queueing the update.
    model, opt, before, result, stepped = _linear_step(fused=True, loss_scale=math.inf)
    assert stepped and not math.isfinite(result.loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=0, msg=name)
        assert opt.state[p]["step"].item() == 0, name  # the skipped steps left no trace
    fused, _, _, result, stepped = _linear_step(fused=True, loss_scale=1.0, stop=1.0)
    assert stepped and result.stop and result.grad_norm > 1.0
    plain, _, _, _, stepped = _linear_step(fused=False, loss_scale=1.0)
    assert not stepped
    for (name, got), want in zip(fused.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=name)


def test_a_first_step_without_gradient_stops():
    check_learns(StepResult(5.9, 1e-9, 10), 1)
    check_learns(StepResult(5.9, 0.0, 10), 2)  # later: a step may be flat (frozen, clipped)
    with pytest.raises(LoomError, match=r"step 1: the gradient norm is exactly 0 .* nothing"):
        check_learns(StepResult(5.9, 0.0, 10), 1)


def test_rank_share_splits_contiguously():
    batch = list(range(8))
    assert rank_share(batch, 1, 2, 3) == [[4, 5, 6], [7]]
    assert rank_share(batch, 0, 4, 2) == [[0, 1]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_step_reads_the_gpu_once(tiny_model_dir):
    """Everything after backward (loss and stop flag reduced, clip, fused update, skip
    check) makes one host-device synchronization, counted by CUDA's sync debug mode."""
    import warnings

    parallel = init_parallel()
    try:
        model = build_model(tiny_model_dir).to(parallel.device)
        apply_fsdp(
            model, decoder_layers(model), parallel.fsdp_mesh, mixed_precision(parallel.device)
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        batch = rows()
        tokens = sum(r.loss_tokens for r in batch)
        counts = []
        for _ in range(2):  # the first step also builds the clip's flattened mesh
            local = forward_backward(model, rank_share(batch, 0, 1, 2), tokens, parallel)
            flag = torch.zeros((), device=parallel.device)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    result, stepped = reduce_and_update(model, opt, local, flag, 1.0)
                    opt.zero_grad(set_to_none=True)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            counts.append(sum("synchroniz" in str(w.message) for w in caught))
            assert stepped and math.isfinite(result.loss) and result.grad_norm > 0
        assert counts[-1] == 1, counts
    finally:
        destroy_parallel()
