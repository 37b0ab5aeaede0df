"""Deliberately broken ports, to show the checks of the equivalence suites catch them.

- gradients of two same-shape parameters swapped after backward (one layer's gate_proj
  and up_proj; two experts of a stacked tensor): the loss and the total grad norm (what
  the suites used to compare) are unchanged, ``assert_grads_match`` must raise;
- a patched op removed (the generated module's fused RMSNorm put back to upstream's
  class, the fused rotary replaced by the same math in plain torch, one MoE layer's
  experts computed by the eager loop): the numbers still equal upstream's, the
  patched-ops check must raise.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from _grads import assert_grads_match
from _ports import TOY
from test_models_patch import ATOL, RTOL, loss_and_backward, packed_batch
from test_models_patch import upstream as dense_upstream
from test_moe import CASES, in_loom_layout, loom_state_dict, packed_rows
from test_moe import upstream as moe_upstream
from test_patched_ops import (
    assert_kernels_called,
    count_kernel_calls,
    expected_calls,
    forward_backward,
    port,
)

from loom.models import build_model


def total_grad_norm(model) -> torch.Tensor:
    return torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None))


def dense_pair(name: str = "llama"):
    """(port, upstream) after one forward + backward on the same weights and packed rows."""
    reference = dense_upstream(name)
    model = build_model(TOY / f"{name}_toy", attn_implementation="loom_varlen")
    model.load_state_dict(reference.state_dict())
    batch = packed_batch(reference.config.vocab_size)[:3]
    torch.testing.assert_close(
        loss_and_backward(model, *batch), loss_and_backward(reference, *batch), rtol=RTOL, atol=ATOL
    )
    return model, reference


def test_swapped_dense_grads_are_caught():
    model, reference = dense_pair()
    assert_grads_match(model, reference, rtol=RTOL, atol=ATOL)  # the sound port passes
    mlp = model.model.layers[1].mlp
    mlp.gate_proj.weight.grad, mlp.up_proj.weight.grad = mlp.up_proj.weight.grad, mlp.gate_proj.weight.grad  # fmt: skip
    # blind: the old check (loss and total grad norm) still passes
    torch.testing.assert_close(total_grad_norm(model), total_grad_norm(reference), rtol=RTOL, atol=ATOL)  # fmt: skip
    with pytest.raises(AssertionError, match=r"model\.layers\.1\.mlp\.gate_proj\.weight: gradient differs"):  # fmt: skip
        assert_grads_match(model, reference, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", list(CASES))
def test_swapped_expert_grads_are_caught(name):
    case = CASES[name]
    reference = moe_upstream(case, "eager")
    model = build_model(case.path, attn_implementation="loom_varlen", moe_implementation="fused")
    model.load_state_dict(loom_state_dict(case, reference.state_dict()))
    ids, labels, positions = packed_rows()
    model(input_ids=ids, position_ids=positions, shift_labels=labels).loss.backward()
    out = reference(input_ids=ids, position_ids=positions)
    ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten())
    (ce + reference.config.router_aux_loss_coef * out.aux_loss).backward()
    rename = in_loom_layout(case)
    assert_grads_match(model, reference, rtol=RTOL, atol=ATOL, rename=rename)
    layer = case.sparse_layers[-1]
    grad = model.model.layers[layer].mlp.experts.down_proj.grad
    hit = [e for e in range(case.experts) if grad[e].abs().sum() > 0]
    assert len(hit) >= 2, "the test needs two experts that got tokens"
    grad[[hit[0], hit[1]]] = grad[[hit[1], hit[0]]]  # experts' gradients swapped
    torch.testing.assert_close(total_grad_norm(model), total_grad_norm(reference), rtol=RTOL, atol=ATOL)  # fmt: skip
    with pytest.raises(AssertionError, match=rf"layers\.{layer}\.mlp\.experts\.down_proj: gradient differs"):  # fmt: skip
        assert_grads_match(model, reference, rtol=RTOL, atol=ATOL, rename=rename)


def generated_module(name: str):
    return sys.modules[type(port(name)).__module__]


def test_upstream_rmsnorm_put_back_is_caught(monkeypatch):
    generated = generated_module("qwen3")
    upstream_module = importlib.import_module("transformers.models.qwen3.modeling_qwen3")
    monkeypatch.setattr(generated, "Qwen3RMSNorm", upstream_module.Qwen3RMSNorm)
    model = port("qwen3")
    seen = count_kernel_calls(monkeypatch, model)
    forward_backward(model)
    with pytest.raises(AssertionError, match=r"rms_norm in layer 0: 0 calls"):
        assert_kernels_called(seen, expected_calls(model))


def _rotary_in_plain_torch(q, k, cos, sin, unsqueeze_dim=1):
    """apply_rotary's math (rotate_half), without loom.kernels."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def test_rotary_done_without_the_kernel_is_caught(monkeypatch):
    generated = generated_module("llama")
    monkeypatch.setattr(generated, "apply_rotary", _rotary_in_plain_torch)
    model, reference = dense_pair("llama")
    assert_grads_match(model, reference, rtol=RTOL, atol=ATOL)  # the numbers can't tell
    with pytest.raises(AssertionError, match=r"apply_rotary is '_rotary_in_plain_torch', not loom"):  # fmt: skip
        count_kernel_calls(monkeypatch, port("llama"))


@pytest.mark.parametrize("name", list(CASES))
def test_eager_experts_in_one_layer_are_caught(name, monkeypatch):
    model = port(name)
    layer = CASES[name].sparse_layers[0]
    model.model.layers[layer].mlp.experts.moe_implementation = "eager"  # the fused path lost
    seen = count_kernel_calls(monkeypatch, model)
    forward_backward(model)
    with pytest.raises(AssertionError, match=rf"fused_moe_forward in layer {layer}: 0 calls"):
        assert_kernels_called(seen, expected_calls(model))
