"""MoE checkpoints with per-expert tensors in, and back out, for the stacked experts.

HF checkpoints of the MoE families Loom ports store each routed expert's three
projections as separate ``[out, in]`` matrices; what they are called differs by family,
and an ``ExpertLayout`` says it (verified for each port against transformers' own
``conversion_mapping`` and its ``save_pretrained`` output, not inferred from names):

    <layer>.<block>.experts.<j>.<gate>.weight  [I, H]
    <layer>.<block>.experts.<j>.<up>.weight    [I, H]
    <layer>.<block>.experts.<j>.<down>.weight  [H, I]

Loom's layout (v5's in memory, ``loom.models.experts.StackedExperts``):
``<layer>.mlp.experts.gate_up_proj`` ``[E, 2I, H]`` (gate rows, then up) and
``<layer>.mlp.experts.down_proj`` ``[E, H, I]``; when ``block`` is not ``mlp`` (Mixtral's
``block_sparse_moe``), every other key of the block (the router) is renamed as well.

``StackedExpertsConverter`` implements ``loom.dist.loading.TensorConverter``: it buffers
the per-expert tensors of a layer until all ``E`` experts have arrived and then emits
the stacked tensors; already-stacked keys are passed through when they have Loom's
layout, transposed when they have the ``[E, H, 2I]`` / ``[E, I, H]`` layout of
checkpoints that store ``x @ w`` weights, and refused otherwise. ``ExpertLayout.to_hf``
is the inverse, for export.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import torch

LOOM_BLOCK = "mlp"  # the MoE block's attribute in upstream's v5 modules and Loom's ports
_STACKED = re.compile(rf"^(?P<layer>.*)\.{LOOM_BLOCK}\.experts\.(?P<proj>gate_up_proj|down_proj)$")


@dataclass(frozen=True)
class ExpertLayout:
    """How one MoE family's HF checkpoints name the routed experts: the MoE block
    (``mlp``, ``block_sparse_moe``) and each expert's gate, up and down projections."""

    block: str
    gate: str
    up: str
    down: str

    @property
    def projs(self) -> tuple[str, str, str]:
        return (self.gate, self.up, self.down)

    @cached_property
    def per_expert(self) -> re.Pattern:
        names = "|".join(re.escape(p) for p in self.projs)
        return re.compile(
            rf"^(?P<layer>.*)\.{re.escape(self.block)}\.experts\.(?P<expert>\d+)"
            rf"\.(?P<proj>{names})\.weight$"
        )

    def to_loom_key(self, key: str) -> str:
        """``<layer>.<block>.<rest>`` -> ``<layer>.mlp.<rest>``; other keys unchanged."""
        if self.block == LOOM_BLOCK:
            return key
        return key.replace(f".{self.block}.", f".{LOOM_BLOCK}.", 1)

    def to_hf_key(self, key: str) -> str:
        if self.block == LOOM_BLOCK:
            return key
        return re.sub(rf"(\.layers\.\d+)\.{LOOM_BLOCK}\.", rf"\1.{self.block}.", key, count=1)

    def to_hf(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loom's state dict (full tensors) in this HF layout; other keys unchanged but for
        the block's name.

        The per-expert tensors are contiguous copies (safetensors refuses views that share
        storage)."""
        out: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            match = _STACKED.match(key)
            if match is None:
                out[self.to_hf_key(key)] = tensor
                continue
            prefix = f"{match['layer']}.{self.block}.experts"
            for e, expert in enumerate(tensor.unbind(0)):
                if match["proj"] == "down_proj":
                    out[f"{prefix}.{e}.{self.down}.weight"] = expert.contiguous()
                else:
                    gate, up = expert.chunk(2, dim=0)  # [2I, H] -> 2 x [I, H]
                    out[f"{prefix}.{e}.{self.gate}.weight"] = gate.contiguous()
                    out[f"{prefix}.{e}.{self.up}.weight"] = up.contiguous()
        return out


class StackedExpertsConverter:
    """``num_experts`` (E), ``hidden_size`` (H) and ``intermediate_size`` (I, one
    expert's) of the model; a port's subclass sets ``layout`` and ``from_config``."""

    layout: ExpertLayout

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        self.num_experts = num_experts
        self.hidden = hidden_size
        self.inter = intermediate_size
        self._buffers: dict[str, dict[tuple[str, int], torch.Tensor]] = {}  # by layer

    def can_handle(self, key: str) -> bool:
        """Per-expert keys, stacked expert keys, and every key under HF's block name."""
        if self.layout.per_expert.match(key):
            return True
        renamed = self.layout.to_loom_key(key)
        return renamed != key or _STACKED.match(renamed) is not None

    def convert(self, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        match = self.layout.per_expert.match(key)
        if match is not None:
            return self._buffer(key, match["layer"], int(match["expert"]), match["proj"], tensor)
        renamed = self.layout.to_loom_key(key)
        stacked = _STACKED.match(renamed)
        if stacked is not None:
            return [(renamed, self._stacked_to_loom(key, stacked["proj"], tensor))]
        if renamed == key:
            raise ValueError(f"{type(self).__name__} cannot convert {key!r} (not an expert tensor)")
        return [(renamed, tensor)]  # the block's other tensors (the router), renamed

    def finalize(self) -> None:
        if not self._buffers:
            return
        gate, up, down = self.layout.projs
        lines = []
        for layer, parts in sorted(self._buffers.items()):
            missing = [
                f"{e}.{p}"
                for stacked in ((gate, up), (down,))  # the parts of one stacked tensor
                if any(p in stacked for p, _ in parts)  # begun, never completed
                for p in stacked
                for e in range(self.num_experts)
                if (p, e) not in parts
            ]
            lines.append(
                f"{layer}.{self.layout.block}.experts: missing "
                f"{', '.join(missing[:8])}{' ...' * (len(missing) > 8)}"
            )
        raise ValueError(
            "checkpoint ends with expert tensors that never completed a stacked tensor "
            f"(every expert needs {gate}, {up} and {down}): {'; '.join(lines)}"
        )

    def _buffer(self, key, layer, expert, proj, tensor) -> list[tuple[str, torch.Tensor]]:
        if expert >= self.num_experts:
            raise ValueError(f"{key!r}: expert {expert} but the model has {self.num_experts}")
        down = proj == self.layout.down
        want = (self.hidden, self.inter) if down else (self.inter, self.hidden)
        if tuple(tensor.shape) != want:
            raise ValueError(f"{key!r} has shape {tuple(tensor.shape)}, expected {want}")
        parts = self._buffers.setdefault(layer, {})
        if (proj, expert) in parts:
            raise ValueError(f"{key!r} appears twice in the checkpoint")
        parts[(proj, expert)] = tensor
        return self._flush(layer)

    def _flush(self, layer: str) -> list[tuple[str, torch.Tensor]]:
        parts, out = self._buffers[layer], []
        gate, up, down = self.layout.projs
        experts = range(self.num_experts)
        prefix = f"{layer}.{LOOM_BLOCK}.experts"
        if all((gate, e) in parts and (up, e) in parts for e in experts):
            # E x ([I, H] gate, [I, H] up) -> [E, 2I, H]
            gate_up = torch.stack(
                [torch.cat([parts.pop((gate, e)), parts.pop((up, e))]) for e in experts]
            )
            out.append((f"{prefix}.gate_up_proj", gate_up))
        if all((down, e) in parts for e in experts):
            # E x [H, I] -> [E, H, I]
            out.append(
                (f"{prefix}.down_proj", torch.stack([parts.pop((down, e)) for e in experts]))
            )
        if not parts:
            del self._buffers[layer]
        return out

    def _stacked_to_loom(self, key: str, proj: str, tensor: torch.Tensor) -> torch.Tensor:
        """Dispatch on dim 1: Loom's layout passes through, the transposed one is transposed."""
        e, h = self.num_experts, self.hidden
        i2 = 2 * self.inter if proj == "gate_up_proj" else self.inter
        loom, transposed = (e, i2, h), (e, h, i2)
        if proj == "down_proj":
            loom, transposed = transposed, loom
        if tuple(tensor.shape) == loom:
            return tensor
        if tuple(tensor.shape) == transposed:
            return tensor.transpose(1, 2).contiguous()
        raise ValueError(
            f"{key!r} has shape {tuple(tensor.shape)}: neither Loom's layout {loom} nor the "
            f"transposed layout {transposed} (experts={e}, hidden={h}, intermediate={self.inter})"
        )
