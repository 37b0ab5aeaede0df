import pytest
import torch

from loom.kernels import dispatch
from loom.kernels.moe import (
    fused_moe_forward,
    fused_moe_reference,
    grouped_mm,
    permute_tokens,
    route_tokens,
    unpermute_tokens,
)

DTYPES = [torch.float32, torch.bfloat16]
HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _routing(tokens, experts, top_k, device, skip_expert=None):
    """Distinct experts per token (as top-k gives), optionally leaving one expert empty."""
    torch.manual_seed(0)
    scores = torch.rand(tokens, experts, device=device)
    if skip_expert is not None:
        scores[:, skip_expert] = -1.0
    weights, selected = scores.topk(top_k, dim=-1)
    return weights.softmax(-1), selected


def _moe_inputs(tokens, hidden, inter, experts, top_k, dtype, device):
    weights, selected = _routing(tokens, experts, top_k, device, skip_expert=experts - 1)
    torch.manual_seed(1)
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    gate_up = (torch.randn(experts, 2 * inter, hidden, device=device) / hidden**0.5).to(dtype)
    down = (torch.randn(experts, hidden, inter, device=device) / inter**0.5).to(dtype)
    return [t.requires_grad_(True) for t in (x, weights, gate_up, down)], selected


def test_route_permute_unpermute_roundtrip():
    weights, selected = _routing(7, 4, 2, "cpu", skip_expert=3)
    routing = route_tokens(selected, 4)
    counts = torch.bincount(selected.reshape(-1), minlength=4)
    assert routing.group_ends.tolist() == counts.cumsum(0).tolist()
    x = torch.randn(7, 5)
    permuted = permute_tokens(x, routing)
    # Each expert's group holds exactly the tokens routed to it.
    expert_of_row = torch.repeat_interleave(torch.arange(4), counts)
    token_of_row = routing.source_slot // 2
    assert torch.equal(
        selected[token_of_row].eq(expert_of_row[:, None]).any(-1), torch.ones(14, dtype=torch.bool)
    )
    torch.testing.assert_close(permuted, x[token_of_row])
    torch.testing.assert_close(unpermute_tokens(permuted, routing, weights), x)  # weights sum to 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "backend",
    [
        "torch",
        pytest.param(
            "grouped_mm",
            marks=pytest.mark.skipif(not HAS_GROUPED_MM, reason="no torch._grouped_mm"),
        ),
    ],
)
def test_grouped_mm_matches_per_row_product(assert_close, dtype, backend):
    torch.manual_seed(0)
    group_ends = torch.tensor([3, 3, 9, 12], dtype=torch.int32)  # expert 1 gets no rows
    x = torch.randn(12, 16).to(dtype).requires_grad_(True)
    w = torch.randn(4, 8, 16).to(dtype).requires_grad_(True)
    expert_of_row = torch.repeat_interleave(
        torch.arange(4), torch.diff(group_ends, prepend=torch.tensor([0]))
    )
    try:
        out = grouped_mm(x, w, group_ends, backend=backend)
    except (NotImplementedError, RuntimeError) as err:  # torch 2.8 has no CPU kernel
        pytest.skip(f"torch._grouped_mm cannot run here: {err}")
    want = torch.einsum("mi,moi->mo", x.float(), w.float()[expert_of_row])
    dout = torch.randn(out.shape)
    got_grads = torch.autograd.grad(out, (x, w), dout.to(dtype))
    want_grads = torch.autograd.grad(want, (x, w), dout)
    assert_close(out, want, dtype)
    for g, r in zip(got_grads, want_grads, strict=True):
        assert_close(g, r, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("tokens", "hidden", "inter", "experts", "top_k"),
    [(1, 16, 8, 4, 2), (13, 24, 12, 5, 3), (32, 32, 16, 8, 2)],
    ids=["one_token", "odd", "eight_experts"],
)
def test_fused_moe_matches_hf_loop(
    triton_device, assert_close, dtype, tokens, hidden, inter, experts, top_k
):
    """Triton SwiGLU (interpreter on CPU) + grouped GEMM against HF's per-expert loop."""
    inputs, selected = _moe_inputs(tokens, hidden, inter, experts, top_k, dtype, triton_device)

    def run(fn):
        out = fn(inputs[0], inputs[1], selected, inputs[2], inputs[3])
        torch.manual_seed(2)
        dout = torch.randn(out.shape, device=out.device).to(dtype)
        return (out, *torch.autograd.grad(out, inputs, dout))

    got, want = run(fused_moe_forward), run(fused_moe_reference)
    names = ("out", "d_hidden", "d_routing_weights", "d_gate_up_proj", "d_down_proj")
    for g, r, name in zip(got, want, names, strict=True):
        assert g.dtype == r.dtype, name
        assert_close(g, r, dtype, scale=2.0)


def test_fused_moe_is_deterministic(triton_device):
    inputs, selected = _moe_inputs(16, 16, 8, 4, 2, torch.bfloat16, triton_device)
    runs = []
    for _ in range(2):
        out = fused_moe_forward(inputs[0], inputs[1], selected, inputs[2], inputs[3])
        runs.append(torch.autograd.grad(out.float().square().sum(), inputs))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_grouped_mm_auto_choice():
    x, w = torch.randn(4, 16), torch.randn(2, 8, 16)
    assert dispatch.choose_grouped_mm_backend(x, w) == "torch"  # not CUDA bf16
    if HAS_GROUPED_MM:
        bad = torch.randn(4, 15)
        with pytest.raises(RuntimeError, match="multiples"):
            dispatch.choose_grouped_mm_backend(bad, torch.randn(2, 8, 15), backend="grouped_mm")


def test_bad_expert_weights_are_named():
    x = torch.randn(3, 16)
    weights, selected = _routing(3, 4, 2, "cpu")
    with pytest.raises(ValueError, match="down_proj"):
        fused_moe_forward(x, weights, selected, torch.randn(4, 16, 16), torch.randn(4, 16, 7))
    with pytest.raises(ValueError, match="group_ends"):
        grouped_mm(x, torch.randn(4, 8, 16), torch.tensor([1, 3]))
