import functools

import pytest
import torch

from loom.kernels import dispatch
from loom.kernels.moe import (
    fused_moe_forward,
    fused_moe_reference,
    grouped_mm,
    grouped_mm_reference,
    permute_tokens,
    route_tokens,
    unpermute_tokens,
)

DTYPES = [torch.float32, torch.bfloat16]
HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
GROUPED_MM_TRITON = "loom.kernels._grouped_mm_triton"
GROUPED_MM_LAUNCHERS = ("grouped_matmul", "grouped_weight_grad")


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


MOE_GRADS = ("out", "d_hidden", "d_routing_weights", "d_gate_up_proj", "d_down_proj")


def _with_selected(fn, selected):
    """fn over (hidden, routing_weights, gate_up_proj, down_proj), the routing fixed."""
    return lambda x, weights, gate_up, down: fn(x, weights, selected, gate_up, down)


def _fp64_moe(x, weights, selected, gate_up, down):
    """The fp64 truth: HF's loop accumulates in an fp32 buffer whatever its inputs, so the
    same sums through Loom's torch path (loop GEMMs, torch SwiGLU), which keeps fp64."""
    return fused_moe_forward(x, weights, selected, gate_up, down, backend="torch")


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
def test_grouped_mm_matches_per_row_product(assert_no_worse, dtype, backend):
    torch.manual_seed(0)
    group_ends = torch.tensor([3, 3, 9, 12], dtype=torch.int32)  # expert 1 gets no rows
    x = torch.randn(12, 16).to(dtype).requires_grad_(True)
    w = torch.randn(4, 8, 16).to(dtype).requires_grad_(True)
    expert_of_row = torch.repeat_interleave(
        torch.arange(4), torch.diff(group_ends, prepend=torch.tensor([0]))
    )
    try:
        grouped_mm(x, w, group_ends, backend=backend)
    except (NotImplementedError, RuntimeError) as err:  # torch 2.8 has no CPU kernel
        pytest.skip(f"torch._grouped_mm cannot run here: {err}")
    assert_no_worse(
        lambda x, w: grouped_mm(x, w, group_ends, backend=backend),
        lambda x, w: torch.einsum("mi,moi->mo", x, w[expert_of_row]),
        (x, w),
        names=("out", "d_x", "d_weight"),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("tokens", "hidden", "inter", "experts", "top_k"),
    [(1, 16, 8, 4, 2), (13, 24, 12, 5, 3), (32, 32, 16, 8, 2)],
    ids=["one_token", "odd", "eight_experts"],
)
def test_fused_moe_matches_hf_loop(
    triton_device, assert_no_worse, dtype, tokens, hidden, inter, experts, top_k
):
    """Triton SwiGLU (interpreter on CPU) + grouped GEMM against HF's per-expert loop."""
    inputs, selected = _moe_inputs(tokens, hidden, inter, experts, top_k, dtype, triton_device)
    assert_no_worse(
        _with_selected(fused_moe_forward, selected),
        _with_selected(fused_moe_reference, selected),
        inputs,
        truth=_with_selected(_fp64_moe, selected),
        names=MOE_GRADS,
    )


def test_fused_moe_is_deterministic(triton_device):
    inputs, selected = _moe_inputs(16, 16, 8, 4, 2, torch.bfloat16, triton_device)
    runs = []
    for _ in range(2):
        out = fused_moe_forward(inputs[0], inputs[1], selected, inputs[2], inputs[3])
        runs.append(torch.autograd.grad(out.float().square().sum(), inputs))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("group_ends", "in_features", "out_features"),
    [
        ([5, 5, 23, 40], 37, 45),  # expert 1 empty; K, N not multiples of any block
        ([70, 70, 150, 150], 20, 70),  # experts of several row tiles; the last one empty
        ([0, 29, 29], 16, 8),  # all rows in one expert
        ([0, 1], 19, 3),  # a single row
    ],
    ids=["odd", "several_tiles", "one_expert", "one_row"],
)
def test_triton_grouped_mm_matches_loop(
    triton_device, triton_spy, assert_no_worse, dtype, group_ends, in_features, out_features
):
    """Forward, d x and d weight of the Triton grouped GEMM against the per-expert loop."""
    calls = triton_spy(GROUPED_MM_TRITON, *GROUPED_MM_LAUNCHERS)
    torch.manual_seed(0)
    ends = torch.tensor(group_ends, dtype=torch.int32, device=triton_device)
    rows, experts = group_ends[-1], len(group_ends)
    x = torch.randn(rows, in_features, device=triton_device).to(dtype).requires_grad_(True)
    w = (torch.randn(experts, out_features, in_features, device=triton_device) / 4).to(dtype)
    got = assert_no_worse(
        lambda x, w: grouped_mm(x, w, ends, backend="triton"),
        lambda x, w: grouped_mm_reference(x, w, ends),
        (x, w.requires_grad_(True)),
        names=("out", "d_x", "d_weight"),
    )
    assert [name for name, _ in calls] == [
        "grouped_matmul",
        "grouped_matmul",
        "grouped_weight_grad",
    ]
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    assert torch.all(got[2][counts == 0] == 0)  # an expert without rows: zero gradient


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("tokens", "hidden", "inter", "experts", "top_k"),
    [(1, 16, 8, 4, 2), (13, 24, 12, 5, 3)],
    ids=["one_token", "odd"],
)
def test_fused_moe_through_triton_grouped_mm(
    triton_device, triton_spy, assert_no_worse, dtype, tokens, hidden, inter, experts, top_k
):
    """backend="triton": both expert GEMMs (and SwiGLU) through Triton, against HF's loop."""
    calls = triton_spy(GROUPED_MM_TRITON, *GROUPED_MM_LAUNCHERS)
    inputs, selected = _moe_inputs(tokens, hidden, inter, experts, top_k, dtype, triton_device)
    assert_no_worse(
        _with_selected(functools.partial(fused_moe_forward, backend="triton"), selected),
        _with_selected(fused_moe_reference, selected),
        inputs,
        truth=_with_selected(_fp64_moe, selected),
        names=MOE_GRADS,
    )
    # Two GEMMs forward; backward: d input and d weight of each.
    assert sorted(name for name, _ in calls) == ["grouped_matmul"] * 4 + ["grouped_weight_grad"] * 2


def test_grouped_mm_auto_choice(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    x, w = torch.randn(4, 16), torch.randn(2, 8, 16)
    assert dispatch.choose_grouped_mm_backend(x, w) == "torch"  # not CUDA bf16, no Triton
    if HAS_GROUPED_MM:
        bad = torch.randn(4, 15)
        with pytest.raises(RuntimeError, match="multiples"):
            dispatch.choose_grouped_mm_backend(bad, torch.randn(2, 8, 15), backend="grouped_mm")
    if dispatch.triton_available():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            dispatch.choose_grouped_mm_backend(x, w, backend="triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert dispatch.choose_grouped_mm_backend(x, w) == "triton"  # Triton runs, on fp32
        with pytest.raises(RuntimeError, match="one dtype"):
            dispatch.choose_grouped_mm_backend(x, w.bfloat16(), backend="triton")
        assert dispatch.choose_grouped_mm_backend(x, w.bfloat16()) == "torch"


def test_grouped_mm_env_var(monkeypatch):
    """$LOOM_KERNELS_BACKEND: "torch" forces the loop; "triton" leaves grouped GEMM on auto."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w = torch.randn(4, 16), torch.randn(2, 8, 16)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    assert dispatch.choose_grouped_mm_backend(x, w) == "torch"  # auto: no raise on plain CPU
    if dispatch.triton_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert dispatch.choose_grouped_mm_backend(x, w) == "triton"
        monkeypatch.setenv(dispatch.BACKEND_ENV, "torch")
        assert dispatch.choose_grouped_mm_backend(x, w) == "torch"


def test_bad_expert_weights_are_named():
    x = torch.randn(3, 16)
    weights, selected = _routing(3, 4, 2, "cpu")
    with pytest.raises(ValueError, match="down_proj"):
        fused_moe_forward(x, weights, selected, torch.randn(4, 16, 16), torch.randn(4, 16, 7))
    with pytest.raises(ValueError, match="group_ends"):
        grouped_mm(x, torch.randn(4, 8, 16), torch.tensor([1, 3]))
