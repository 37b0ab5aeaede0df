import pytest
import torch

from loom.kernels import dispatch
from loom.kernels.rms_norm import rms_norm, rms_norm_reference

# One token; non-power-of-two hidden sizes; more rows than one tile holds (64 rows of 40
# at the 4096-element tile), so the backward's programs walk several tiles each.
SHAPES = [(1, 16), (7, 48), (2, 5, 33), (300, 40)]
DTYPES = [torch.float32, torch.bfloat16]


def _inputs(shape, dtype, device, offset):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    w = (torch.randn(shape[-1], device=device) * 0.1 + (0.0 if offset else 1.0)).to(dtype)
    w.requires_grad_(True)
    return x, w


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["plain", "centred"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(triton_spy, triton_device, assert_no_worse, shape, dtype, offset):
    calls = triton_spy("loom.kernels._rms_norm_triton", "rms_norm_forward", "rms_norm_backward")
    x, w = _inputs(shape, dtype, triton_device, offset)
    assert dispatch.choose_backend(x, w) == "triton"
    assert_no_worse(
        lambda x, w: rms_norm(x, w, 1e-6, offset=offset),
        lambda x, w: rms_norm_reference(x, w, 1e-6, offset=offset),
        (x, w),
        names=("y", "d_x", "d_weight"),
    )
    assert [name for name, _ in calls] == ["rms_norm_forward", "rms_norm_backward"]


def test_reference_matches_formula():
    # Independent check of the reference itself: fp64, written out longhand.
    x = torch.randn(3, 8, dtype=torch.float64)
    w = torch.randn(8, dtype=torch.float64)
    want = x / torch.sqrt((x * x).sum(-1, keepdim=True) / 8 + 1e-6) * (1.0 + w)
    torch.testing.assert_close(rms_norm_reference(x, w, 1e-6, offset=1.0), want)


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w = torch.randn(2, 8), torch.ones(8)
    assert dispatch.choose_backend(x, w) == "torch"
    with pytest.raises(RuntimeError, match="Triton needs CUDA"):
        rms_norm(x, w, backend="triton")
    torch.testing.assert_close(rms_norm(x, w), rms_norm_reference(x, w))


def test_env_forces_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(dispatch.BACKEND_ENV, "torch")
    assert dispatch.choose_backend(torch.randn(2)) == "torch"
    monkeypatch.setenv(dispatch.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match="LOOM_KERNELS_BACKEND"):
        dispatch.choose_backend(torch.randn(2))


def test_shape_mismatch_names_the_tensor():
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(torch.randn(2, 8), torch.ones(7))


@pytest.mark.parametrize("layout", ["row_slice", "transposed"])
def test_strided_input(triton_device, assert_no_worse, layout):
    """Rows with a stride (a view into wider rows) and a layout that must be copied."""
    torch.manual_seed(0)
    if layout == "row_slice":
        x = torch.randn(9, 80, device=triton_device)[:, :40]
    else:
        x = torch.randn(3, 40, 5, device=triton_device).transpose(1, 2)
    x.requires_grad_(True)
    w = torch.randn(40, device=triton_device, requires_grad=True)
    assert_no_worse(
        lambda x, w: rms_norm(x, w, 1e-6), lambda x, w: rms_norm_reference(x, w, 1e-6), (x, w)
    )


def test_inside_torch_compile_auto_picks_the_reference(triton_device):
    # Inductor fuses the reference with its neighbours; eager picks Triton.
    def marked(x):
        return x + (1.0 if dispatch.choose_backend(x) == "torch" else 2.0)

    x = torch.zeros(3, device=triton_device)
    assert marked(x).tolist() == [2.0] * 3
    compiled = torch.compile(marked, backend="eager", fullgraph=True)
    assert compiled(x).tolist() == [1.0] * 3
    x, w = torch.randn(4, 64, device=triton_device), torch.randn(64, device=triton_device)
    compiled = torch.compile(lambda x, w: rms_norm(x, w, 1e-6), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w), rms_norm_reference(x, w, 1e-6))
