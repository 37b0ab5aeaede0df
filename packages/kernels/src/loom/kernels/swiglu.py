"""SwiGLU activation: ``silu(gate) * up``, fp32 inside, one rounding to the input dtype.

The kernel reads strided rows, so ``gate, up = gate_up.chunk(2, dim=-1)`` views are used
as they are; the backward recomputes the sigmoid instead of saving it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loom.kernels.dispatch import choose_backend


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up. gate, up: [..., intermediate], same shape and dtype."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(
            "swiglu: gate and up must have the same shape, dtype and device; got gate "
            f"{tuple(gate.shape)} {gate.dtype} {gate.device} and up {tuple(up.shape)} "
            f"{up.dtype} {up.device}"
        )
    if choose_backend(gate, up, backend=backend) == "torch":
        return swiglu_reference(gate, up)
    return _SwiGLUFunction.apply(gate, up)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain torch in fp32; autograd gives the backward."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        from loom.kernels import _swiglu_triton as kernels

        ctx.save_for_backward(gate, up)
        return kernels.swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dout):
        from loom.kernels import _swiglu_triton as kernels

        gate, up = ctx.saved_tensors
        return kernels.swiglu_backward(dout, gate, up)
