"""Qwen3-MoE checkpoints in, and back out, in HF's layout.

HF's layout for ``qwen3_moe`` (checked, not inferred: transformers 5.17's
``conversion_mapping`` aliases ``qwen3_moe`` to ``qwen2_moe``, whose converters merge
``mlp.experts.*.{gate,up}_proj.weight`` into ``gate_up_proj`` and
``mlp.experts.*.down_proj.weight`` into ``down_proj``; ``save_pretrained`` reverts that
by default, so both the Hub checkpoints and v5's own saves hold per-expert keys):

    model.layers.{i}.mlp.experts.{j}.gate_proj.weight  [I, H]
    model.layers.{i}.mlp.experts.{j}.up_proj.weight    [I, H]
    model.layers.{i}.mlp.experts.{j}.down_proj.weight  [H, I]

Loom's (v5's in memory) layout: ``model.layers.{i}.mlp.experts.gate_up_proj``
``[E, 2I, H]`` (gate rows, then up) and ``...experts.down_proj`` ``[E, H, I]``.

``Qwen3MoeConverter`` implements ``loom.dist.loading.TensorConverter``: it buffers the
per-expert tensors of a layer until all ``E`` experts have arrived and then emits the
stacked tensors; already-stacked keys are passed through when they have Loom's layout,
transposed when they have the ``[E, H, 2I]`` / ``[E, I, H]`` layout of checkpoints that
store ``x @ w`` weights, and refused otherwise. ``to_hf`` is the inverse for export.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

_PER_EXPERT = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)
_STACKED = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
_PROJS = ("gate_proj", "up_proj", "down_proj")


class Qwen3MoeConverter:
    """``num_experts``, ``hidden_size`` (H) and ``moe_intermediate_size`` (I) of the model."""

    def __init__(self, num_experts: int, hidden_size: int, moe_intermediate_size: int) -> None:
        self.num_experts = num_experts
        self.hidden = hidden_size
        self.inter = moe_intermediate_size
        self._buffers: dict[str, dict[tuple[str, int], torch.Tensor]] = {}

    @classmethod
    def from_config(cls, config) -> Qwen3MoeConverter:
        """From a flat ``Qwen3MoeConfig`` or a composite config with ``text_config``."""
        text = getattr(config, "text_config", None) or config
        return cls(text.num_experts, text.hidden_size, text.moe_intermediate_size)

    def can_handle(self, key: str) -> bool:
        return bool(_PER_EXPERT.match(key) or _STACKED.match(key))

    def convert(self, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        stacked = _STACKED.match(key)
        if stacked:
            return [(key, self._stacked_to_loom(key, stacked["proj"], tensor))]
        match = _PER_EXPERT.match(key)
        if match is None:
            raise ValueError(f"Qwen3MoeConverter cannot convert {key!r} (not an expert tensor)")
        prefix, expert, proj = match["prefix"], int(match["expert"]), match["proj"]
        if expert >= self.num_experts:
            raise ValueError(f"{key!r}: expert {expert} but the model has {self.num_experts}")
        want = (self.hidden, self.inter) if proj == "down_proj" else (self.inter, self.hidden)
        if tuple(tensor.shape) != want:
            raise ValueError(f"{key!r} has shape {tuple(tensor.shape)}, expected {want}")
        parts = self._buffers.setdefault(prefix, {})
        if (proj, expert) in parts:
            raise ValueError(f"{key!r} appears twice in the checkpoint")
        parts[(proj, expert)] = tensor
        return self._flush(prefix)

    def finalize(self) -> None:
        if self._buffers:
            lines = []
            for prefix, parts in sorted(self._buffers.items()):
                missing = [
                    f"{e}.{p}"
                    for p in _PROJS
                    for e in range(self.num_experts)
                    if (p, e) not in parts
                ]
                lines.append(
                    f"{prefix}: missing {', '.join(missing[:8])}{' ...' * (len(missing) > 8)}"
                )
            raise ValueError(
                "checkpoint ends with expert tensors that never completed a stacked tensor "
                f"(every expert needs gate_proj, up_proj and down_proj): {'; '.join(lines)}"
            )

    def _flush(self, prefix: str) -> list[tuple[str, torch.Tensor]]:
        parts, out = self._buffers[prefix], []
        experts = range(self.num_experts)
        if all(("gate_proj", e) in parts and ("up_proj", e) in parts for e in experts):
            # E x ([I, H] gate, [I, H] up) -> [E, 2I, H]
            gate_up = torch.stack(
                [
                    torch.cat([parts.pop(("gate_proj", e)), parts.pop(("up_proj", e))])
                    for e in experts
                ]
            )
            out.append((f"{prefix}.gate_up_proj", gate_up))
        if all(("down_proj", e) in parts for e in experts):
            # E x [H, I] -> [E, H, I]
            out.append(
                (f"{prefix}.down_proj", torch.stack([parts.pop(("down_proj", e)) for e in experts]))
            )
        if not parts:
            del self._buffers[prefix]
        return out

    def _stacked_to_loom(self, key: str, proj: str, tensor: torch.Tensor) -> torch.Tensor:
        """Dispatch on dim 1: Loom's layout passes through, the transposed one is transposed."""
        e, h, i2 = (
            self.num_experts,
            self.hidden,
            (2 * self.inter if proj == "gate_up_proj" else self.inter),
        )
        loom, transposed = (e, i2, h), (e, h, i2)
        if proj == "down_proj":
            loom, transposed = transposed, loom
        if tuple(tensor.shape) == loom:
            return tensor
        if tuple(tensor.shape) == transposed:
            return tensor.transpose(1, 2).contiguous()
        raise ValueError(
            f"{key!r} has shape {tuple(tensor.shape)}: neither Loom's layout {loom} nor the "
            f"transposed layout {transposed} (experts={e}, hidden={h}, moe_intermediate={self.inter})"
        )


def to_hf(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Loom's state dict (full tensors) in HF's per-expert layout; other keys unchanged.

    The per-expert tensors are contiguous copies (safetensors refuses views that share
    storage)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = _STACKED.match(key)
        if match is None:
            out[key] = tensor
            continue
        prefix = match["prefix"]
        for e, expert in enumerate(tensor.unbind(0)):
            if match["proj"] == "down_proj":
                out[f"{prefix}.{e}.down_proj.weight"] = expert.contiguous()
            else:
                gate, up = expert.chunk(2, dim=0)  # [2I, H] -> 2 x [I, H]
                out[f"{prefix}.{e}.gate_proj.weight"] = gate.contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = up.contiguous()
    return out
