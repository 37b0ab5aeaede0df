"""Mixture-of-experts compute: group tokens by expert, run every expert's MLP as one
grouped GEMM, and combine the results with the routing weights.

Layouts follow transformers v5's fused experts: ``gate_up_proj`` is
``[experts, 2 * intermediate, hidden]`` (gate rows first, then up) and ``down_proj`` is
``[experts, hidden, intermediate]``, both applied as ``x @ w.T``. The grouped GEMM is
``torch._grouped_mm`` where dispatch.choose_grouped_mm_backend allows (CUDA bf16,
aligned), else the Triton grouped GEMM (_grouped_mm_triton.py) where Triton runs, else a
loop over experts. Permute, unpermute and the Triton GEMM's backward are deterministic
(no atomics: the same batch gives bitwise the same gradients, a Loom contract).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loom.kernels.dispatch import choose_grouped_mm_backend
from loom.kernels.swiglu import swiglu


@dataclass(frozen=True)
class TokenRouting:
    """Where each row of the expert-sorted activations came from.

    source_slot: [tokens * top_k] flat (token, k) index of each sorted row.
    inverse: [tokens * top_k] sorted row of each flat (token, k) slot.
    group_ends: [experts] int32, cumulative row count per expert (torch._grouped_mm's offs).
    top_k: routing slots per token.
    """

    source_slot: torch.Tensor
    inverse: torch.Tensor
    group_ends: torch.Tensor
    top_k: int


def route_tokens(selected_experts: torch.Tensor, num_experts: int) -> TokenRouting:
    """Sort the (token, k) slots of ``selected_experts`` [tokens, top_k] by expert."""
    flat = selected_experts.reshape(-1)
    source_slot = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(source_slot)
    inverse[source_slot] = torch.arange(flat.numel(), device=flat.device)
    experts = torch.arange(num_experts, device=flat.device, dtype=flat.dtype)
    # searchsorted, not bincount: deterministic, and allowed under deterministic mode.
    group_ends = torch.searchsorted(flat[source_slot], experts, right=True).to(torch.int32)
    return TokenRouting(source_slot, inverse, group_ends, selected_experts.shape[-1])


def permute_tokens(hidden: torch.Tensor, routing: TokenRouting) -> torch.Tensor:
    """[tokens, H] -> [tokens * top_k, H], one row per (token, k), grouped by expert."""
    return _PermuteTokens.apply(hidden, routing.source_slot, routing.inverse, routing.top_k)


def unpermute_tokens(
    expert_out: torch.Tensor, routing: TokenRouting, routing_weights: torch.Tensor
) -> torch.Tensor:
    """[tokens * top_k, H] -> [tokens, H]: sum over k of ``routing_weights[t, k]`` times the row."""
    tokens, top_k = routing_weights.shape
    per_slot = _GatherPermutation.apply(expert_out, routing.inverse, routing.source_slot)
    per_slot = per_slot.view(tokens, top_k, -1)
    weights = routing_weights.to(expert_out.dtype).unsqueeze(1)  # [tokens, 1, top_k]
    return torch.bmm(weights, per_slot).squeeze(1)  # fp32 accumulation inside the GEMM


def grouped_mm(
    x: torch.Tensor,
    weight: torch.Tensor,
    group_ends: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Rows ``group_ends[e-1]:group_ends[e]`` of x [M, in] times ``weight[e].T``
    (weight: [experts, out, in]) -> [M, out]. ``group_ends[-1]`` must equal M.

    ``backend``: None (auto), ``"grouped_mm"`` (torch._grouped_mm), ``"triton"`` or
    ``"torch"`` (the loop); see dispatch.choose_grouped_mm_backend."""
    if x.dim() != 2 or weight.dim() != 3 or x.shape[1] != weight.shape[2]:
        raise ValueError(
            f"grouped_mm: x must be [rows, in] and weight [experts, out, in]; got x "
            f"{tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    if group_ends.shape != (weight.shape[0],):
        raise ValueError(
            f"grouped_mm: group_ends {tuple(group_ends.shape)} must have one entry per expert "
            f"({weight.shape[0]})"
        )
    choice = choose_grouped_mm_backend(x, weight, backend=backend)
    if choice == "grouped_mm":
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=group_ends.to(torch.int32))
    if choice == "triton":
        offsets = group_ends.to(device=x.device, dtype=torch.int32)
        return _GroupedMMFunction.apply(x, weight, offsets)
    return grouped_mm_reference(x, weight, group_ends)


def grouped_mm_reference(
    x: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor
) -> torch.Tensor:
    """A loop over experts (reads group_ends on the host)."""
    pieces, start = [], 0
    for expert, end in enumerate(group_ends.tolist()):
        pieces.append(x[start:end] @ weight[expert].T)
        start = end
    return torch.cat(pieces)


def fused_moe_forward(
    hidden: torch.Tensor,
    routing_weights: torch.Tensor,
    selected_experts: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Experts' SwiGLU MLPs over their routed tokens, combined by routing weight.

    hidden: [..., H]; routing_weights, selected_experts: [..., top_k];
    gate_up_proj: [E, 2I, H]; down_proj: [E, H, I]. Returns [..., H].
    ``backend="torch"`` runs the loop GEMM and torch SwiGLU, ``"triton"`` the Triton
    grouped GEMM and Triton SwiGLU (raising where they cannot run); None picks per op.
    """
    _check_moe_inputs(hidden, routing_weights, selected_experts, gate_up_proj, down_proj)
    if backend not in (None, "torch", "triton"):
        raise ValueError(
            f"fused_moe_forward: backend must be None, 'torch' or 'triton', got {backend!r}"
        )
    hidden_rows = hidden.reshape(-1, hidden.shape[-1])
    top_k = selected_experts.shape[-1]
    routing = route_tokens(selected_experts.reshape(-1, top_k), gate_up_proj.shape[0])
    x = permute_tokens(hidden_rows, routing)  # [T * top_k, H]
    gate, up = grouped_mm(x, gate_up_proj, routing.group_ends, backend=backend).chunk(2, dim=-1)
    act = swiglu(gate, up, backend=backend)  # [T * top_k, I]
    expert_out = grouped_mm(act, down_proj, routing.group_ends, backend=backend)
    out = unpermute_tokens(expert_out, routing, routing_weights.reshape(-1, top_k))
    return out.view(hidden.shape)


def fused_moe_reference(
    hidden: torch.Tensor,
    routing_weights: torch.Tensor,
    selected_experts: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    """HF's per-expert loop, accumulated in fp32."""
    hidden_rows = hidden.reshape(-1, hidden.shape[-1])
    top_k = selected_experts.shape[-1]
    selected, weights = selected_experts.reshape(-1, top_k), routing_weights.reshape(-1, top_k)
    out = torch.zeros(hidden_rows.shape, dtype=torch.float32, device=hidden.device)
    for expert in range(gate_up_proj.shape[0]):
        token_idx, k_idx = torch.where(selected == expert)
        gate, up = F.linear(hidden_rows[token_idx], gate_up_proj[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down_proj[expert])
        out = out.index_add(0, token_idx, y.float() * weights[token_idx, k_idx, None].float())
    return out.to(hidden.dtype).view(hidden.shape)


def _check_moe_inputs(hidden, routing_weights, selected_experts, gate_up_proj, down_proj) -> None:
    name = "fused_moe_forward"
    experts, two_inter, hidden_size = gate_up_proj.shape
    if hidden.shape[-1] != hidden_size or two_inter % 2:
        raise ValueError(
            f"{name}: gate_up_proj {tuple(gate_up_proj.shape)} must be [experts, 2 * "
            f"intermediate, hidden={hidden.shape[-1]}]"
        )
    if down_proj.shape != (experts, hidden_size, two_inter // 2):
        raise ValueError(
            f"{name}: down_proj {tuple(down_proj.shape)} must be [experts={experts}, "
            f"hidden={hidden_size}, intermediate={two_inter // 2}]"
        )
    if routing_weights.shape != selected_experts.shape or (
        selected_experts.shape[:-1] != hidden.shape[:-1]
    ):
        raise ValueError(
            f"{name}: routing_weights {tuple(routing_weights.shape)} and selected_experts "
            f"{tuple(selected_experts.shape)} must both be hidden's leading dims "
            f"{tuple(hidden.shape[:-1])} + [top_k]"
        )
    if selected_experts.dtype.is_floating_point:
        raise ValueError(f"{name}: selected_experts must be integer, got {selected_experts.dtype}")


class _PermuteTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, source_slot, inverse, top_k):
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return hidden.index_select(0, source_slot // top_k)

    @staticmethod
    def backward(ctx, grad_out):
        (inverse,) = ctx.saved_tensors
        # Each token's top_k copies, gathered and summed in a fixed order (fp32 inside sum).
        per_slot = grad_out.index_select(0, inverse).view(-1, ctx.top_k, grad_out.shape[-1])
        return per_slot.sum(1), None, None, None


class _GroupedMMFunction(torch.autograd.Function):
    """The Triton grouped GEMM: out = x_e @ w[e].T per expert; dx = dout_e @ w[e];
    dw[e] = dout_e.T @ x_e (each expert's rows reduced by one program per output tile)."""

    @staticmethod
    def forward(ctx, x, weight, group_ends):
        from loom.kernels import _grouped_mm_triton as kernels

        ctx.save_for_backward(x, weight, group_ends)
        return kernels.grouped_matmul(x, weight, group_ends, transposed=True)

    @staticmethod
    def backward(ctx, dout):
        from loom.kernels import _grouped_mm_triton as kernels

        x, weight, group_ends = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = kernels.grouped_matmul(dout, weight, group_ends, transposed=False)
        if ctx.needs_input_grad[1]:
            dw = kernels.grouped_weight_grad(dout, x, group_ends, weight.dtype)
        return dx, dw, None


class _GatherPermutation(torch.autograd.Function):
    """``x[order]`` for a permutation ``order`` whose inverse is known: the backward is the
    gather by the inverse, not autograd's scatter-add (index_put with accumulate sorts the
    indices on every call and took ~0.2 ms per MoE layer on an H200)."""

    @staticmethod
    def forward(ctx, x, order, inverse_order):
        ctx.save_for_backward(inverse_order)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad_out):
        (inverse_order,) = ctx.saved_tensors
        return grad_out.index_select(0, inverse_order), None, None
