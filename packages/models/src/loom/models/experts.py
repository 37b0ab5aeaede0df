"""The routed experts of an MoE port as stacked weights, computed eagerly, fused, or
expert-parallel.

``gate_up_proj``: ``[experts, 2 * intermediate, hidden]`` (gate rows first, then up);
``down_proj``: ``[experts, hidden, intermediate]``; both applied as ``x @ w.T``: the
layout of transformers v5's ``<Prefix>Experts`` (``Qwen3MoeExperts``, ``MixtralExperts``),
so v5 state dicts load unchanged. Each port subclasses ``StackedExperts`` with the
upstream constructor ``__init__(self, config)``, reading the sizes from its own config
fields, and ``replace_class`` puts the subclass where upstream's class stood (v5); the v4
ports' MoE blocks build it in place of v4's ``nn.ModuleList`` of per-expert MLPs.

``config._moe_implementation`` picks the compute:

- ``eager``: HF's per-expert loop (one ``F.linear`` pair per expert hit);
- ``fused`` (default): ``loom.kernels.fused_moe_forward`` (permute, grouped GEMM,
  SwiGLU, unpermute).

Expert parallelism needs no switch: when a ``ParallelPlan`` has made the two
parameters DTensors ``Shard(0)`` over a one-dimensional ``ep`` mesh (FSDP2 hands them
to ``forward`` in that form), each rank holds ``experts / ep`` experts, and tokens go
to the ranks owning their experts with ``loom.dist.expert_parallel.dispatch`` and come
back with ``combine``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from transformers.activations import ACT2FN

from loom.dist.expert_parallel import combine, dispatch
from loom.kernels import fused_moe_forward, grouped_mm, swiglu

MOE_IMPLEMENTATIONS = ("eager", "fused")


def moe_implementation(config) -> str:
    """``config._moe_implementation`` (``fused`` when unset), checked."""
    name = getattr(config, "_moe_implementation", None) or "fused"
    if name not in MOE_IMPLEMENTATIONS:
        raise ValueError(
            f"moe_implementation {name!r} is not one of {MOE_IMPLEMENTATIONS} "
            "(config._moe_implementation / build_model(moe_implementation=...))"
        )
    return name


class StackedExperts(nn.Module):
    """Drop-in for v5's ``<Prefix>Experts`` (same parameters, same ``forward``).

    ``num_experts`` E, ``hidden_size`` H, ``intermediate_size`` I (one expert's), the
    activation name and ``implementation`` (``moe_implementation(config)``)."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str,
        implementation: str,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = hidden_size
        self.intermediate_dim = intermediate_size
        self.gate_up_proj = nn.Parameter(
            torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim)
        )
        self.down_proj = nn.Parameter(
            torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim)
        )
        self.hidden_act = hidden_act
        self.act_fn = ACT2FN[hidden_act]
        self.moe_implementation = implementation
        if self.moe_implementation == "fused" and self.hidden_act not in ("silu", "swish"):
            raise ValueError(
                f"moe_implementation 'fused' computes SwiGLU; hidden_act is {self.hidden_act!r} "
                "(use moe_implementation='eager')"
            )

    def init_normal_(self, std: float) -> None:
        """Both stacked tensors ~ N(0, std), as v5's ``_init_weights`` draws upstream's
        experts; the v4 ports call it from their MoE block's ``__init__`` (v4's
        ``_init_weights`` knows no stacked parameters). Through ``nn.init``, so HF's
        ``no_init_weights`` (``from_pretrained``) skips it."""
        nn.init.normal_(self.gate_up_proj, mean=0.0, std=std)
        nn.init.normal_(self.down_proj, mean=0.0, std=std)

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        """hidden_states: [tokens, hidden]; top_k_index, top_k_weights: [tokens, top_k].
        Returns [tokens, hidden]."""
        if isinstance(self.gate_up_proj, DTensor):
            return self._expert_parallel(hidden_states, top_k_index, top_k_weights)
        if self.moe_implementation == "fused":
            return fused_moe_forward(
                hidden_states, top_k_weights, top_k_index, self.gate_up_proj, self.down_proj
            )
        return self._eager_loop(hidden_states, top_k_index, top_k_weights)

    def _eager_loop(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        """HF v5's loop, expert by expert, in the same order of operations."""
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert in expert_hit[:, 0].tolist():
            top_k_pos, token_idx = torch.where(expert_mask[expert])
            y = self._expert_mlp(
                hidden_states[token_idx], self.gate_up_proj[expert], self.down_proj[expert]
            )
            y = y * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    def _expert_mlp(self, x, gate_up_proj, down_proj) -> torch.Tensor:
        gate, up = F.linear(x, gate_up_proj).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, down_proj)

    def _expert_parallel(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        gate_up_proj, down_proj = self.gate_up_proj, self.down_proj
        mesh = gate_up_proj.device_mesh
        if mesh.ndim != 1 or gate_up_proj.placements != (Shard(0),):
            raise ValueError(
                f"expert parameters must be Shard(0) over a 1-D ep mesh, got placements "
                f"{gate_up_proj.placements} over {mesh} (apply loom.models.expert_plan."
                "EXPERT_PLAN to ParallelState.ep_mesh)"
            )
        group = mesh.get_group()
        # [tokens, hidden] -> [received, hidden]: rows for this rank's experts, by expert
        rows, counts, handle = dispatch(hidden_states, top_k_index, self.num_experts, group)
        local_gate_up, local_down = gate_up_proj.to_local(), down_proj.to_local()
        if self.moe_implementation == "fused":
            group_ends = torch.tensor(counts, device=rows.device).cumsum(0).to(torch.int32)
            gate, up = grouped_mm(rows, local_gate_up, group_ends).chunk(2, dim=-1)
            out = grouped_mm(swiglu(gate, up), local_down, group_ends)
        else:
            pieces = [
                self._expert_mlp(chunk, local_gate_up[e], local_down[e])
                for e, chunk in enumerate(rows.split(counts))
            ]
            out = torch.cat(pieces)
        # [received, hidden] -> [tokens, hidden], weighted by the router
        return combine(out, top_k_weights, handle, group)
