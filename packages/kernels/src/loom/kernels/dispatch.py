"""Which implementation of an op runs: the one rule every op in loom.kernels follows.

Triton runs when triton is importable and the tensors are on CUDA, or when
``TRITON_INTERPRET=1`` is set (Triton's interpreter, for CPU tests). Everything else
runs the plain-torch reference, as it does inside ``torch.compile`` (Inductor fuses the
reference with its neighbours). ``LOOM_KERNELS_BACKEND=torch`` (or ``backend="torch"``
on any op) forces the reference; ``"triton"`` forces the kernel and fails loudly
where it cannot run. Attention and grouped GEMM pick among library kernels (and, for
grouped GEMM, a Triton kernel) by the same env var and argument; their rules live here
too so there is one place to look. For them the env var's ``"triton"`` means auto: it
forces the Triton-only ops without giving up a faster library kernel; only the
``backend`` argument names one of their kernels.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch

BACKEND_ENV = "LOOM_KERNELS_BACKEND"

Backend = Literal["triton", "torch"]
AttentionBackend = Literal["flash_attn", "varlen", "sdpa", "torch"]
GroupedMMBackend = Literal["grouped_mm", "triton", "torch"]

_TRITON_CHOICES = ("auto", "triton", "torch")
_ATTENTION_CHOICES = ("auto", "flash_attn", "varlen", "sdpa", "torch")
_GROUPED_MM_CHOICES = ("auto", "grouped_mm", "triton", "torch")


def _torch_has_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


# Answered once, at import: the ops ask on every call, also inside torch.compile, where
# Dynamo reads a module constant freely but warns about (and retraces) a cached function.
_TRITON = importlib.util.find_spec("triton") is not None
_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
_TORCH_VARLEN = _torch_has_varlen()


def triton_available() -> bool:
    return _TRITON


def flash_attn_available() -> bool:
    return _FLASH_ATTN


def torch_varlen_available() -> bool:
    return _TORCH_VARLEN


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _requested(backend: str | None, choices: tuple[str, ...]) -> str:
    """The explicit argument, else the env var (whose "triton" means auto for library ops:
    those whose choices are not exactly the Triton ones)."""
    if backend is not None:
        if backend not in choices:
            raise ValueError(f"loom.kernels: backend must be one of {choices}, got {backend!r}")
        return backend
    env = os.environ.get(BACKEND_ENV, "auto")
    if env not in _TRITON_CHOICES:
        raise ValueError(
            f"loom.kernels: ${BACKEND_ENV} must be one of {_TRITON_CHOICES}, got {env!r}"
        )
    return env if choices == _TRITON_CHOICES or env == "torch" else "auto"


def _triton_blocker(tensors: tuple[torch.Tensor, ...]) -> str | None:
    """Why the Triton kernel cannot run on these tensors, or None when it can."""
    if not triton_available():
        return "triton is not installed"
    if all(t.is_cuda for t in tensors):
        return None
    if interpreter_enabled() and all(t.device.type == "cpu" for t in tensors):
        return None
    devices = sorted({str(t.device) for t in tensors})
    return f"the tensors are on {devices}; Triton needs CUDA (or TRITON_INTERPRET=1 on CPU)"


def choose_backend(*tensors: torch.Tensor, backend: str | None = None) -> Backend:
    """Pick ``"triton"`` or ``"torch"`` for an op over ``tensors`` (see the module doc)."""
    # Every op call in a training step asks this: answer the usual case (no override,
    # CUDA tensors) before any validation or message building.
    if backend is None and torch.compiler.is_compiling():
        # Under torch.compile the reference is the better kernel: Inductor fuses it with
        # the ops around it, where a Triton launch from Python would split the graph.
        return "torch"
    usual = backend is None and BACKEND_ENV not in os.environ and triton_available()
    if usual and all(t.is_cuda for t in tensors):
        return "triton"
    requested = _requested(backend, _TRITON_CHOICES)
    if requested == "torch":
        return "torch"
    blocker = _triton_blocker(tensors)
    if requested == "triton" and blocker is not None:
        raise RuntimeError(f"loom.kernels: backend 'triton' was asked for but {blocker}")
    return "triton" if blocker is None else "torch"


def choose_attention_backend(q: torch.Tensor, backend: str | None = None) -> AttentionBackend:
    """flash-attn when installed, else torch's varlen kernel, on CUDA in 16-bit; else SDPA.

    ``"torch"`` is the explicit-mask reference. An explicit choice that cannot run
    here raises instead of silently falling back.
    """
    requested = _requested(backend, _ATTENTION_CHOICES)
    fast_ok = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if requested == "auto":
        if fast_ok and flash_attn_available():
            return "flash_attn"
        if fast_ok and torch_varlen_available():
            return "varlen"
        return "sdpa"
    if requested in ("flash_attn", "varlen"):
        installed = (
            flash_attn_available() if requested == "flash_attn" else torch_varlen_available()
        )
        if not (fast_ok and installed):
            raise RuntimeError(
                f"loom.kernels: attention backend {requested!r} needs CUDA fp16/bf16 tensors "
                f"and the kernel installed (installed={installed}, q on {q.device} {q.dtype})"
            )
    return requested  # type: ignore[return-value]


def choose_grouped_mm_backend(
    x: torch.Tensor, weight: torch.Tensor, backend: str | None = None
) -> GroupedMMBackend:
    """Auto: ``torch._grouped_mm`` on CUDA bf16 with 16-byte aligned strides; else the
    Triton grouped GEMM where Triton runs (the rule of ``choose_backend``) on fp32, bf16
    or fp16 operands of one dtype; else a per-expert loop (``"torch"``, which syncs to
    read the group sizes). An explicit choice that cannot run here raises.
    """
    requested = _requested(backend, _GROUPED_MM_CHOICES)
    if requested == "torch":
        return "torch"
    if requested in ("auto", "grouped_mm"):
        blocker = _grouped_mm_blocker(x, weight, require_cuda=requested == "auto")
        if blocker is None:
            return "grouped_mm"
        if requested == "grouped_mm":
            raise RuntimeError(f"loom.kernels: backend 'grouped_mm' was asked for but {blocker}")
    blocker = _grouped_mm_triton_blocker(x, weight)
    if requested == "triton" and blocker is not None:
        raise RuntimeError(f"loom.kernels: grouped_mm backend 'triton' was asked for but {blocker}")
    return "triton" if blocker is None else "torch"


def _grouped_mm_blocker(x: torch.Tensor, weight: torch.Tensor, require_cuda: bool) -> str | None:
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if require_cuda and not (x.is_cuda and x.dtype == torch.bfloat16):
        return "it is only chosen automatically for CUDA bf16 tensors"
    # The kernel loads through TMA: every stride and base address must be 16-byte aligned.
    elems = 16 // x.element_size()
    if x.shape[-1] % elems or weight.shape[-2] % elems:
        return f"in/out features ({x.shape[-1]}, {weight.shape[-2]}) are not multiples of {elems}"
    if x.data_ptr() % 16 or weight.data_ptr() % 16:
        return "a tensor's storage is not 16-byte aligned"
    return None


def _grouped_mm_triton_blocker(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    blocker = _triton_blocker((x, weight))
    if blocker is not None:
        return blocker
    if x.dtype != weight.dtype or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return (
            "its kernel takes fp32, bf16 or fp16 operands of one dtype; got x "
            f"{x.dtype} and weight {weight.dtype}"
        )
    return None
