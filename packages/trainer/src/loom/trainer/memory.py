"""Long sequences on few GPUs: what activation checkpointing still keeps on the device.

With every decoder layer checkpointed, two things grow with the sequence: each layer's
input (the residual stream, kept for the recompute), and the one layer being recomputed,
where the MLP's intermediate activations (three tensors of ``intermediate_size`` per
token) are the largest part. ``offload_checkpointed_inputs`` moves the first to host
memory; ``tile_mlps`` runs the MLP a tile of tokens at a time, forward and backward, so
only one tile's intermediates exist at once.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from loom.trainer.errors import ConfigError
from loom.trainer.model import decoder_layers

# Host copies are made of pieces this size: the pinned-memory cache rounds each
# allocation up to a power of two, so whole 1.5 GiB tensors would each take 2 GiB.
PIECE_BYTES = 64 << 20
# Smaller saved inputs stay (checkpoint's own empty marker tensor among them).
MIN_BYTES = 1 << 20


def _to_host(tensor: torch.Tensor):
    # Only the residual stream carries a gradient among a layer's saved inputs;
    # anything else (masks, positions) is small or shared between layers.
    big = tensor.numel() * tensor.element_size() >= max(MIN_BYTES, 1)
    if not (big and tensor.requires_grad and tensor.is_floating_point()):
        return tensor
    flat = tensor.detach().contiguous().view(-1)
    per = max(PIECE_BYTES // flat.element_size(), 1)
    pinned = flat.is_cuda
    pieces = []
    for start in range(0, flat.numel(), per):
        part = flat[start : start + per]
        # The copy is ordered on the compute stream, so the device memory is free for
        # the next kernel as soon as the copy is done; no waiting on the host.
        host = torch.empty(part.numel(), dtype=part.dtype, pin_memory=pinned)
        host.copy_(part, non_blocking=pinned)
        pieces.append(host)
    return tensor.device, tensor.shape, pieces


def _to_device(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    device, shape, pieces = packed
    out = torch.empty(shape, dtype=pieces[0].dtype, device=device)
    flat, start = out.view(-1), 0
    for host in pieces:
        flat[start : start + host.numel()].copy_(host, non_blocking=True)
        start += host.numel()
    return out


def _offloaded_checkpoint(function, *args, **kwargs):
    # Outside the checkpoint's own hooks, these see exactly what checkpoint keeps: the
    # layer's inputs. Inside, the checkpoint's hooks win and nothing else is stored.
    with torch.autograd.graph.saved_tensors_hooks(_to_host, _to_device):
        return checkpoint(function, *args, use_reentrant=False, **kwargs)


def offload_checkpointed_inputs(model: nn.Module) -> None:
    """Keep each checkpointed decoder layer's input in host memory (pinned on CUDA)
    between forward and backward; call after ``enable_activation_checkpointing``."""
    layers = [x for x in decoder_layers(model) if getattr(x, "gradient_checkpointing", False)]
    if not layers:
        raise ConfigError(
            "memory.activation_offload needs memory.activation_checkpointing: it moves the "
            "checkpointed layers' inputs to host memory"
        )
    for layer in layers:
        layer._gradient_checkpointing_func = _offloaded_checkpoint


class _TiledMLP(torch.autograd.Function):
    """``forward(x)`` over tiles of the sequence dimension: no intermediates kept in
    forward; in backward each tile is recomputed and differentiated on its own, its
    weight gradients summed in fp32."""

    @staticmethod
    def forward(ctx, forward, tile: int, x: torch.Tensor, *params: torch.Tensor):
        ctx.forward, ctx.tile, ctx.params = forward, tile, params
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([forward(part) for part in x.split(tile, dim=-2)], dim=-2)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        params = [p for p in ctx.params if p.requires_grad]
        sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[2] else None
        for index, part in enumerate(x.split(ctx.tile, dim=-2)):
            rows = slice(index * ctx.tile, index * ctx.tile + part.shape[-2])
            part = part.detach().requires_grad_(grad_x is not None)
            with torch.enable_grad():
                out = ctx.forward(part)
            inputs = ([part] if grad_x is not None else []) + params
            grads = torch.autograd.grad(out, inputs, grad_out[..., rows, :])
            if grad_x is not None:
                grad_x[..., rows, :] = grads[0]
                grads = grads[1:]
            for total, grad in zip(sums, grads, strict=True):
                total += grad
        by_param = {id(p): s.to(p.dtype) for p, s in zip(params, sums, strict=True)}
        return None, None, grad_x, *(by_param.get(id(p)) for p in ctx.params)


def _tiled_forward(mlp: nn.Module, forward, tile: int, hidden_states: torch.Tensor):
    if hidden_states.shape[-2] <= tile or not torch.is_grad_enabled():
        return forward(hidden_states)
    return _TiledMLP.apply(forward, tile, hidden_states, *mlp.parameters())


def tile_mlps(model: nn.Module, tile: int) -> None:
    """Run each decoder layer's MLP ``tile`` tokens at a time (dense MLPs: each token's
    output depends on that token alone, so tiling changes no result)."""
    for index, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or hasattr(mlp, "experts") or hasattr(mlp, "gate"):
            raise ConfigError(
                f"memory.mlp_tile: decoder layer {index} of {type(model).__name__} has no "
                "dense mlp (mixture-of-experts blocks route tokens together); use 0"
            )
        mlp.forward = partial(_tiled_forward, mlp, mlp.forward, tile)
