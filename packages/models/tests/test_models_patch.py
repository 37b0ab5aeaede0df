"""Loom's models compute what upstream HF computes.

For each toy config: one forward + backward on the same random weights and packed rows
(several samples per row, position ids restarting) for every attention backend, HF's
and Loom's; the loss and every parameter's gradient, by name, must match upstream HF
eager within fp32 tolerances. On the GPU in bf16, each parameter's gradient must be no
further from an fp32 truth than upstream's own bf16 gradient is (twice, plus a little).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from _grads import assert_grads_match, grads_by_name
from _ports import CASES, DENSE, TOY, backend_params, params
from transformers import AutoConfig, AutoModelForCausalLM

from loom.models import build_model

RTOL, ATOL = 1e-5, 1e-6  # fp32 on CPU, where a case does not say otherwise
# bf16 test: weights ~ N(0, 0.2) give logits of std ~1.6 and a loss ~1 nat above
# ln(vocab) (0.02, the toys' own, gives ln(vocab) whatever the model computes)
BF16_INIT_STD = 0.2


def packed_batch(vocab: int, lengths=((5, 9, 2), (16,)), seed: int = 0):
    """Two rows of 16 tokens: three samples, then one; labels shifted within samples."""
    gen = torch.Generator().manual_seed(seed)
    ids, labels, positions = [], [], []
    for row in lengths:
        samples = [torch.randint(0, vocab, (n,), generator=gen) for n in row]
        ids.append(torch.cat(samples))
        labels.append(torch.cat([torch.cat([s[1:], torch.tensor([-100])]) for s in samples]))
        positions.append(torch.cat([torch.arange(n) for n in row]))
    return torch.stack(ids), torch.stack(labels), torch.stack(positions), lengths


def loss_and_backward(model, ids, labels, positions):
    """Upstream: its logits and a plain cross-entropy. A Loom port: its own fused loss
    from already-shifted labels (no logits are made). Leaves the gradients in ``.grad``."""
    model.zero_grad(set_to_none=True)
    if getattr(model, "loom_port", False):
        out = model(input_ids=ids, position_ids=positions, shift_labels=labels)
        assert out.logits is None
        loss = out.loss
    else:
        logits = model(input_ids=ids, position_ids=positions).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    loss.backward()
    return loss.detach()


def upstream(name: str, init_std: float | None = None):
    config = AutoConfig.from_pretrained(TOY / f"{name}_toy")
    if init_std is not None:
        config.initializer_range = init_std
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


@pytest.mark.parametrize(("name", "backend"), backend_params(DENSE))
def test_forward_backward_matches_upstream(name, backend):
    reference = upstream(name)
    model = build_model(TOY / f"{name}_toy", attn_implementation=backend)
    model.load_state_dict(reference.state_dict())
    ids, labels, positions, _ = packed_batch(reference.config.vocab_size)
    want = loss_and_backward(reference, ids, labels, positions)
    got = loss_and_backward(model, ids, labels, positions)
    rtol, atol = CASES[name].rtol, CASES[name].atol
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    assert_grads_match(model, reference, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", params(DENSE))
def test_hf_style_labels_match_upstream_loss(name):
    reference = upstream(name)
    model = build_model(TOY / f"{name}_toy", attn_implementation="eager")
    assert model.loom_port and type(model).__module__.startswith(f"loom.models.{name}.generated")
    model.load_state_dict(reference.state_dict())
    ids = torch.randint(
        0, reference.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1)
    )
    want = reference(input_ids=ids, labels=ids).loss
    got = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    want.backward()
    got.backward()
    assert_grads_match(model, reference, rtol=RTOL, atol=ATOL)
    with torch.no_grad():  # without labels the port returns upstream's logits
        torch.testing.assert_close(
            model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=RTOL, atol=ATOL
        )


@pytest.mark.parametrize(("name", "backend"), backend_params(DENSE, ("loom_sdpa", "loom_varlen")))
def test_packed_rows_equal_separate_samples(name, backend):
    model = build_model(TOY / f"{name}_toy", attn_implementation=backend)
    ids, _, positions, lengths = packed_batch(model.config.vocab_size)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions).logits
        start = 0
        for n in lengths[0]:
            alone = model(input_ids=ids[:1, start : start + n]).logits
            torch.testing.assert_close(packed[:1, start : start + n], alone, rtol=RTOL, atol=ATOL)
            start += n


@pytest.mark.parametrize("name", params(DENSE))
def test_bf16_init_is_far_from_uniform(name):
    """The premise of the bf16 test, checked on CPU in fp32: with its init the loss is
    far from ln(vocab), so a port that computed the wrong thing would show in it."""
    reference = upstream(name, init_std=BF16_INIT_STD)
    ids, labels, positions, _ = packed_batch(reference.config.vocab_size)
    with torch.no_grad():
        logits = reference(input_ids=ids, position_ids=positions).logits
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert abs(loss.item() - math.log(reference.config.vocab_size)) > 0.5, loss.item()


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("name", "backend"), backend_params(DENSE, ("sdpa", "loom_sdpa", "loom_varlen"))
)
def test_bf16_on_gpu_matches_upstream(name, backend):
    """bf16 on the GPU, the fused kernels' path, against an fp32 truth (upstream eager in
    fp32 on the same bf16-rounded weights), held to the accuracy of upstream's own bf16:
    the loss and each parameter's gradient no further from the truth than twice
    upstream bf16's error, plus a small slack (the fused kernels round once where
    upstream rounds twice, so they are usually closer)."""
    truth_model = upstream(name, init_std=BF16_INIT_STD).cuda()
    with torch.no_grad():  # the bf16 runs and the truth start from the same numbers
        for param in truth_model.parameters():
            param.copy_(param.to(torch.bfloat16))
    reference = upstream(name, init_std=BF16_INIT_STD).to("cuda", torch.bfloat16)
    reference.load_state_dict(truth_model.state_dict())
    model = build_model(TOY / f"{name}_toy", attn_implementation=backend, dtype=torch.bfloat16)
    model.load_state_dict(reference.state_dict())
    model.cuda()
    batch = [t.cuda() for t in packed_batch(reference.config.vocab_size)[:3]]
    truth_loss = loss_and_backward(truth_model, *batch)
    assert abs(truth_loss.item() - math.log(reference.config.vocab_size)) > 0.5
    want_loss = loss_and_backward(reference, *batch)
    got_loss = loss_and_backward(model, *batch)
    loss_err, want_loss_err = (abs(x.float().item() - truth_loss.item()) for x in (got_loss, want_loss))  # fmt: skip
    assert loss_err <= 2 * want_loss_err + 1e-2, (got_loss, want_loss, truth_loss)
    truth, want, got = grads_by_name(truth_model), grads_by_name(reference), grads_by_name(model)
    assert set(got) == set(truth)
    for param_name, exact in truth.items():
        err, upstream_err = _rel_err(got[param_name], exact), _rel_err(want[param_name], exact)
        assert err < 5e-2, f"{param_name}: bf16 gradient's relative error {err:.2e} against fp32"
        assert err <= 2 * upstream_err + 2e-3, (
            f"{param_name}: bf16 gradient's relative error {err:.2e} against fp32, upstream "
            f"bf16's {upstream_err:.2e}"
        )


@pytest.mark.parametrize(("name", "backend"), backend_params(DENSE, ("loom_sdpa", "loom_varlen")))
def test_rows_without_positions_match_upstream(name, backend):
    """A plain call with three rows and no position_ids (HF then makes one row of
    positions for all): each row is its own sample, as upstream computes it."""
    reference = upstream(name)
    model = build_model(TOY / f"{name}_toy", attn_implementation=backend)
    model.load_state_dict(reference.state_dict())
    ids = torch.randint(0, reference.config.vocab_size, (3, 10), generator=torch.Generator())
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=RTOL, atol=1e-5
        )
