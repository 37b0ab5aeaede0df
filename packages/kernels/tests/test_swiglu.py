import pytest
import torch
import torch.utils.checkpoint

from loom.kernels import dispatch
from loom.kernels.swiglu import swiglu, swiglu_reference

# One token; odd widths; more columns than one kernel block (1024).
SHAPES = [(1, 8), (5, 33), (2, 3, 70), (3, 1030)]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("fused_input", [False, True], ids=["separate", "chunked_gate_up"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(
    triton_spy, triton_device, assert_no_worse, shape, dtype, fused_input
):
    calls = triton_spy("loom.kernels._swiglu_triton", "swiglu_forward", "swiglu_backward")
    torch.manual_seed(0)
    if fused_input:  # strided views of one [..., 2I] projection, as MoE experts produce
        gate_up = torch.randn(*shape[:-1], 2 * shape[-1], device=triton_device).to(dtype)
        inputs = (gate_up.requires_grad_(True),)

        def on_leaves(fn):
            return lambda gate_up: fn(*gate_up.chunk(2, dim=-1))
    else:
        gate = torch.randn(shape, device=triton_device).to(dtype).requires_grad_(True)
        up = torch.randn(shape, device=triton_device).to(dtype).requires_grad_(True)
        inputs = (gate, up)

        def on_leaves(fn):
            return fn

    assert dispatch.choose_backend(*inputs) == "triton"
    assert_no_worse(on_leaves(swiglu), on_leaves(swiglu_reference), inputs)
    assert [name for name, _ in calls] == ["swiglu_forward", "swiglu_backward"]


def test_reference_is_silu_times_up():
    gate, up = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(swiglu_reference(gate, up), gate / (1 + torch.exp(-gate)) * up)


def test_mismatched_inputs_are_named():
    with pytest.raises(ValueError, match="gate and up"):
        swiglu(torch.randn(2, 4), torch.randn(2, 5))


# How gate and up reach swiglu -> (the leaves' shapes for an output shape, gate and up made
# from the leaves, whether backward may overwrite (gate, up)).
LAYOUTS = {
    "projections": (
        lambda shape: (shape, shape),
        lambda g, u: (g * 1.0, u * 1.0),
        (True, True),
    ),
    "chunked_projection": (
        lambda shape: ((*shape[:-1], 2 * shape[-1]),),
        lambda gate_up: (gate_up * 1.0).chunk(2, dim=-1),
        (True, True),
    ),
    "same_tensor": (lambda shape: (shape,), lambda x: (x * 1.0,) * 2, (False, False)),
    "stride0_rows": (  # gate's rows all one row (a broadcast bias, say)
        lambda shape: ((1, shape[-1]), (2, *shape)),
        lambda g, u: ((g * 1.0).expand(u.shape), u * 1.0),
        (False, True),
    ),
    "leaves": (lambda shape: (shape, shape), lambda g, u: (g, u), (False, False)),
    "views_of_leaf": (
        lambda shape: ((*shape[:-1], 2 * shape[-1]),),
        lambda gate_up: gate_up.chunk(2, dim=-1),
        (False, False),
    ),
}


def _leaves(layout: str, shape, dtype, device) -> list[torch.Tensor]:
    torch.manual_seed(0)
    leaf_shapes, _, _ = LAYOUTS[layout]
    return [
        torch.randn(s, device=device).to(dtype).requires_grad_(True) for s in leaf_shapes(shape)
    ]


def _on_leaves(fn, layout, checkpointed=False):
    _, make, _ = LAYOUTS[layout]

    def forward(*leaves):
        return fn(*make(*leaves))

    if checkpointed:  # as loom.trainer's activation checkpointing runs it
        return lambda *leaves: torch.utils.checkpoint.checkpoint(
            forward, *leaves, use_reentrant=False
        )
    return forward


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8), (2, 3, 70), (3, 1030)], ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_overwriting_backward_matches_reference(
    triton_spy, triton_device, assert_no_worse, layout, shape, dtype, checkpointed
):
    """Whether or not backward overwrites gate and up, the leaves' gradients are the
    reference's and the leaves keep their values."""
    calls = triton_spy("loom.kernels._swiglu_triton", "swiglu_backward")
    leaves = _leaves(layout, shape, dtype, triton_device)
    values = [leaf.detach().clone() for leaf in leaves]
    assert_no_worse(
        _on_leaves(swiglu, layout, checkpointed), _on_leaves(swiglu_reference, layout), leaves
    )
    assert len(calls) == 1
    for leaf, value in zip(leaves, values, strict=True):
        torch.testing.assert_close(leaf.detach(), value, atol=0, rtol=0)


@pytest.mark.parametrize("shape", [(1, 8), (2, 3, 70), (3, 1030)], ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_backward_returns_gradients_in_the_inputs_memory(triton_spy, triton_device, layout, shape):
    calls = triton_spy("loom.kernels._swiglu_triton", "swiglu_backward")
    _, make, overwritten = LAYOUTS[layout]
    gate, up = make(*_leaves(layout, shape, torch.bfloat16, triton_device))
    out = swiglu(gate, up)
    dout = torch.randn(out.shape, device=triton_device).to(out.dtype)
    version_before = gate._version, up._version
    dgate, dup = torch.autograd.grad(out, (gate, up), dout)
    assert len(calls) == 1
    for grad, t, expected in zip((dgate, dup), (gate, up), overwritten, strict=True):
        shares = grad.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
        assert shares == expected
        if expected:
            assert grad.data_ptr() == t.data_ptr() and grad.stride() == t.stride()
    if any(overwritten):  # the version counter is shared by views of one base
        assert (gate._version, up._version) != version_before


def test_later_backward_of_an_op_that_saved_gate_raises(triton_spy, triton_device):
    """gate * gate saves gate; made before swiglu, its backward runs after swiglu's, which
    has overwritten gate: autograd must refuse rather than use the gradient as gate."""
    triton_spy("loom.kernels._swiglu_triton", "swiglu_backward")
    gate_leaf, up_leaf = _leaves("projections", (4, 40), torch.float32, triton_device)
    gate, up = gate_leaf * 1.0, up_leaf * 1.0
    square = gate * gate
    out = swiglu(gate, up)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.sum() + square.sum()).backward()


def test_second_backward_through_the_graph_raises(triton_spy, triton_device):
    triton_spy("loom.kernels._swiglu_triton", "swiglu_backward")
    gate_leaf, up_leaf = _leaves("projections", (4, 40), torch.float32, triton_device)
    out = swiglu(gate_leaf * 1.0, up_leaf * 1.0)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
