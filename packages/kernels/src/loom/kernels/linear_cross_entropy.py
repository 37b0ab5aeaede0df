"""Fused linear cross-entropy: ``cross_entropy(hidden @ weight.T, labels)`` without
materialising the [tokens, vocab] logits in fp32, nor their gradient beside them.

The gradients are computed in the forward (as Liger-Kernel does) and only scaled by the
incoming gradient in the backward. Only a logits buffer of about the size of ``hidden``
is ever alive, and every gradient element comes out of a single GEMM (fp32 inside
cuBLAS, rounded once), as in the unfused op: no gradient is accumulated across chunks.

- Loss pass, over chunks of tokens: the chunk's logits [chunk, V] with one matmul; a
  Triton kernel writes each row's loss and logsumexp and turns the logits, in place,
  into dloss/dlogits; ``d hidden`` of the chunk is one more matmul.
- Weight pass, over blocks of vocabulary rows: the block's logits [tokens, block] are
  computed again; a kernel turns them into dloss/dlogits from the stored logsumexp; the
  block's rows of ``d weight`` are one matmul over all tokens.

The weight pass costs a fourth GEMM. It replaces accumulating ``d weight`` over token
chunks, which needs an fp32 [V, H] buffer (1.2 GB for Qwen3's 151936 x 2048 lm_head) beside
each chunk's logits; a 16-bit one would round at every chunk (Liger's choice). Where speed
rather than memory decides, d weight comes from the loss pass's own logits (three GEMMs):
logits of at most ``ONE_PASS_BYTES`` (2 GiB: 4096 tokens of Qwen3's vocabulary) are one
chunk; up to ``ACCUMULATE_BYTES`` (a micro-batch of 4 x 4096 tokens) they are a few equal
chunks whose ``d weight`` GEMMs are summed in that fp32 buffer, which rounds each chunk's
part once, as gradient accumulation over micro-batches of that size would. Longer batches,
where memory is what runs out, take the two passes.

Reductions: ``"sum"`` is the default because Loom normalises by a token count gathered
across SP/DP ranks; ``"mean"`` divides by ``num_items`` when given, else by the local
count of non-ignored labels (at least 1, so an all-ignored batch gives 0, not NaN).
"""

from __future__ import annotations

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
    return_logits: bool = False,
    chunk_size: int | None = None,
    vocab_block: int | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels``; a 0-d fp32 tensor.

    hidden: [..., H]; weight: [V, H] (the lm_head); labels: [...] integer class ids or
    ``ignore_index``. ``z_loss`` adds ``z_loss * logsumexp(logits)**2`` per counted token;
    ``softcap`` applies ``softcap * tanh(logits / softcap)`` first (Gemma-2 style).
    ``return_logits=True`` returns ``(loss, logits)``, logits [..., V] in hidden's dtype
    (softcapped when ``softcap`` is set) and without gradient: they cost the memory the
    op otherwise saves, so ask only when you need them (metrics, evaluation).
    ``chunk_size`` (tokens per chunk of the loss pass) and ``vocab_block`` (vocabulary
    rows per block of the weight pass) default to a buffer budget (see ``plan_chunks``).
    """
    _check_inputs(hidden, weight, labels, reduction, softcap)
    options = (ignore_index, label_smoothing, z_loss, softcap)
    if choose_backend(hidden, weight, labels, backend=backend) == "torch":
        return linear_cross_entropy_reference(
            hidden, weight, labels, ignore_index=ignore_index, reduction=reduction,
            num_items=num_items, label_smoothing=label_smoothing, z_loss=z_loss,
            softcap=softcap, return_logits=return_logits,
        )  # fmt: skip
    hidden_rows = hidden.reshape(-1, hidden.shape[-1])
    labels_flat = labels.reshape(-1).contiguous()
    divisor = _mean_divisor(labels_flat, reduction, num_items, ignore_index)
    # Function.forward runs with grad mode off, and its needs_input_grad ignores grad mode.
    wants = tuple(t.requires_grad and torch.is_grad_enabled() for t in (hidden, weight))
    chunk, block = plan_chunks(*hidden_rows.shape, weight, chunk_size, vocab_block, wants[1])
    loss, logits = _FusedLinearCrossEntropy.apply(
        hidden_rows, weight, labels_flat, divisor, (chunk, block), options, return_logits, wants
    )
    if return_logits:
        return loss, logits.view(*hidden.shape[:-1], weight.shape[0])
    return loss


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
    return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: materialises the fp32 logits; autograd gives the backward."""
    _check_inputs(hidden, weight, labels, reduction, softcap)
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.T).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    flat_labels = labels.reshape(-1)
    losses = F.cross_entropy(
        logits, flat_labels, ignore_index=ignore_index, reduction="none",
        label_smoothing=label_smoothing,
    )  # fmt: skip
    if z_loss:
        losses = losses + z_loss * torch.logsumexp(logits, -1).pow(2) * (
            flat_labels != ignore_index
        )
    divisor = _mean_divisor(flat_labels, reduction, num_items, ignore_index)
    loss = losses.sum() if divisor is None else losses.sum() / divisor
    if return_logits:
        out = logits.detach().to(hidden.dtype).view(*hidden.shape[:-1], weight.shape[0])
        return loss, out
    return loss


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


# The logits buffer is about the size of ``hidden`` (what Liger-Kernel's chunking also
# holds), and at least this much, so that short batches still run large GEMMs.
MIN_BUFFER_BYTES = 64 << 20
# Chunks and blocks are multiples of this many rows: GEMM tiles stay whole.
ROW_MULTIPLE = 64
# Logits up to this size are computed whole, and d weight from them: three GEMMs instead of
# four (4096 tokens x Qwen3's 151936 vocab: 13.3 against 18.3 ms on an H200, for 1.1 GiB
# more).
ONE_PASS_BYTES = 2 << 30
# Up to this size, chunks of at most ONE_PASS_BYTES each give their part of d weight,
# summed in fp32 (a [V, H] fp32 buffer more). Beyond it, where memory is what long
# sequences run out of, two passes.
ACCUMULATE_BYTES = 4 * ONE_PASS_BYTES


def plan_chunks(
    n_tokens: int,
    hidden_size: int,
    weight: torch.Tensor,
    chunk_size: int | None = None,
    vocab_block: int | None = None,
    needs_dw: bool = True,
) -> tuple[int, int | None]:
    """(tokens per loss-pass chunk, vocabulary rows per weight-pass block, or None for one
    pass: ``d weight`` from the loss pass's logits, summed over the chunks in fp32 when
    there are several).

    The weight pass holds ``d weight`` [V, H], ``d hidden`` and a [tokens, block] buffer of
    about ``max(bytes of hidden, MIN_BUFFER_BYTES)``. The loss pass runs before ``d weight``
    exists, so its [chunk, V] buffer may also take the room ``d weight`` will need: larger
    chunks, no higher peak. One pass when the logits are at most ``ONE_PASS_BYTES`` or the
    buffer budget (one chunk), or at most ``ACCUMULATE_BYTES`` (equal chunks of at most
    ``ONE_PASS_BYTES``, if the fp32 sum of d weight is no larger than one of them), or when
    ``chunk_size`` is given without ``vocab_block``.
    """
    vocab, itemsize = weight.shape[0], weight.element_size()
    budget = max(n_tokens * hidden_size * itemsize, MIN_BUFFER_BYTES)
    if vocab_block is None:
        if chunk_size is not None:
            return max(1, min(chunk_size, n_tokens)), None
        logits = n_tokens * vocab * itemsize
        if logits <= max(budget, ONE_PASS_BYTES):
            return max(1, n_tokens), None
        if needs_dw and logits <= ACCUMULATE_BYTES and weight.numel() * 4 <= ONE_PASS_BYTES:
            pieces = -(-logits // ONE_PASS_BYTES)
            # equal chunks, rounded up to whole GEMM tiles
            return _rows_within(-(-n_tokens // pieces) + ROW_MULTIPLE - 1), None
        vocab_block = _rows_within(budget // max(1, n_tokens * itemsize))
    if chunk_size is None:
        chunk_budget = budget + (weight.numel() * itemsize if needs_dw else 0)
        chunk_size = _rows_within(chunk_budget // (vocab * itemsize))
    return max(1, min(chunk_size, n_tokens)), max(1, min(vocab_block, vocab))


def _rows_within(rows: int) -> int:
    return max(ROW_MULTIPLE, rows // ROW_MULTIPLE * ROW_MULTIPLE)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, divisor, sizes, options, return_logits, wants):
        (chunk, block), (want_dh, want_dw) = sizes, wants
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        one_pass = block is None
        dh = torch.empty_like(hidden) if want_dh else None
        dw = torch.zeros_like(weight) if want_dw and n_tokens == 0 else None
        dw_sum = None  # fp32 sum of the chunks' d weight, when one pass has several
        logits_out = hidden.new_empty(n_tokens, vocab) if return_logits else None
        row_losses = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(row_losses)
        for start in range(0, n_tokens, chunk):
            rows = slice(start, start + chunk)
            out = None if logits_out is None else logits_out[rows]
            grad = _loss_pass_chunk(
                hidden[rows], weight, labels[rows], row_losses[rows], lse[rows], options, out
            )
            if dh is not None:
                torch.mm(grad, weight, out=dh[rows])
            if want_dw and one_pass:
                part = grad.T @ hidden[rows]
                if chunk >= n_tokens:
                    dw = part
                else:
                    dw_sum = part.float() if dw_sum is None else dw_sum.add_(part)
            del grad  # before the next chunk's matmul allocates its own
        if dw_sum is not None:
            dw = dw_sum.to(weight.dtype)
            del dw_sum
        if want_dw and dw is None:
            dw = _weight_pass(hidden, weight, labels, lse, block, options)
        loss = row_losses.sum()
        if divisor is not None:
            loss = loss / divisor
            for g in (dh, dw):
                if g is not None:
                    g.div_(divisor)
        ctx.grads = (dh, dw)
        if logits_out is None:
            return loss, None
        ctx.mark_non_differentiable(logits_out)
        return loss, logits_out

    @staticmethod
    def backward(ctx, grad_loss, _grad_logits):
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
        return dh, dw, None, None, None, None, None, None


def _loss_pass_chunk(h, weight, labels, losses_out, lse_out, options, logits_out):
    """A chunk's logits [chunk, V], turned in place into dloss/dlogits; fills the rows'
    losses and logsumexps (and their logits, when asked)."""
    from loom.kernels import _linear_cross_entropy_triton as kernels

    logits = h @ weight.T
    if logits_out is not None:
        softcap = options[-1]
        shown = logits if softcap is None else softcap * torch.tanh(logits.float() / softcap)
        logits_out.copy_(shown)
    kernels.cross_entropy_loss_and_grad(logits, labels, losses_out, lse_out, *options)
    return logits


def _weight_pass(hidden, weight, labels, lse, block, options) -> torch.Tensor:
    """d weight, ``block`` vocabulary rows at a time, each block one GEMM over all tokens."""
    from loom.kernels import _linear_cross_entropy_triton as kernels

    vocab = weight.shape[0]
    dw = torch.empty_like(weight)
    for start in range(0, vocab, block):
        rows = slice(start, start + block)
        grad = hidden @ weight[rows].T  # [tokens, block]
        kernels.cross_entropy_grad_block(grad, start, vocab, labels, lse, *options)
        torch.mm(grad.T, hidden, out=dw[rows])
        del grad
    return dw
