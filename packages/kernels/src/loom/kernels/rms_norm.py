"""RMSNorm: ``x / sqrt(mean(x**2) + eps) * (offset + weight)``, fp32 inside.

``offset=0`` is the Llama/Qwen form; ``offset=1`` is the centred form (Gemma stores
``weight - 1``). The output keeps ``x.dtype``. Unlike HF's Llama module, which rounds
the normalised activations to ``x.dtype`` before the weight multiply, both
implementations here multiply in fp32 and round once.
"""

from __future__ import annotations

import torch

from loom.kernels.dispatch import choose_backend


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """RMSNorm over the last dim. x: [..., hidden]; weight: [hidden] -> [..., hidden]."""
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0] or x.device != weight.device:
        _raise_bad_inputs(x, weight)
    if choose_backend(x, weight, backend=backend) == "torch":
        return rms_norm_reference(x, weight, eps, offset=offset)
    return _RMSNormFunction.apply(x, weight, eps, offset)


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, offset: float = 0.0
) -> torch.Tensor:
    """Plain-torch RMSNorm; autograd gives the backward."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * rstd * (offset + weight.float())).to(x.dtype)


def _raise_bad_inputs(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"rms_norm: weight must be [hidden] matching x's last dim; got x {tuple(x.shape)} "
            f"and weight {tuple(weight.shape)}"
        )
    raise ValueError(f"rms_norm: x is on {x.device} but weight is on {weight.device}")


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset):
        from loom.kernels import _rms_norm_triton as kernels

        y, rstd = kernels.rms_norm_forward(x, weight, eps, offset)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset = offset
        return y

    @staticmethod
    def backward(ctx, dy):
        from loom.kernels import _rms_norm_triton as kernels

        x, weight, rstd = ctx.saved_tensors
        dx, dw = kernels.rms_norm_backward(dy, x, weight, rstd, ctx.offset)
        return dx, dw, None, None
