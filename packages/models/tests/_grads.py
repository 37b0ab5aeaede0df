"""Per-parameter comparison of two models' gradients (or weights), by name: what the
equivalence, convergence and broken-port suites share. Imported by name: pytest's
``pythonpath`` setting (pyproject.toml) puts this folder on the path."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Tensors = dict[str, torch.Tensor]


def grads_by_name(model: nn.Module) -> Tensors:
    """``{name: grad}`` of every parameter; a parameter without a gradient gives zeros
    (upstream's v4 MoE loop leaves unrouted experts' ``.grad`` None where Loom's stacked
    tensor holds zeros: the same gradient)."""
    return {
        name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach()
        for name, p in model.named_parameters()
    }


def convert_all(converter, tensors: Tensors) -> Tensors:
    """HF state dict -> Loom's: the converter's keys converted, the others as they are."""
    out = {k: v for k, v in tensors.items() if not converter.can_handle(k)}
    for key, tensor in tensors.items():
        if converter.can_handle(key):
            out.update(converter.convert(key, tensor))
    converter.finalize()
    return out


def assert_tensors_match(
    got: Tensors, want: Tensors, rtol: float, atol: float, what: str = "gradient"
) -> None:
    """Every tensor of ``got`` against ``want``'s of the same name (``torch.isclose``
    elementwise); raises AssertionError naming the first that differs, with its max
    absolute and relative difference, or the names only one side has."""
    if set(got) != set(want):
        raise AssertionError(
            f"{what}s of different parameters: only the port has {sorted(set(got) - set(want))}, "
            f"only upstream has {sorted(set(want) - set(got))}"
        )
    for name, g in got.items():
        w = want[name]
        if g.shape != w.shape:
            raise AssertionError(
                f"{name}: {what} shape {tuple(g.shape)}, upstream's {tuple(w.shape)}"
            )
        g, w = g.detach().float(), w.detach().float()
        if torch.isclose(g, w, rtol=rtol, atol=atol).all():
            continue
        diff = (g - w).abs()
        rel = diff / w.abs().clamp(min=atol)
        worst = torch.unravel_index(diff.argmax(), diff.shape)
        raise AssertionError(
            f"{name}: {what} differs from upstream's (rtol={rtol}, atol={atol}): max abs "
            f"difference {diff.max().item():.3e} at {tuple(int(i) for i in worst)}, max rel "
            f"difference {rel.max().item():.3e}, "
            f"{int((~torch.isclose(g, w, rtol=rtol, atol=atol)).sum())} of {g.numel()} elements off"
        )


def assert_grads_match(
    got_model: nn.Module,
    want_model: nn.Module,
    rtol: float,
    atol: float,
    rename: Callable[[Tensors], Tensors] | None = None,
) -> None:
    """Each parameter's gradient of ``got_model`` (a port) against ``want_model``'s
    (upstream), by name; ``rename`` maps upstream's ``{name: grad}`` to the port's names
    and layout (the MoE ports: the checkpoint converter, which stacks v4's per-expert
    tensors, applied to the gradients as to the weights: both are linear maps)."""
    want = grads_by_name(want_model)
    assert_tensors_match(grads_by_name(got_model), rename(want) if rename else want, rtol, atol)
