"""Loom's ports train as upstream's classes train (Liger's convergence tests, in fp32).

Each port and its upstream class start from the same weights and take 20 AdamW steps on
packed rows (several samples per row, position ids restarting, labels shifted within
samples), on CPU in fp32: the loss must match upstream's at every step and the final
parameters must be close. On a GPU in bf16 (marked gpu), each step's loss must be no
further from an fp32 truth than twice upstream bf16's own distance, plus a little. The port runs as the trainer runs it (``loom_varlen``
attention, fused experts); upstream runs eager (eager experts for the MoE ports, and
for v4 upstream's state converted to Loom's stacked layout). One-step equivalence
catches a wrong gradient; this catches what only shows over steps (a gradient that
accumulates where it should not, a parameter the optimizer never sees, a buffer or
weight that drifts).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _grads import assert_tensors_match
from _ports import DENSE, MOE, TOY, params
from test_models_patch import packed_batch
from test_models_patch import upstream as dense_upstream
from test_moe import CASES, loom_state_dict
from test_moe import upstream as moe_upstream

from loom.models import build_model

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
    device = next(model.parameters()).device
    batches = [[t.to(device) for t in packed_batch(vocab, seed=s)[:3]] for s in range(BATCHES)]
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


@pytest.mark.parametrize("name", params(DENSE))
def test_dense_port_trains_as_upstream(name):
    reference = dense_upstream(name)
    model = build_model(TOY / f"{name}_toy", attn_implementation="loom_varlen")
    model.load_state_dict(reference.state_dict())
    assert_trains_as_upstream(model, reference)


@pytest.mark.parametrize("name", params(MOE))
def test_moe_port_trains_as_upstream(name):
    case = CASES[name]
    reference = moe_upstream(case, "eager")
    model = build_model(case.path, attn_implementation="loom_varlen", moe_implementation="fused")
    model.load_state_dict(loom_state_dict(case, reference.state_dict()))
    assert_trains_as_upstream(model, reference, rename=lambda d: loom_state_dict(case, d))


# bf16 rounds a loss of ~5 nats to steps of 0.03: the slack is two of them
BF16_LOSS_SLACK = 0.06


def _references(name: str):
    """Upstream fp32 (the truth) and upstream bf16 on the GPU, from the same bf16-rounded
    weights, and the port's state dict of those weights."""
    if name in CASES:
        truth = moe_upstream(CASES[name], "eager")
        to_port = lambda sd: loom_state_dict(CASES[name], sd)  # noqa: E731
    else:
        truth, to_port = dense_upstream(name), lambda sd: sd
    truth.cuda()
    with torch.no_grad():
        for param in truth.parameters():
            param.copy_(param.to(torch.bfloat16))
    upstream_bf16 = moe_upstream(CASES[name], "eager") if name in CASES else dense_upstream(name)
    upstream_bf16.to("cuda", torch.bfloat16).load_state_dict(truth.state_dict())
    return truth, upstream_bf16, to_port(truth.state_dict())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", params(DENSE + MOE))
def test_bf16_on_gpu_trains_as_upstream(name):
    """The port as the trainer runs it on a GPU (bf16, loom_sdpa, fused kernels and
    experts) against upstream in fp32 and in bf16, 20 AdamW steps each on the same data."""
    truth, upstream_bf16, state = _references(name)
    path = CASES[name].path if name in CASES else TOY / f"{name}_toy"
    extra = {"moe_implementation": "fused"} if name in CASES else {}
    model = build_model(path, attn_implementation="loom_sdpa", dtype=torch.bfloat16, **extra)
    model.load_state_dict(state)
    model.cuda()
    vocab = truth.config.vocab_size
    exact = train(truth, upstream_loss, vocab)
    assert exact[-1] < exact[0] - 0.5, f"the toy should learn: {exact}"
    want = train(upstream_bf16, upstream_loss, vocab)
    got = train(model, port_loss, vocab)
    for step, (g, w, t) in enumerate(zip(got, want, exact, strict=True)):
        assert abs(g - t) <= 2 * abs(w - t) + BF16_LOSS_SLACK, (
            f"step {step}: loss {g}, upstream bf16 {w}, fp32 truth {t}"
        )
