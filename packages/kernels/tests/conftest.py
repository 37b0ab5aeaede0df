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

import importlib
import os
import pkgutil
import sys

import pytest
import torch

import loom.kernels
from loom.kernels import dispatch


def _import_triton_interpreted() -> str | None:
    """Import triton in interpreter mode; the reason it cannot be, or None."""
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
        for module in pkgutil.iter_modules(loom.kernels.__path__, "loom.kernels."):
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
    if torch.cuda.is_available() or not dispatch.triton_available()
    else _import_triton_interpreted()
)

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
