"""Fixtures that run an op through its Triton kernel, on CPU too.

Triton decides at decoration time, when a module is imported, whether a ``@triton.jit``
function is compiled or interpreted, and that includes triton.language's own helpers
(``tl.sum``, ``tl.sigmoid``). So on a machine without CUDA this conftest imports triton
and the kernel modules once with ``TRITON_INTERPRET=1``, then restores the environment:
other packages' tests in the same pytest process keep the reference path, and the
``triton_device`` fixture switches the dispatch to Triton per test (monkeypatch).
``triton_spy`` records the kernel launchers that really ran.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import pkgutil
import sys

import pytest
import torch


def _import_triton_interpreted() -> str | None:
    """Import triton and loom.kernels (whose imports may reach triton through
    torch._dynamo) in interpreter mode; the reason it cannot be, or None."""
    if "triton" in sys.modules:
        from triton.language import standard
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(standard.sum, InterpretedFunction):
            return (
                "triton was imported (compiled mode) before packages/kernels/tests/conftest.py "
                "could enable the interpreter; run packages/kernels/tests in its own process"
            )
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        kernels = importlib.import_module("loom.kernels")
        for module in pkgutil.iter_modules(kernels.__path__, "loom.kernels."):
            if module.name.endswith("_triton"):
                importlib.import_module(module.name)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return None


INTERPRETER_BLOCKER = (
    None
    if torch.cuda.is_available() or importlib.util.find_spec("triton") is None
    else _import_triton_interpreted()
)

from loom.kernels import dispatch  # noqa: E402  (after the interpreted import above)

TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale=1.0):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=atol * scale, rtol=rtol * scale
    )


@pytest.fixture
def assert_close():
    """assert_close(actual, expected, dtype, scale=1.0): the per-dtype tolerance, widened by
    ``scale`` for long reductions. (A fixture because pytest's importlib mode keeps test
    modules from importing conftest.)"""
    return _assert_close


# How much further from the fp64 truth than the torch reference in the same dtype a
# kernel may be, per output and per input gradient (max elementwise error), by the
# reference's dtype. Both round the same exact values to that dtype, but the kernel sums
# in another order (tiles, token chunks, vocabulary blocks) than torch's CPU GEMMs and
# reductions, so its worst element can be several of the reference's errors off:
# measured up to 5.5x in bf16 (SwiGLU's gradients) and 15x in fp32, where the reference
# is off by 1e-7 (d_hidden of the chunked 16k-vocabulary cross-entropy, 16k-long sums).
# A wrong index, a missed mask or a dropped term is off by the values themselves,
# orders of magnitude above either bound.
NO_WORSE_FACTOR = {torch.float32: 16.0, torch.bfloat16: 8.0}
# ... plus one unit in the last place at the truth's largest magnitude: the reference can
# be exact where the kernel, rounding an fp32 sum once more, is one ulp off (a one-token
# d_weight of the cross-entropy, whose big entries are -h exactly in bf16).
FLOOR_ULPS = 1.0


@contextlib.contextmanager
def _fp64_upcasts():
    """The references upcast with ``.float()``; in here that leaves fp64 tensors fp64, so
    a reference run on fp64 copies computes in fp64 throughout."""
    upcast = torch.Tensor.float
    torch.Tensor.float = lambda t, *a, **k: t if t.dtype == torch.float64 else upcast(t, *a, **k)
    try:
        yield
    finally:
        torch.Tensor.float = upcast


def _forward_backward(fn, inputs, cotangents=None):
    """fn(*inputs) and the gradients of its outputs (one or a tuple) for the inputs that
    require grad, under ``cotangents`` (made, in each output's dtype, when None)."""
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    if cotangents is None:
        torch.manual_seed(1)  # a scalar (a loss) gets 1: its gradients are the loss's
        cotangents = [
            torch.ones_like(o)
            if o.dim() == 0
            else torch.randn(o.shape, device=o.device).to(o.dtype)
            for o in outs
        ]
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    cotangents = [c.to(o.dtype) for c, o in zip(cotangents, outs, strict=True)]
    grads = torch.autograd.grad(outs, leaves, cotangents)
    return (*outs, *grads), cotangents


def _fp64_copy(t):
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return t
    return t.detach().double().requires_grad_(t.requires_grad)


def _max_err(t: torch.Tensor, truth: torch.Tensor) -> float:
    return (t.double() - truth).abs().max().item() if t.numel() else 0.0


def _assert_no_worse(kernel, reference, inputs, *, truth=None, names=None, factor=None):
    """Runs ``kernel(*inputs)`` and ``reference(*inputs)`` (inputs in the test dtype) and
    ``truth`` (default: the reference) on fp64 copies, each forward and backward under the
    same cotangents, and asserts that every output and input gradient of the kernel is
    at most ``factor`` (default: ``NO_WORSE_FACTOR``) times further from the fp64 result
    than the reference's, plus the floor. Returns the kernel's outputs and gradients."""
    got, cotangents = _forward_backward(kernel, inputs)
    want, _ = _forward_backward(reference, inputs, cotangents)
    with _fp64_upcasts():
        exact, _ = _forward_backward(
            truth or reference, [_fp64_copy(t) for t in inputs], cotangents
        )
    names = names or [f"output/grad {i}" for i in range(len(got))]
    for g, r, x, name in zip(got, want, exact, names, strict=True):
        assert g.shape == r.shape == x.shape, f"{name}: {g.shape} vs {r.shape} vs {x.shape}"
        assert g.dtype == r.dtype, f"{name}: {g.dtype} vs the reference's {r.dtype}"
        err, ref_err = _max_err(g, x), _max_err(r, x)
        allowed = factor or NO_WORSE_FACTOR[r.dtype]
        scale = x.abs().max().item() if x.numel() else 0.0
        floor = FLOOR_ULPS * torch.finfo(r.dtype).eps * scale
        assert err <= allowed * ref_err + floor, (
            f"{name}: max error {err:.3g} against fp64, the {r.dtype} reference's {ref_err:.3g} "
            f"(allowed {allowed} x that + {floor:.3g})"
        )
    return got


@pytest.fixture
def assert_no_worse():
    """assert_no_worse(kernel, reference, inputs, *, truth=None, names=None): the kernel no
    further from the fp64 truth than ``NO_WORSE_FACTOR`` times the reference in the same
    dtype, per output and input gradient; returns the kernel's outputs then gradients."""
    return _assert_no_worse


@pytest.fixture
def triton_device(monkeypatch) -> str:
    """The device Triton kernels run on here: CUDA when present, else CPU + interpreter."""
    if not dispatch.triton_available():
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        return "cuda"
    if INTERPRETER_BLOCKER is not None:
        pytest.fail(INTERPRETER_BLOCKER)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"


@pytest.fixture
def triton_spy(monkeypatch, triton_device):
    """spy("loom.kernels._x_triton", "launcher", ...) -> list of (launcher name, args) called."""

    def spy(module_name: str, *names: str) -> list[tuple[str, tuple]]:
        module = importlib.import_module(module_name)
        calls: list[tuple[str, tuple]] = []
        for name in names:
            launcher = getattr(module, name)

            def record(*args, _launcher=launcher, _name=name, **kwargs):
                calls.append((_name, args))
                return _launcher(*args, **kwargs)

            monkeypatch.setattr(module, name, record)
        return calls

    return spy
