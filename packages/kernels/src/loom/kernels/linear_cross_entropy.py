"""Fused linear cross-entropy: ``cross_entropy(hidden @ weight.T, labels)`` without
materialising the [tokens, vocab] logits in fp32, nor their gradient beside them.

The fused path walks the tokens in chunks. For each chunk it computes the logits with
one matmul, lets a Triton kernel turn them into per-row losses and, in place, into
dloss/dlogits, and immediately folds those into the gradients of ``hidden`` and
``weight`` (as Liger-Kernel does). Only a [chunk, vocab] buffer is ever alive; the
backward just scales the stored gradients by the incoming one. With several chunks the
weight gradient is accumulated over them in fp32.

Chunks are sized by memory (``_default_chunk_size``), not by ``hidden``: about
``LOGITS_CHUNK_BYTES`` of logits, a power of two of tokens. Every chunk reads and
writes the whole fp32 [vocab, hidden] weight gradient (2.4 GB for Qwen3's 151936 x
2048 lm_head), so many small chunks make the op bound by that traffic and by small-M
GEMMs (128-token chunks ran 8x slower than the unfused op on an H100). A batch whose
logits are no larger than that fp32 buffer is a single chunk: the same peak, and no
fp32 accumulation at all.

Reductions: ``"sum"`` is the default because Loom normalises by a token count gathered
across SP/DP ranks; ``"mean"`` divides by ``num_items`` when given, else by the local
count of non-ignored labels (at least 1, so an all-ignored batch gives 0, not NaN).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from loom.kernels.dispatch import choose_backend


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "sum",
    num_items: int | torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels``; a 0-d fp32 tensor.

    hidden: [..., H]; weight: [V, H] (the lm_head); labels: [...] integer class ids or
    ``ignore_index``. ``z_loss`` adds ``z_loss * logsumexp(logits)**2`` per counted token;
    ``softcap`` applies ``softcap * tanh(logits / softcap)`` first (Gemma-2 style).
    ``chunk_size`` tokens per chunk (default: ``LOGITS_CHUNK_BYTES`` of logits, see the
    module doc).
    """
    _check_inputs(hidden, weight, labels, reduction, softcap)
    options = (ignore_index, label_smoothing, z_loss, softcap)
    if choose_backend(hidden, weight, labels, backend=backend) == "torch":
        return linear_cross_entropy_reference(
            hidden, weight, labels, ignore_index=ignore_index, reduction=reduction,
            num_items=num_items, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        )  # fmt: skip
    hidden_rows = hidden.reshape(-1, hidden.shape[-1])
    labels_flat = labels.reshape(-1).contiguous()
    divisor = _mean_divisor(labels_flat, reduction, num_items, ignore_index)
    needs_dw = weight.requires_grad and torch.is_grad_enabled()
    chunk = chunk_size or _default_chunk_size(*hidden_rows.shape, weight, needs_dw)
    return _FusedLinearCrossEntropy.apply(hidden_rows, weight, labels_flat, divisor, chunk, options)


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "sum",
    num_items: int | torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Plain torch: materialises the fp32 logits; autograd gives the backward."""
    _check_inputs(hidden, weight, labels, reduction, softcap)
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.T).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    labels = labels.reshape(-1)
    losses = F.cross_entropy(
        logits, labels, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    if z_loss:
        losses = losses + z_loss * torch.logsumexp(logits, -1).pow(2) * (labels != ignore_index)
    divisor = _mean_divisor(labels, reduction, num_items, ignore_index)
    return losses.sum() if divisor is None else losses.sum() / divisor


def _check_inputs(hidden, weight, labels, reduction, softcap) -> None:
    name = "fused_linear_cross_entropy"
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{name}: weight must be [vocab, hidden] with hidden = hidden's last dim "
            f"({hidden.shape[-1]}); got weight {tuple(weight.shape)}"
        )
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"{name}: labels {tuple(labels.shape)} must match hidden {tuple(hidden.shape)} "
            "without its last dim"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{name}: hidden is {hidden.dtype} but weight is {weight.dtype}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{name}: labels must be an integer tensor, got {labels.dtype}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"{name}: reduction must be 'sum' or 'mean', got {reduction!r}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"{name}: softcap must be positive or None, got {softcap}")


def _mean_divisor(labels, reduction, num_items, ignore_index) -> torch.Tensor | float | None:
    if reduction == "sum":
        if num_items is not None:
            raise ValueError("fused_linear_cross_entropy: num_items is only used with 'mean'")
        return None
    if num_items is not None:
        return num_items.clamp(min=1) if torch.is_tensor(num_items) else float(max(num_items, 1))
    # A device tensor: no host sync inside the training step.
    return (labels != ignore_index).sum().clamp(min=1)


# About 1 GiB of logits per chunk: 2048 tokens for a 151936 vocab in bf16.
LOGITS_CHUNK_BYTES = 1 << 30
MIN_CHUNK_TOKENS = 256


def _default_chunk_size(
    n_tokens: int, hidden_size: int, weight: torch.Tensor, needs_dw: bool
) -> int:
    """Tokens per chunk: the largest power of two whose [chunk, vocab] logits fit in
    ``LOGITS_CHUNK_BYTES`` (at least ``MIN_CHUNK_TOKENS``), never more than ``n_tokens``.

    One chunk for the whole batch when its logits are no larger than the fp32 weight
    gradient that several chunks would accumulate into ([vocab, hidden] fp32): the peak
    is then no higher, and the fp32 buffer's traffic (2.4 GB per chunk for Qwen3's
    lm_head, about 1 ms on an H100) is gone.
    """
    if needs_dw and n_tokens * weight.element_size() <= 4 * hidden_size:
        return max(1, n_tokens)
    rows = max(MIN_CHUNK_TOKENS, LOGITS_CHUNK_BYTES // (weight.shape[0] * weight.element_size()))
    return max(1, min(1 << (rows.bit_length() - 1), n_tokens))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, divisor, chunk, options):
        from loom.kernels import _linear_cross_entropy_triton as kernels

        want_dh, want_dw = ctx.needs_input_grad[:2]
        n_tokens = hidden.shape[0]
        dh = torch.empty_like(hidden) if want_dh else None
        dw = None
        row_losses = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
        for start in range(0, n_tokens, chunk):
            h = hidden[start : start + chunk]
            logits = h @ weight.T  # [chunk, V]; becomes dloss/dlogits in the kernel
            kernels.cross_entropy_loss_and_grad(
                logits, labels[start : start + chunk], row_losses[start : start + chunk], *options
            )
            if dh is not None:
                torch.mm(logits, weight, out=dh[start : start + chunk])
            if want_dw:  # one chunk: a single GEMM, rounded once, and no fp32 buffer
                one_chunk = chunk >= n_tokens
                dw = logits.T @ h if one_chunk else _accumulate_matmul(dw, logits.T, h)
            del logits  # before the next chunk's matmul allocates its own
        if want_dw and dw is None:  # no tokens at all
            dw = torch.zeros_like(weight)
        loss = row_losses.sum()
        if divisor is not None:
            loss = loss / divisor
            for grad in (dh, dw):
                if grad is not None:
                    grad.div_(divisor)
        ctx.grads = (dh, None if dw is None else dw.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError(
                "fused_linear_cross_entropy: backward ran twice over one forward; its gradients "
                "are computed in the forward and scaled in place, so retain_graph is unsupported"
            )
        dh, dw = ctx.grads
        ctx.grads = None  # free them with the graph, and catch a second backward
        # In place: a second weight-sized buffer is what this op exists to avoid.
        for grad in (dh, dw):
            if grad is not None:
                grad.mul_(grad_loss)
        return dh, dw, None, None, None, None


def _accumulate_matmul(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc + a @ b in fp32 (a new fp32 tensor when acc is None); a, b may be 16-bit."""
    if a.dtype == torch.float32:
        return a @ b if acc is None else acc.addmm_(a, b)
    if a.is_cuda and _fp32_out_gemm_works(a.device):
        if acc is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    # Rounds each chunk's product to 16 bits once; the sum across chunks stays fp32.
    product = (a @ b).float()
    return product if acc is None else acc.add_(product)


@functools.cache
def _fp32_out_gemm_works(device: torch.device) -> bool:
    """Whether this torch has cuBLAS's 16-bit-in, fp32-out mm/addmm (added in torch 2.9)."""
    a = torch.ones(8, 8, dtype=torch.bfloat16, device=device)
    try:
        acc = torch.mm(a, a, out_dtype=torch.float32)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return acc.dtype == torch.float32 and bool((acc == 16).all())
