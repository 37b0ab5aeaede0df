"""Each port's generated module really calls loom.kernels.

A port that silently fell back to upstream's code (a patch lost in regeneration, an
import that shadows the fused op) still matches upstream's numbers, so the equivalence
suites cannot see it. Here one forward + backward of each port on packed rows, with the
``loom_varlen`` backend and the fused experts, counts the calls of loom.kernels' entry
points at the names the port's code looks them up by (the generated module's imports,
``loom.models.layers`` for ``LoomRMSNorm``, ``loom.models.loss`` for the fused loss,
``loom.models.experts`` and ``loom.kernels.moe`` for the experts), and requires each op
in every decoder layer where the port patches it.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict

import pytest
import torch
from _ports import CASES, TOY, decoder_layers, params
from _vlm import vlm_batch
from test_models_patch import packed_batch

import loom.kernels
import loom.kernels.moe
import loom.models.attention
import loom.models.experts
import loom.models.layers
import loom.models.loss
from loom.models import build_model
from loom.models.experts import StackedExperts
from loom.models.registry import model_type

OUTSIDE = "outside the decoder layers"


class OpCalls:
    """Calls of each op, by the decoder layer that was running (or ``OUTSIDE``)."""

    def __init__(self) -> None:
        self.layer: int | str = OUTSIDE
        self.calls: dict[str, Counter] = defaultdict(Counter)

    def record(self, op: str) -> None:
        self.calls[op][self.layer] += 1


def call_sites(model) -> list[tuple[object, str]]:
    """(module, name) pairs: where the port's code looks each loom.kernels op up."""
    generated = sys.modules[type(model).__module__]
    sites = [(generated, "apply_rotary"), (loom.models.layers, "rms_norm"),
             (loom.models.loss, "fused_linear_cross_entropy"),
             (loom.models.attention, "varlen_attention")]  # fmt: skip
    if hasattr(generated, "swiglu"):  # a dense MLP (qwen3_moe's mlp_only_layers too)
        sites.append((generated, "swiglu"))
    if any(isinstance(m, StackedExperts) for m in model.modules()):
        sites.append((loom.models.experts, "fused_moe_forward"))
        sites += [(loom.kernels.moe, op) for op in ("permute_tokens", "grouped_mm", "swiglu", "unpermute_tokens")]  # fmt: skip
    return sites


def count_kernel_calls(monkeypatch, model) -> OpCalls:
    """Wrap every call site with a counter (after checking it holds loom.kernels' own
    function) and decoder layers with hooks that say which layer is running."""
    seen = OpCalls()
    for module, op in call_sites(model):
        found = getattr(module, op)
        if found is not getattr(loom.kernels, op):
            raise AssertionError(
                f"{module.__name__}.{op} is {getattr(found, '__qualname__', found)!r}, not "
                f"loom.kernels.{op}: the port computes it without Loom's kernel"
            )

        def counted(*args, _op=op, _fn=found, **kwargs):
            seen.record(_op)
            return _fn(*args, **kwargs)

        monkeypatch.setattr(module, op, counted)
    for index, layer in enumerate(decoder_layers(model)):
        layer.register_forward_pre_hook(lambda *_, i=index: setattr(seen, "layer", i))
        layer.register_forward_hook(lambda *_: setattr(seen, "layer", OUTSIDE))
    return seen


def expected_calls(model) -> dict[str, dict[int | str, int]]:
    """op -> {layer (or OUTSIDE): fewest calls}: what every port of the Llama family
    patches, from the model's own structure."""
    layers = decoder_layers(model)
    every = range(len(layers))
    sparse = [i for i in every if isinstance(getattr(layers[i].mlp, "experts", None), StackedExperts)]  # fmt: skip
    qk_norm = hasattr(layers[0].self_attn, "q_norm")  # qwen3's q_norm / k_norm
    want = {
        "rms_norm": {i: 4 if qk_norm else 2 for i in every} | {OUTSIDE: 1},
        "apply_rotary": {i: 1 for i in every},
        "varlen_attention": {i: 1 for i in every},
        "swiglu": {i: 1 for i in every},  # the dense MLP's or the fused experts'
        "fused_linear_cross_entropy": {OUTSIDE: 1},
    }
    if sparse:
        want["fused_moe_forward"] = {i: 1 for i in sparse}
        want["permute_tokens"] = {i: 1 for i in sparse}
        want["grouped_mm"] = {i: 2 for i in sparse}  # gate_up, then down
        want["unpermute_tokens"] = {i: 1 for i in sparse}
    return want


def assert_kernels_called(seen: OpCalls, want: dict[str, dict[int | str, int]]) -> None:
    missing = [
        f"{op} in layer {where}: {seen.calls[op][where]} calls, at least {n} expected"
        for op, places in want.items()
        for where, n in places.items()
        if seen.calls[op][where] < n
    ]
    if missing:
        raise AssertionError("the port does not call loom.kernels where it patches:\n" + "\n".join(missing))  # fmt: skip


def port(name: str):
    return build_model(
        TOY / f"{name}_toy", attn_implementation="loom_varlen", moe_implementation="fused"
    )


def forward_backward(model) -> torch.Tensor:
    """Packed text rows; for a vision-language port, rows with images."""
    if CASES[model_type(model.config)].vlm:
        batch = vlm_batch(model.config)
        loss = model(**batch.port_inputs(), shift_labels=batch.labels).loss
    else:
        ids, labels, positions, _ = packed_batch(model.config.vocab_size)
        loss = model(input_ids=ids, position_ids=positions, shift_labels=labels).loss
    loss.backward()
    return loss


@pytest.mark.parametrize("name", params(list(CASES)))
def test_port_calls_loom_kernels_in_every_layer(name, monkeypatch):
    model = port(name)
    seen = count_kernel_calls(monkeypatch, model)
    loss = forward_backward(model)
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    assert_kernels_called(seen, expected_calls(model))
