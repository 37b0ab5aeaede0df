"""Triton kernels of the fused linear cross-entropy (see linear_cross_entropy.py for the
two passes). Both overwrite logits with dloss/dlogits in place, so a chunk never needs a
second buffer of its size. Imported lazily; see _rms_norm_triton.py."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loom.kernels._launch import num_warps_for

# Vocabularies are walked in blocks of at most this many columns.
MAX_VOCAB_BLOCK = 16384


@triton.jit
def _tanh(x):
    # tl.math has no tanh in every Triton release we support; this form is exact enough
    # in fp32 (absolute error ~1e-7) and saturates cleanly at +-1.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _write_grad(
    row_ptr, n_cols, col_start, vocab, target, valid, lse, label_smoothing, z_loss, softcap,
    BLOCK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):  # fmt: skip
    """dloss/dlogits over ``n_cols`` logits of a row whose first column is vocab column
    ``col_start``: softmax * (1 + 2 z lse) - smoothing/V - (1 - smoothing) * onehot, times
    the softcap's tanh' on the raw logits; written over the logits."""
    p_scale = 1.0 + 2.0 * z_loss * lse
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            t = _tanh(x / softcap)
            x = softcap * t
        g = tl.exp(x - lse) * p_scale - label_smoothing / vocab
        g -= tl.where(col_start + cols == target, 1.0 - label_smoothing, 0.0)
        if HAS_SOFTCAP:
            g *= 1.0 - t * t
        g = tl.where(valid, g, 0.0)
        tl.store(row_ptr + cols, g.to(row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ce_loss_grad_kernel(
    logits_ptr, stride_row, labels_ptr, loss_ptr, lse_ptr, n_cols,
    ignore_index, label_smoothing, z_loss, softcap,
    BLOCK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    target = tl.where(valid, label, 0)

    # Online max and sum of exp (fp32), plus the row sum for label smoothing.
    m = float("-inf")
    s = 0.0
    row_sum = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x = softcap * _tanh(x / softcap)
        x = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        row_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)
    lse = m + tl.log(s)

    x_target = tl.load(row_ptr + target).to(tl.float32)
    if HAS_SOFTCAP:
        x_target = softcap * _tanh(x_target / softcap)
    loss = (1.0 - label_smoothing) * (lse - x_target)
    loss += label_smoothing * (lse - row_sum / n_cols) + z_loss * lse * lse
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(lse_ptr + row, lse)
    _write_grad(
        row_ptr, n_cols, 0, n_cols, target, valid, lse, label_smoothing, z_loss, softcap,
        BLOCK, HAS_SOFTCAP,
    )  # fmt: skip


@triton.jit
def _ce_grad_block_kernel(
    logits_ptr, stride_row, labels_ptr, lse_ptr, col_start, n_cols, vocab,
    ignore_index, label_smoothing, z_loss, softcap,
    BLOCK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    lse = tl.load(lse_ptr + row)
    _write_grad(
        logits_ptr + row * stride_row, n_cols, col_start, vocab, label, label != ignore_index,
        lse, label_smoothing, z_loss, softcap, BLOCK, HAS_SOFTCAP,
    )  # fmt: skip


def cross_entropy_loss_and_grad(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_out: torch.Tensor,
    lse_out: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> None:
    """logits: [rows, vocab] (unit last stride), overwritten with dloss/dlogits;
    labels: [rows] int; loss_out, lse_out: [rows] fp32, filled with the per-row loss and
    logsumexp."""
    n_rows, n_cols = logits.shape
    block = min(MAX_VOCAB_BLOCK, triton.next_power_of_2(n_cols))
    _ce_loss_grad_kernel[(n_rows,)](
        logits, logits.stride(0), labels, loss_out, lse_out, n_cols,
        ignore_index, label_smoothing, z_loss, softcap or 1.0,
        BLOCK=block, HAS_SOFTCAP=softcap is not None, num_warps=num_warps_for(block),
    )  # fmt: skip


def cross_entropy_grad_block(
    logits: torch.Tensor,
    col_start: int,
    vocab: int,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> None:
    """logits: [rows, cols] (unit last stride), vocab columns ``col_start:col_start+cols``
    of every row, overwritten with dloss/dlogits given each row's logsumexp ``lse``."""
    n_rows, n_cols = logits.shape
    block = min(MAX_VOCAB_BLOCK, triton.next_power_of_2(n_cols))
    _ce_grad_block_kernel[(n_rows,)](
        logits, logits.stride(0), labels, lse, col_start, n_cols, vocab,
        ignore_index, label_smoothing, z_loss, softcap or 1.0,
        BLOCK=block, HAS_SOFTCAP=softcap is not None, num_warps=num_warps_for(block),
    )  # fmt: skip
