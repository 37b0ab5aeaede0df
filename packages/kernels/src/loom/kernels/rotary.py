"""Rotary position embedding applied to q and k together, HF's ``rotate_half`` layout.

``cos``/``sin`` are what an HF rotary module returns: ``[batch, seq, rot_dim]`` (or
``[seq, rot_dim]``), each half of ``rot_dim`` holding the same frequencies' values.
When ``rot_dim < head_dim`` (partial rotary) only the first ``rot_dim`` dims turn and
the rest pass through. Interleaved (GPT-J, pairs ``2i, 2i+1``) rotation and
multimodal sectioned cos/sin (Qwen2-VL's ``[3, batch, seq, dim]``) are refused rather
than computed wrong: build the combined ``cos``/``sin`` first for the latter.
No gradient flows to ``cos``/``sin`` (HF computes them under ``no_grad``).
"""

from __future__ import annotations

import torch

from loom.kernels.dispatch import choose_backend


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    unsqueeze_dim: int = 1,
    interleaved: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k. With ``unsqueeze_dim=1`` (HF's default) q is
    ``[batch, q_heads, seq, head_dim]``; with ``unsqueeze_dim=2`` it is
    ``[batch, seq, q_heads, head_dim]``; k has the same layout with its own head count."""
    cos, sin = _check_inputs(q, k, cos, sin, unsqueeze_dim, interleaved)
    if choose_backend(q, k, cos, sin, backend=backend) == "torch":
        return apply_rotary_reference(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    return _RotaryFunction.apply(q, k, cos.contiguous(), sin.contiguous(), unsqueeze_dim)


def apply_rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, unsqueeze_dim=1
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's ``apply_rotary_pos_emb`` with partial rotary, computed in fp32."""
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    cos = cos.unsqueeze(unsqueeze_dim).float()
    sin = sin.unsqueeze(unsqueeze_dim).float()
    rot_dim = cos.shape[-1]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x_rot, x_pass = x32[..., :rot_dim], x32[..., rot_dim:]
        x1, x2 = x_rot.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def _check_inputs(q, k, cos, sin, unsqueeze_dim, interleaved) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate at the boundary; returns cos, sin as [batch or 1, seq, rot_dim]."""
    name = "apply_rotary"
    if interleaved:
        raise NotImplementedError(
            f"{name}: interleaved (GPT-J style) rotary is not supported; only HF's rotate_half "
            "layout is. De-interleave the q/k projection weights or use the model's own code."
        )
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"{name}: unsqueeze_dim must be 1 or 2, got {unsqueeze_dim}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{name}: q and k must be 4-D; got {tuple(q.shape)} and {tuple(k.shape)}")
    seq_axis = 3 - unsqueeze_dim
    if (q.shape[0], q.shape[seq_axis], q.shape[-1]) != (k.shape[0], k.shape[seq_axis], k.shape[-1]):
        raise ValueError(
            f"{name}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, seq and "
            f"head_dim (unsqueeze_dim={unsqueeze_dim})"
        )
    if q.dtype != k.dtype:
        raise ValueError(f"{name}: q is {q.dtype} but k is {k.dtype}")
    if cos.dim() == 4 or cos.dim() not in (2, 3):
        raise NotImplementedError(
            f"{name}: cos {tuple(cos.shape)} looks like a multimodal (sectioned) layout; pass "
            "[batch, seq, rot_dim] or [seq, rot_dim] (combine the mrope sections first)"
        )
    if cos.shape != sin.shape:
        raise ValueError(f"{name}: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    rot_dim = cos.shape[-1]
    if rot_dim % 2 or rot_dim > q.shape[-1] or cos.shape[1] != q.shape[seq_axis]:
        raise ValueError(
            f"{name}: cos/sin {tuple(cos.shape)} must be [batch, seq={q.shape[seq_axis]}, rot_dim] "
            f"with an even rot_dim <= head_dim={q.shape[-1]}"
        )
    if cos.shape[0] not in (1, q.shape[0]):
        raise ValueError(f"{name}: cos batch {cos.shape[0]} is neither 1 nor q's {q.shape[0]}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError(f"{name}: cos/sin require grad, but no gradient flows to them; detach")
    return cos, sin


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim):
        from loom.kernels import _rotary_triton as kernels

        ctx.save_for_backward(cos, sin)
        ctx.head_axis = unsqueeze_dim
        q, k = _unit_last_stride(q), _unit_last_stride(k)
        return kernels.rotary(q, k, cos, sin, unsqueeze_dim)

    @staticmethod
    def backward(ctx, dq, dk):
        from loom.kernels import _rotary_triton as kernels

        cos, sin = ctx.saved_tensors
        # Autograd materialises a missing dq or dk as zeros (the Function default).
        dq, dk = _unit_last_stride(dq), _unit_last_stride(dk)
        dq, dk = kernels.rotary(dq, dk, cos, sin, ctx.head_axis, backward=True)
        return dq, dk, None, None, None
