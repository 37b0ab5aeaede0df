"""SwiGLU activation: ``silu(gate) * up``, fp32 inside, one rounding to the input dtype.

The kernel reads strided rows, so ``gate, up = gate_up.chunk(2, dim=-1)`` views are used
as they are; the backward recomputes the sigmoid instead of saving it.

The Triton backward writes dgate over ``gate`` and dup over ``up``, as Liger-Kernel does,
instead of allocating two more activation-sized tensors (+256 MiB at [16384, 8192] bf16).
In an MLP nothing else reads them: they are projection outputs, or halves of one, saved by
this op alone. What this means for callers: after backward, a ``gate`` or ``up`` that an op
of the graph produced holds its gradient, not its value, and a second backward through the
graph (``retain_graph=True``) raises. The writes bump the version counters, so an op that
saved the same tensor and runs its backward later raises autograd's "modified by an
inplace operation" error instead of reading gradients. Autograd skips that check for
tensors saved through saved-tensor hooks, non-reentrant activation checkpointing included:
in a checkpointed region no other op may save ``gate`` or ``up`` (loom.models' MLPs and
loom.kernels.moe save them nowhere else). Memory that lives on after backward is never
overwritten: leaves (parameters, user inputs) and views of them, inputs that need no
gradient, and layouts where a write could land on an element read elsewhere
(``swiglu(x, x)``, stride-0 rows) get new gradient tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loom.kernels.dispatch import choose_backend


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up. gate, up: [..., intermediate], same shape and dtype.

    With the Triton backend, backward overwrites ``gate`` and ``up`` when an op of the graph
    produced them (see the module docstring).
    """
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


def _memory_of_graph_output(t: torch.Tensor) -> bool:
    """Whether ``t``'s memory is an op's output (``t`` or the base it views), not a leaf's."""
    base = t._base if t._base is not None else t
    return base.grad_fn is not None


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        from loom.kernels import _swiglu_triton as kernels

        ctx.save_for_backward(gate, up)
        # Judged here, on the caller's tensors: under non-reentrant activation checkpointing
        # the tensors that backward unpacks are no longer views, though a view of a
        # parameter still holds the parameter's memory.
        ctx.graph_owned = (_memory_of_graph_output(gate), _memory_of_graph_output(up))
        return kernels.swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dout):
        from loom.kernels import _swiglu_triton as kernels

        gate, up = ctx.saved_tensors
        overwrite_gate, overwrite_up = (
            owned and needed
            for owned, needed in zip(ctx.graph_owned, ctx.needs_input_grad, strict=True)
        )
        return kernels.swiglu_backward(
            dout, gate, up, overwrite_gate=overwrite_gate, overwrite_up=overwrite_up
        )
