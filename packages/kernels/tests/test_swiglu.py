import pytest
import torch

from loom.kernels import dispatch
from loom.kernels.swiglu import swiglu, swiglu_reference

# One token; odd widths; more columns than one kernel block (1024).
SHAPES = [(1, 8), (5, 33), (2, 3, 70), (3, 1030)]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("fused_input", [False, True], ids=["separate", "chunked_gate_up"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(
    triton_spy, triton_device, assert_close, shape, dtype, fused_input
):
    calls = triton_spy("loom.kernels._swiglu_triton", "swiglu_forward", "swiglu_backward")
    torch.manual_seed(0)
    if fused_input:  # strided views of one [..., 2I] projection, as MoE experts produce
        gate_up = torch.randn(*shape[:-1], 2 * shape[-1], device=triton_device).to(dtype)
        gate_up.requires_grad_(True)
        gate, up = gate_up.chunk(2, dim=-1)
        inputs = (gate_up,)
    else:
        gate = torch.randn(shape, device=triton_device).to(dtype).requires_grad_(True)
        up = torch.randn(shape, device=triton_device).to(dtype).requires_grad_(True)
        inputs = (gate, up)
    assert dispatch.choose_backend(gate, up) == "triton"

    def run(fn):
        out = fn(gate, up)
        torch.manual_seed(1)
        dout = torch.randn(out.shape, dtype=out.dtype, device=out.device)
        return (out, *torch.autograd.grad(out, inputs, dout))

    got, want = run(swiglu), run(swiglu_reference)
    assert [name for name, _ in calls] == ["swiglu_forward", "swiglu_backward"]
    for g, r in zip(got, want, strict=True):
        assert g.shape == r.shape and g.dtype == r.dtype
        assert_close(g, r, dtype)


def test_reference_is_silu_times_up():
    gate, up = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(swiglu_reference(gate, up), gate / (1 + torch.exp(-gate)) * up)


def test_mismatched_inputs_are_named():
    with pytest.raises(ValueError, match="gate and up"):
        swiglu(torch.randn(2, 4), torch.randn(2, 5))
