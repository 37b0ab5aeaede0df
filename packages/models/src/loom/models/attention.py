"""Attention backends Loom registers with transformers' ``AttentionInterface``.

``loom_sdpa`` and ``loom_varlen`` attend over packed rows: several samples back
to back, each attending only to itself. Sample boundaries come from ``cu_seq_lens_q``
(HF's flash-attention keyword, over the flattened ``[batch * seq]`` tokens of the whole,
unsliced sequence) when the caller passes it, else from position ids restarting at 0.

Under sequence parallelism (``set_sequence_parallel(model, group)``: the group travels
with the model's modules, and the backend reads it from the module it is called for)
each rank holds a slice
of the sequence; the backend all-to-alls q/k/v to the whole sequence and a slice of
the heads, attends, and all-to-alls back (DeepSpeed-Ulysses). The model code stays
upstream's: rotary embeddings use each rank's own position ids, and nothing else in a
dense decoder layer mixes tokens.

- ``loom_sdpa``: a row that is one sample runs PyTorch SDPA (cuDNN / flash kernels on
  GPU); packed rows run ``loom.kernels.varlen_attention``.
- ``loom_varlen``: always ``varlen_attention`` (flash-attn when installed,
  PyTorch's varlen kernel otherwise). Not named "..flash..": transformers takes any
  implementation name containing "flash" for a hub flash-attention kernel to load.

Neither has a sliding window: a model that passes ``sliding_window`` (Mixtral, Qwen2's
sliding layers) is refused when a sample is longer than the window, the only case where
the window changes anything. Any other keyword that would change the math (logit
softcapping, attention sinks, dropout, a non-causal mask, one this module does not know)
is refused by name: a backend that dropped it would train a different model silently.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from loom.kernels import varlen_attention

LOOM_ATTENTION = ("loom_sdpa", "loom_varlen")
# Keywords that reach the backend and change nothing it computes, or that it implements.
_HANDLED = {
    "scaling", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
    "max_length_k", "sliding_window", "dropout", "is_causal", "use_cache", "cache_position",
    "output_attentions", "output_router_logits", "past_key_value", "past_key_values",
}  # fmt: skip


def set_sequence_parallel(model: nn.Module, group: dist.ProcessGroup | None) -> None:
    """Make ``model`` attend across the ranks of ``group`` (None: no sequence
    parallelism). Every module carries the group: an attention backend is handed its
    module, the MoE aux loss its model."""
    group = group if group is not None and dist.get_world_size(group) > 1 else None
    for module in model.modules():
        module.loom_sp_group = group


def sequence_parallel_group(module: nn.Module) -> dist.ProcessGroup | None:
    return getattr(module, "loom_sp_group", None)


def boundaries_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """cu_seqlens of the flattened ``[batch, seq]`` tokens: a sample starts wherever the
    position id is 0, and at every row start."""
    flat = position_ids.reshape(-1)
    starts = flat == 0
    starts[:: position_ids.shape[-1]] = True
    index = torch.nonzero(starts).flatten()
    end = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat([index, end]).to(torch.int32)


def _attend(query, key, value, cu_seqlens, max_seqlen, scaling, single_sample, use_sdpa):
    """query [batch, heads, seq, dim], key/value [batch, kv_heads, seq, dim] over whole
    rows -> [batch, seq, heads, dim]."""
    if single_sample and use_sdpa:
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
        )  # fmt: skip
        return out.transpose(1, 2)
    batch, heads, seq, dim = query.shape
    packed = [t.transpose(1, 2).reshape(batch * seq, t.shape[1], dim) for t in (query, key, value)]
    out = varlen_attention(*packed, cu_seqlens, max_seqlen, causal=True, scale=scaling)
    return out.reshape(batch, seq, heads, dim)


def _refuse_unimplemented(module, kwargs: dict) -> None:
    for name, value in kwargs.items():
        if name not in _HANDLED and value is not None:
            raise ValueError(
                f"Loom attention does not implement {name!r}, which "
                f"{type(module).__name__} passes: it would change the model's math; use "
                "model.attn_implementation: eager"
            )
    if kwargs.get("is_causal") is False:
        raise ValueError(f"Loom attention is causal only; {type(module).__name__} is not causal")


def _loom_attention(module, query, key, value, attention_mask, *, use_sdpa, **kwargs):
    _refuse_unimplemented(module, kwargs)
    if attention_mask is not None:
        raise ValueError(
            "Loom attention takes packed rows without a padding mask: pass position_ids "
            "(restarting at each sample) or cu_seq_lens_q instead of attention_mask"
        )
    if kwargs.get("dropout", 0.0):
        raise ValueError("Loom attention has no attention dropout; set attention_dropout to 0")
    scaling = kwargs.get("scaling")
    sp_group = sequence_parallel_group(module)
    # [batch, heads, seq/sp, dim] -> [batch, heads/sp, seq, dim]
    if sp_group is not None:
        from loom.dist.ulysses import (
            gather_heads_scatter_seq,
            gather_seq_scatter_heads,
            repeat_kv_for_sp,
        )

        sp = dist.get_world_size(sp_group)
        # fewer KV heads than ranks: repeat them so each rank holds its queries' KV heads
        key, value = (repeat_kv_for_sp(t, 1, query.shape[1], sp) for t in (key, value))
        query, key, value = (
            gather_seq_scatter_heads(t, seq_dim=2, head_dim=1, group=sp_group)
            for t in (query, key, value)
        )
    batch, seq = query.shape[0], query.shape[2]
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        position_ids = kwargs.get("position_ids")
        if sp_group is not None:
            raise ValueError("under sequence parallelism pass cu_seq_lens_q for the whole row")
        if position_ids is None:
            position_ids = torch.arange(seq, device=query.device).expand(batch, seq)
        elif position_ids.shape[0] == 1:  # HF's default: one row of positions for all rows
            position_ids = position_ids.expand(batch, seq)
        cu_seqlens = boundaries_from_positions(position_ids)
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    else:
        max_seqlen = int(kwargs.get("max_length_q") or (cu_seqlens[1:] - cu_seqlens[:-1]).max())
    window = kwargs.get("sliding_window")
    if window is not None and max_seqlen > window:
        # a sample no longer than the window attends exactly as under full causal attention
        raise ValueError(
            f"Loom attention has no sliding window: config.sliding_window={window}, but a "
            f"sample is {max_seqlen} tokens long; use samples of at most {window} tokens "
            "(data.max_seq_len), or model.attn_implementation 'sdpa' or 'eager' (without "
            "sequence parallelism)"
        )
    single_sample = cu_seqlens.numel() == batch + 1
    out = _attend(query, key, value, cu_seqlens, max_seqlen, scaling, single_sample, use_sdpa)
    # [batch, seq, heads/sp, dim] -> [batch, seq/sp, heads, dim]
    if sp_group is not None:
        out = gather_heads_scatter_seq(out, head_dim=2, seq_dim=1, group=sp_group)
    return out, None


def loom_sdpa(module, query, key, value, attention_mask, **kwargs):
    return _loom_attention(module, query, key, value, attention_mask, use_sdpa=True, **kwargs)


def loom_varlen(module, query, key, value, attention_mask, **kwargs):
    return _loom_attention(module, query, key, value, attention_mask, use_sdpa=False, **kwargs)


def register() -> None:
    """Make ``attn_implementation="loom_sdpa"`` / ``"loom_varlen"`` valid.

    No mask function is registered: for an implementation without one, transformers'
    ``create_causal_mask`` returns the (absent) attention mask at once. With one, it
    first scans the position ids for packed samples and waits on the GPU for the answer,
    once per forward, though boundaries travel here as cu_seqlens / position ids.
    """
    for name, fn in zip(LOOM_ATTENTION, (loom_sdpa, loom_varlen), strict=True):
        AttentionInterface.register(name, fn)
