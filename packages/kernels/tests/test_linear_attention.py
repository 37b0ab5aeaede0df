"""Gated DeltaNet's ops: the references against independent forms (the delta rule as a
product of per-token transitions in fp64, the convolution as torch's grouped Conv1d),
packed rows equal to each sample alone, grouped heads equal to repeated ones, bad inputs
named; on CUDA with fla-core, its kernels against the reference, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loom.kernels.linear_attention import (
    causal_conv1d,
    causal_conv1d_reference,
    fla_available,
    gated_delta_rule,
    gated_delta_rule_reference,
)


def inputs(length=12, heads=2, groups=2, dk=8, dv=6, batch=1, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hv = heads * groups
    q = torch.randn(batch, length, heads, dk, generator=gen)
    k = torch.randn(batch, length, heads, dk, generator=gen)
    v = torch.randn(batch, length, hv, dv, generator=gen)
    g = -F.softplus(torch.randn(batch, length, hv, generator=gen))  # log decay < 0
    beta = torch.rand(batch, length, hv, generator=gen)
    return [t.to(dtype) for t in (q, k, v, g, beta)]


def transitions(q, k, v, g, beta):
    """o_t = S_t^T q_t with S_t = sum_s (prod_{r=s+1..t} A_r) beta_s k_s v_s^T and
    A_r = exp(g_r) (I - beta_r k_r k_r^T): the recurrence unrolled, in fp64."""
    groups = v.shape[2] // q.shape[2]
    q = F.normalize(q.double(), dim=-1).repeat_interleave(groups, 2) * q.shape[-1] ** -0.5
    k = F.normalize(k.double(), dim=-1).repeat_interleave(groups, 2)
    v, g, beta = v.double(), g.double(), beta.double()
    batch, length, heads, dk = k.shape
    eye = torch.eye(dk, dtype=torch.float64)
    out = torch.zeros(batch, length, heads, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for t in range(length):
                state = torch.zeros(dk, v.shape[-1], dtype=torch.float64)
                for s in range(t + 1):
                    term = beta[b, s, h] * torch.outer(k[b, s, h], v[b, s, h])
                    for r in range(s + 1, t + 1):
                        kr = k[b, r, h]
                        term = g[b, r, h].exp() * (eye - beta[b, r, h] * torch.outer(kr, kr)) @ term
                    state += term  # s's own decay acts on the state before its write
                out[b, t, h] = state.T @ q[b, t, h]
    return out


def test_delta_rule_is_the_product_of_its_transitions():
    q, k, v, g, beta = inputs(length=7, batch=2)
    got = gated_delta_rule_reference(q, k, v, g, beta)
    torch.testing.assert_close(got.double(), transitions(q, k, v, g, beta), rtol=1e-5, atol=1e-5)


def test_conv_is_torch_grouped_conv1d():
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(2, 11, 5, generator=gen), torch.randn(5, 4, generator=gen)
    conv = torch.nn.Conv1d(5, 5, 4, groups=5, padding=3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(weight[:, None, :])
    want = F.silu(conv(x.transpose(1, 2))[..., :11]).transpose(1, 2)
    torch.testing.assert_close(causal_conv1d_reference(x, weight), want)
    torch.testing.assert_close(
        causal_conv1d_reference(x, weight, activation=None),
        conv(x.transpose(1, 2))[..., :11].transpose(1, 2),
    )


def test_packed_samples_start_fresh():
    q, k, v, g, beta = inputs(length=15)
    cu = torch.tensor([0, 4, 5, 15])
    packed = gated_delta_rule_reference(q, k, v, g, beta, cu_seqlens=cu)
    alone = [
        gated_delta_rule_reference(*(t[:, a:b] for t in (q, k, v, g, beta)))
        for a, b in ((0, 4), (4, 5), (5, 15))
    ]
    torch.testing.assert_close(packed, torch.cat(alone, dim=1))
    x, weight = torch.randn(1, 15, 6), torch.randn(6, 4)
    conv = [causal_conv1d_reference(x[:, a:b], weight) for a, b in ((0, 4), (4, 5), (5, 15))]
    torch.testing.assert_close(
        causal_conv1d_reference(x, weight, cu_seqlens=cu), torch.cat(conv, 1)
    )
    assert not torch.allclose(packed, gated_delta_rule_reference(q, k, v, g, beta))


def test_grouped_heads_are_repeated_heads():
    q, k, v, g, beta = inputs(groups=3)
    repeated = [t.repeat_interleave(3, dim=2) for t in (q, k)]
    torch.testing.assert_close(
        gated_delta_rule_reference(q, k, v, g, beta),
        gated_delta_rule_reference(*repeated, v, g, beta),
    )


def test_bad_inputs_are_named():
    q, k, v, g, beta = inputs(batch=2)
    with pytest.raises(ValueError, match="packed in one row; got 2"):
        gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 12]))
    q, k, v, g, beta = inputs()
    with pytest.raises(ValueError, match=r"cu_seqlens \[0, 5\] must rise from 0 to the row's 12"):
        gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="must match and divide v's heads"):
        gated_delta_rule(q, k, v[:, :, :3], g, beta)
    with pytest.raises(ValueError, match=r"weight must be \[channels, width\]"):
        causal_conv1d(torch.randn(1, 4, 6), torch.randn(5, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and fla_available()), reason="CUDA + fla-core")
@pytest.mark.parametrize("packed", [False, True])
def test_fla_kernels_match_the_reference(packed):
    """bf16 kernels against the fp32 reference: errors no larger than the reference's
    own bf16 run's error against fp64 truth, times a small factor."""
    torch.manual_seed(0)
    q, k, v, g, beta = (t.cuda() for t in inputs(length=300, heads=4, groups=2, dk=64, dv=64))
    cu = torch.tensor([0, 100, 101, 300], device="cuda") if packed else None
    args = [t.bfloat16().requires_grad_() for t in (q, k, v)] + [g, beta.bfloat16()]
    truth_args = [t.double().requires_grad_() for t in (q, k, v)] + [g.double(), beta.double()]
    ref_args = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)] + [g, beta.bfloat16()]
    out = gated_delta_rule(*args, cu_seqlens=cu, backend="fla")
    truth = gated_delta_rule_reference(*truth_args, cu_seqlens=cu)
    ref = gated_delta_rule_reference(*ref_args, cu_seqlens=cu)
    grad = torch.randn_like(truth)
    for result in (out, truth, ref):
        result.backward(grad.to(result.dtype))
    bound = (ref.double() - truth).abs().max()
    assert (out.double() - truth).abs().max() <= 4 * bound + 1e-3
    for got, want, base in zip(args[:3], truth_args[:3], ref_args[:3], strict=True):
        err = (got.grad.double() - want.grad).abs().max()
        assert err <= 4 * (base.grad.double() - want.grad).abs().max() + 1e-3
    x = torch.randn(1, 300, 128, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(128, 4, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(
        causal_conv1d(x, weight, cu_seqlens=cu, backend="fla"),
        causal_conv1d_reference(x.float(), weight.float(), cu_seqlens=cu).bfloat16(),
        rtol=2e-2, atol=2e-2,
    )  # fmt: skip
