import pytest
import torch

from loom.kernels import dispatch
from loom.kernels.rms_norm import rms_norm, rms_norm_reference

SHAPES = [(1, 16), (7, 48), (2, 5, 33)]  # one token; non-power-of-two hidden sizes
DTYPES = [torch.float32, torch.bfloat16]


def _inputs(shape, dtype, device, offset):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    w = (torch.randn(shape[-1], device=device) * 0.1 + (0.0 if offset else 1.0)).to(dtype)
    w.requires_grad_(True)
    return x, w


def _fwd_bwd(fn, x, w, offset):
    y = fn(x, w, 1e-6, offset=offset)
    dy = torch.randn(y.shape, dtype=y.dtype, device=y.device)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    return y, dx, dw


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["plain", "centred"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(triton_spy, triton_device, assert_close, shape, dtype, offset):
    calls = triton_spy("loom.kernels._rms_norm_triton", "rms_norm_forward", "rms_norm_backward")
    x, w = _inputs(shape, dtype, triton_device, offset)
    assert dispatch.choose_backend(x, w) == "triton"
    torch.manual_seed(1)
    got = _fwd_bwd(rms_norm, x, w, offset)
    torch.manual_seed(1)
    want = _fwd_bwd(rms_norm_reference, x, w, offset)
    assert [name for name, _ in calls] == ["rms_norm_forward", "rms_norm_backward"]
    for g, r in zip(got, want, strict=True):
        assert g.dtype == r.dtype
        assert_close(g, r, dtype)


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
