"""Loom's Gated DeltaNet forward on upstream's ``Qwen3NextGatedDeltaNet`` (both majors)
and ``Qwen3_5GatedDeltaNet`` (transformers 5), fp32 on CPU: the output and every parameter's gradient equal upstream's on whole rows;
packed rows equal upstream run on each sample alone; sequence parallelism at 2 and 4
ranks (gloo) equals one process."""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.distributed as dist
import transformers
from transformers import AutoConfig

from loom.dist.testing import run_distributed
from loom.dist.ulysses import slice_input
from loom.models.attention import set_sequence_parallel
from loom.models.gated_deltanet import gated_deltanet_forward

MAJOR = int(transformers.__version__.split(".")[0])
TOL = {"rtol": 1e-5, "atol": 1e-6}  # Loom against Loom (packing, SP): the same sums


MODELS = [
    "qwen3_next",
    pytest.param("qwen3_5", marks=pytest.mark.skipif(
        MAJOR < 5, reason="Qwen3.5 exists from transformers 5")),
]  # fmt: skip


def layers(model: str = "qwen3_next"):
    """Upstream's layer, and a copy whose forward is Loom's."""
    import importlib

    config = AutoConfig.for_model(
        "qwen3_5_text" if model == "qwen3_5" else model, hidden_size=64,
        linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_conv_kernel_dim=4,
    )  # fmt: skip
    module = importlib.import_module(f"transformers.models.{model}.modeling_{model}")
    prefix = "Qwen3_5" if model == "qwen3_5" else "Qwen3Next"
    torch.manual_seed(0)
    upstream = getattr(module, f"{prefix}GatedDeltaNet")(config, layer_idx=0)
    with torch.no_grad():  # away from the init's ones and zeros: every term matters
        for param in upstream.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    loom = copy.deepcopy(upstream)
    loom.forward = types.MethodType(gated_deltanet_forward, loom)
    return upstream, loom


def run(layer, hidden, **kwargs):
    hidden = hidden.clone().requires_grad_()
    out = layer(hidden, **kwargs)
    out.backward(torch.ones_like(out) / out.numel() + out.detach() * 0.01)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad(set_to_none=True)
    return out.detach(), hidden.grad, grads


@pytest.mark.parametrize("model", MODELS)
def test_whole_rows_equal_upstream(model):
    """Upstream runs the recurrence in chunks of 64, Loom's reference token by token: in
    fp32 they round differently, so the bound is each one's distance from the same layer
    in fp64 (Loom's, its recurrence unrolled against the transitions in loom.kernels'
    tests): Loom's error at most upstream's, and the two within 1e-4."""
    upstream, loom = layers(model)
    hidden = torch.randn(2, 37, 64, generator=torch.Generator().manual_seed(1))
    truth, truth_dx, truth_grads = run(copy.deepcopy(loom).double(), hidden.double())
    want, want_dx, want_grads = run(upstream, hidden)
    got, got_dx, got_grads = run(loom, hidden)
    assert got_grads.keys() == want_grads.keys()
    pairs = [("output", got, want, truth), ("input grad", got_dx, want_dx, truth_dx)]
    pairs += [(n, got_grads[n], want_grads[n], truth_grads[n]) for n in want_grads]
    for name, ours, theirs, exact in pairs:
        ours_err = (ours.double() - exact).abs().max()
        theirs_err = (theirs.double() - exact).abs().max()
        assert ours_err <= 2 * theirs_err + 1e-7, (name, ours_err, theirs_err)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("model", MODELS)
def test_packed_samples_equal_upstream_on_each_alone(model):
    upstream, loom = layers(model)
    hidden = torch.randn(1, 30, 64, generator=torch.Generator().manual_seed(2))
    bounds = [(0, 9), (9, 10), (10, 30)]
    positions = torch.cat([torch.arange(b - a) for a, b in bounds])[None]
    got = loom(hidden, position_ids=positions)
    want = torch.cat([loom(hidden[:, a:b]) for a, b in bounds], dim=1)
    torch.testing.assert_close(got, want, **TOL)
    cu = torch.tensor([0, 9, 10, 30], dtype=torch.int32)
    torch.testing.assert_close(loom(hidden, cu_seq_lens_q=cu), want, **TOL)
    alone = torch.cat([upstream(hidden[:, a:b]) for a, b in bounds], dim=1)
    torch.testing.assert_close(got, alone, rtol=1e-4, atol=1e-4)  # the chunked order
    assert not torch.allclose(upstream(hidden), alone, rtol=1e-3, atol=1e-3)  # packing matters


def _sp_run(sp: int, model: str):
    _, loom = layers(model)
    hidden = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(3))
    lengths = [[5, 19], [24]]
    ends = torch.tensor([n for row in lengths for n in row]).cumsum(0)
    cu = torch.cat([torch.zeros(1), ends]).to(torch.int32)
    weights = torch.arange(hidden.numel()).reshape(hidden.shape).sin()  # of the loss
    group = dist.group.WORLD if sp > 1 else None
    set_sequence_parallel(loom, group)
    if group is not None:
        hidden, weights = (slice_input(t, 1, group) for t in (hidden, weights))
    hidden.requires_grad_()
    out = loom(hidden, cu_seq_lens_q=cu)
    (out * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in loom.named_parameters()}
    if group is not None:
        for grad in grads.values():
            dist.all_reduce(grad)
        outs = [torch.empty_like(out) for _ in range(sp)]
        dist.all_gather(outs, out.detach().contiguous())
        out = torch.cat(outs, dim=1)
    return out.detach(), grads


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("sp", [2, 4])
def test_sequence_parallel_equals_one_process(sp, model):
    want, want_grads = run_distributed(_sp_run, 1, 1, model)[0]
    for got, grads in run_distributed(_sp_run, sp, sp, model):
        torch.testing.assert_close(got, want, **TOL)
        for name, grad in want_grads.items():
            # the ranks' partial sums add up in another order than one process's sum
            torch.testing.assert_close(
                grads[name], grad, rtol=5e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
            )


def test_padding_masks_and_caches_are_refused():
    _, loom = layers()
    hidden = torch.randn(1, 6, 64)
    with pytest.raises(ValueError, match="packed rows without padding"):
        loom(hidden, attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]))
    with pytest.raises(ValueError, match="no cache"):
        loom(hidden, cache_params=object())
