"""Gated DeltaNet (the linear-attention layer of Qwen3-Next and Qwen3.5) for training:
packed rows and sequence parallelism, on ``loom.kernels``' causal convolution and gated
delta rule.

``gated_deltanet_forward`` is a drop-in ``forward`` for upstream's
``Qwen3NextGatedDeltaNet`` and ``Qwen3_5GatedDeltaNet`` (their parameters and projections
as they are: Qwen3-Next's fused ``in_proj_qkvz`` / ``in_proj_ba`` grouped per key head,
Qwen3.5's separate ``in_proj_qkv`` / ``_z`` / ``_b`` / ``_a``), without a cache:

- Packed rows: the samples' boundaries come from ``cu_seq_lens_q`` (over the flattened
  ``[batch * seq]`` tokens of the whole rows, as attention takes them) or from position
  ids restarting at 0; every sample's convolution window and recurrent state start at
  zero. Upstream's torch path runs the recurrence across them.
- Sequence parallelism (Ulysses, as attention): each rank projects its slice of the
  tokens; q, k, v, the decay ``g`` and the write strength ``beta`` go all-to-all to the
  whole sequence and a slice of the heads; the convolution takes the channels of those
  heads (its weight sliced to match); the recurrence runs per head over the whole
  sequence; its output goes back all-to-all to the rank's tokens, where the gated norm
  and ``out_proj`` run. Key and value heads must divide by the SP size; value head ``j``
  reads key head ``j // (value heads / key heads)``, so a rank's value heads read its
  own key heads.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from loom.kernels import causal_conv1d, gated_delta_rule
from loom.models.attention import boundaries_from_positions, sequence_parallel_group


def packed_boundaries(kwargs: dict, batch: int, seq: int, device) -> torch.Tensor:
    """cu_seqlens over the flattened ``[batch, seq]`` whole rows."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is not None:
        return cu_seqlens.to(device=device, dtype=torch.int32)
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(seq, device=device).expand(batch, seq)
    elif position_ids.shape[0] == 1:
        position_ids = position_ids.expand(batch, seq)
    return boundaries_from_positions(position_ids)


def _conv_channels(layer, rank: int, sp: int, device) -> torch.Tensor:
    """The conv channels ([q | k | v], each head's dims contiguous) of rank's heads."""
    k_heads, v_heads = layer.num_k_heads // sp, layer.num_v_heads // sp
    q = torch.arange(rank * k_heads * layer.head_k_dim, (rank + 1) * k_heads * layer.head_k_dim)
    v = torch.arange(rank * v_heads * layer.head_v_dim, (rank + 1) * v_heads * layer.head_v_dim)
    return torch.cat([q, q + layer.key_dim, v + 2 * layer.key_dim]).to(device)


def _project(layer, hidden_states: torch.Tensor):
    """q, k [B, T, key heads, K]; v, z [B, T, value heads, V]; b, a [B, T, value heads]."""
    if hasattr(layer, "in_proj_qkvz"):  # Qwen3-Next
        qkvz, ba = layer.in_proj_qkvz(hidden_states), layer.in_proj_ba(hidden_states)
        return layer.fix_query_key_value_ordering(qkvz, ba)
    batch, seq = hidden_states.shape[:2]
    sizes = [layer.key_dim, layer.key_dim, layer.value_dim]
    query, key, value = torch.split(layer.in_proj_qkv(hidden_states), sizes, dim=-1)
    query, key = (t.reshape(batch, seq, -1, layer.head_k_dim) for t in (query, key))
    value = value.reshape(batch, seq, -1, layer.head_v_dim)
    z = layer.in_proj_z(hidden_states).reshape(batch, seq, -1, layer.head_v_dim)
    return query, key, value, z, layer.in_proj_b(hidden_states), layer.in_proj_a(hidden_states)


def _to_heads(x: torch.Tensor, group) -> torch.Tensor:
    from loom.dist.ulysses import gather_seq_scatter_heads

    return gather_seq_scatter_heads(x, seq_dim=1, head_dim=2, group=group)


def gated_deltanet_forward(
    self, hidden_states: torch.Tensor, cache_params=None, attention_mask=None, **kwargs
) -> torch.Tensor:
    """Upstream's Gated DeltaNet ``forward``, for training (module docstring)."""
    if cache_params is not None:
        raise ValueError("Loom's Gated DeltaNet trains over whole rows: no cache")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "Loom's Gated DeltaNet takes packed rows without padding: pass position_ids "
            "(restarting at each sample) or cu_seq_lens_q instead of a padding mask"
        )
    if self.conv1d.bias is not None:
        raise ValueError("Loom's Gated DeltaNet: the short convolution has no bias upstream")
    batch, local = hidden_states.shape[:2]
    query, key, value, z, b, a = _project(self, hidden_states)
    beta = b.sigmoid()
    g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
    weight = self.conv1d.weight[:, 0, :]
    group = sequence_parallel_group(self)
    sp = dist.get_world_size(group) if group is not None else 1
    if group is not None:
        query, key, value = (_to_heads(t, group) for t in (query, key, value))
        g, beta = (_to_heads(t[..., None], group)[..., 0] for t in (g, beta))
        channels = _conv_channels(self, dist.get_rank(group), sp, weight.device)
        weight = weight.index_select(0, channels)
    seq = local * sp
    cu_seqlens = packed_boundaries(kwargs, batch, seq, hidden_states.device)
    # one packed row: the rows' boundaries are among the samples'
    mixed = torch.cat([t.reshape(1, batch * seq, -1) for t in (query, key, value)], dim=-1)
    mixed = causal_conv1d(mixed, weight, activation=self.activation, cu_seqlens=cu_seqlens)
    sizes = [query.shape[2] * self.head_k_dim] * 2 + [value.shape[2] * self.head_v_dim]
    query, key, value = torch.split(mixed, sizes, dim=-1)
    query, key = (t.reshape(1, batch * seq, -1, self.head_k_dim) for t in (query, key))
    value = value.reshape(1, batch * seq, -1, self.head_v_dim)
    heads = value.shape[2]
    core = gated_delta_rule(
        query, key, value, g.reshape(1, -1, heads), beta.reshape(1, -1, heads),
        cu_seqlens=cu_seqlens,
    )  # fmt: skip
    core = core.reshape(batch, seq, heads, self.head_v_dim)
    if group is not None:
        from loom.dist.ulysses import gather_heads_scatter_seq

        core = gather_heads_scatter_seq(core, head_dim=2, seq_dim=1, group=group)
    core = self.norm(core.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
    return self.out_proj(core.reshape(batch, local, -1))
