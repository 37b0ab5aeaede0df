import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from loom.models.layers import LoomRMSNorm
from loom.models.loss import causal_lm_loss


def test_rms_norm_matches_upstream_module():
    torch.manual_seed(0)
    upstream, loom = Qwen3RMSNorm(32, eps=1e-5), LoomRMSNorm(32, eps=1e-5)
    upstream.weight.data.normal_()
    loom.load_state_dict(upstream.state_dict())
    x = torch.randn(3, 7, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    torch.testing.assert_close(loom(x), upstream(x2), rtol=1e-6, atol=1e-6)
    loom(x).square().sum().backward()
    upstream(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loom.weight.grad, upstream.weight.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_items", [None, 7.5])
def test_causal_lm_loss_matches_hf_convention(num_items):
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 16)
    weight = torch.randn(50, 16)
    labels = torch.randint(0, 50, (2, 6))
    labels[0, 2] = -100
    logits = hidden @ weight.T
    # HF's ForCausalLMLoss: shift, then sum / num_items or mean over counted tokens.
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
    total = F.cross_entropy(logits.flatten(0, 1), shifted.flatten(), reduction="sum")
    want = total / (num_items if num_items else (shifted != -100).sum())
    got = causal_lm_loss(hidden, weight, labels=labels, num_items_in_batch=num_items)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    again = causal_lm_loss(hidden, weight, shift_labels=shifted, num_items_in_batch=num_items)
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="labels or shift_labels"):
        causal_lm_loss(hidden, weight)


def test_centred_and_gated_norms_match_upstream_modules():
    """Qwen3-Next's (1 + w) RMSNorm and Gated DeltaNet's gated norm (fp32: exact up to
    the order of the fp32 operations)."""
    from transformers.models.qwen3_next.modeling_qwen3_next import (
        Qwen3NextRMSNorm,
        Qwen3NextRMSNormGated,
    )

    from loom.models.layers import LoomCentredRMSNorm, LoomRMSNormGated

    torch.manual_seed(0)
    for upstream, loom, gated in (
        (Qwen3NextRMSNorm(32, eps=1e-6), LoomCentredRMSNorm(32, eps=1e-6), False),
        (Qwen3NextRMSNormGated(32, eps=1e-6), LoomRMSNormGated(32, eps=1e-6), True),
    ):
        assert torch.equal(loom.weight, upstream.weight)  # the same init: zeros, ones
        upstream.weight.data.normal_()
        loom.load_state_dict(upstream.state_dict())
        x = torch.randn(3, 7, 32, requires_grad=True)
        gate = torch.randn(3, 7, 32, requires_grad=True)
        x2, gate2 = (t.detach().clone().requires_grad_() for t in (x, gate))
        got = loom(x, gate) if gated else loom(x)
        want = upstream(x2, gate2) if gated else upstream(x2)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        got.square().sum().backward()
        want.square().sum().backward()
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loom.weight.grad, upstream.weight.grad, rtol=1e-5, atol=1e-5)
        if gated:
            torch.testing.assert_close(gate.grad, gate2.grad, rtol=1e-5, atol=1e-6)
