"""Loom's ports train as upstream's classes train (Liger's convergence tests, in fp32).

Each port and its upstream class start from the same weights and take 20 AdamW steps on
packed rows (several samples per row, position ids restarting, labels shifted within
samples), on CPU in fp32: the loss must match upstream's at every step and the final
parameters must be close. The port runs as the trainer runs it (``loom_varlen``
attention, fused experts); upstream runs eager (eager experts for the MoE ports, and
for v4 upstream's state converted to Loom's stacked layout). One-step equivalence
catches a wrong gradient; this catches what only shows over steps (a gradient that
accumulates where it should not, a parameter the optimizer never sees, a buffer or
weight that drifts).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loom.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _grads import assert_tensors_match
from test_models_patch import packed_batch
from test_models_patch import upstream as dense_upstream
from test_moe import CASES, loom_state_dict
from test_moe import upstream as moe_upstream

TOY = Path(__file__).resolve().parents[1] / "toy_config"
DENSE, MOE = ["llama", "qwen2", "qwen3"], list(CASES)
# lr 3e-3: the loss falls by 1-1.5 nats in 20 steps and the curves stay within ~1e-6 of
# upstream's; at 1e-2 the toys' training is chaotic enough to grow fp32 noise past 1e-5
STEPS, LR, WEIGHT_DECAY = 20, 3e-3, 0.01
BATCHES = 4  # packed batches, cycled: each seen 5 times, so the loss really falls
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6
# Adam moves a weight by up to ~lr a step whatever the size of its gradient, so where a
# gradient is ~0, fp32 noise can move single weights apart; a wrong gradient or a skipped
# parameter moves them by ~lr a step. So: every weight within a tenth of one step, and
# each parameter's whole update (final - initial) within 1e-3 of upstream's in norm
PARAM_ATOL, UPDATE_RTOL = LR / 10, 1e-3


def upstream_loss(model, ids, labels, positions) -> torch.Tensor:
    """Upstream's logits, a plain cross-entropy on the already-shifted labels, and (MoE)
    its weighted load-balancing loss, as upstream adds it."""
    out = model(input_ids=ids, position_ids=positions)
    loss = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    if getattr(out, "aux_loss", None) is not None:
        loss = loss + model.config.router_aux_loss_coef * out.aux_loss
    return loss


def port_loss(model, ids, labels, positions) -> torch.Tensor:
    return model(input_ids=ids, position_ids=positions, shift_labels=labels).loss


def adamw(model) -> torch.optim.Optimizer:
    """eps 1e-6, not 1e-8: some gradients are 0 in exact arithmetic (qwen2's k_proj bias
    shifts every score of a query alike, which softmax ignores), and Adam would turn
    their ~1e-9 fp32 noise into steps of size lr in both models, different ones."""
    return torch.optim.AdamW(
        model.parameters(), lr=LR, eps=1e-6, weight_decay=WEIGHT_DECAY, foreach=False
    )


def train(model, loss_fn, vocab: int) -> list[float]:
    """``STEPS`` AdamW steps; returns the losses. A parameter left without a gradient
    gets zeros, as Loom's stacked experts hold for an expert no token chose (v4 upstream
    leaves it None, and AdamW would skip its decay and its moments)."""
    optimizer = adamw(model)
    batches = [packed_batch(vocab, seed=s)[:3] for s in range(BATCHES)]
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, *batches[step % BATCHES])
        loss.backward()
        for param in model.parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        optimizer.step()
        losses.append(loss.item())
    return losses


def assert_trains_as_upstream(model, reference, rename=lambda d: d) -> None:
    initial = rename({n: p.detach().clone() for n, p in reference.named_parameters()})
    vocab = reference.config.vocab_size
    want_losses = train(reference, upstream_loss, vocab)
    got_losses = train(model, port_loss, vocab)
    for step, (g, w) in enumerate(zip(got_losses, want_losses, strict=True)):
        assert abs(g - w) <= LOSS_ATOL + LOSS_RTOL * abs(w), f"step {step}: loss {g}, upstream {w}"
    assert want_losses[-1] < want_losses[0] - 0.5, f"the toy should learn: {want_losses}"
    got = {n: p.detach() for n, p in model.named_parameters()}
    want = rename({n: p.detach() for n, p in reference.named_parameters()})
    assert_tensors_match(got, want, 0.0, PARAM_ATOL, what="parameter after training")
    for name, final in want.items():
        update = (final - initial[name]).norm()
        off = (got[name] - final).norm()
        assert off <= UPDATE_RTOL * update, (
            f"{name}: after training {off:.3e} from upstream's, whose update was {update:.3e}"
        )


@pytest.mark.parametrize("name", DENSE)
def test_dense_port_trains_as_upstream(name):
    reference = dense_upstream(name)
    model = build_model(TOY / f"{name}_toy", attn_implementation="loom_varlen")
    model.load_state_dict(reference.state_dict())
    assert_trains_as_upstream(model, reference)


@pytest.mark.parametrize("name", MOE)
def test_moe_port_trains_as_upstream(name):
    case = CASES[name]
    reference = moe_upstream(case, "eager")
    model = build_model(case.path, attn_implementation="loom_varlen", moe_implementation="fused")
    model.load_state_dict(loom_state_dict(case, reference.state_dict()))
    assert_trains_as_upstream(model, reference, rename=lambda d: loom_state_dict(case, d))
