"""Loom's models compute what upstream HF computes.

For each toy config: one forward + backward on the same random weights and packed rows
(several samples per row, position ids restarting) for every attention backend, HF's
and Loom's; loss and grad norm must match upstream HF eager within fp32 tolerances.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from loom.models import build_model

TOY = Path(__file__).resolve().parents[1] / "toy_config"
MODELS = ["llama", "qwen2", "qwen3"]
BACKENDS = ["eager", "sdpa", "loom_sdpa", "loom_varlen"]
RTOL, ATOL = 1e-5, 1e-6  # fp32 on CPU


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


def loss_and_grad_norm(model, ids, labels, positions):
    """Upstream: its logits and a plain cross-entropy. A Loom port: its own fused loss
    from already-shifted labels (no logits are made)."""
    model.zero_grad(set_to_none=True)
    if getattr(model, "loom_port", False):
        out = model(input_ids=ids, position_ids=positions, shift_labels=labels)
        assert out.logits is None
        loss = out.loss
    else:
        logits = model(input_ids=ids, position_ids=positions).logits
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None))
    return loss.detach(), norm


def upstream(name: str):
    config = AutoConfig.from_pretrained(TOY / f"{name}_toy")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_matches_upstream(name, backend):
    reference = upstream(name)
    model = build_model(TOY / f"{name}_toy", attn_implementation=backend)
    model.load_state_dict(reference.state_dict())
    ids, labels, positions, _ = packed_batch(reference.config.vocab_size)
    want = loss_and_grad_norm(reference, ids, labels, positions)
    got = loss_and_grad_norm(model, ids, labels, positions)
    torch.testing.assert_close(got[0], want[0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got[1], want[1], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", MODELS)
def test_hf_style_labels_match_upstream_loss(name):
    reference = upstream(name)
    model = build_model(TOY / f"{name}_toy", attn_implementation="eager")
    assert model.loom_port and type(model).__module__.startswith(f"loom.models.{name}.generated")
    model.load_state_dict(reference.state_dict())
    ids = torch.randint(
        0, reference.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1)
    )
    want = reference(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, want, rtol=RTOL, atol=ATOL)
    with torch.no_grad():  # without labels the port returns upstream's logits
        torch.testing.assert_close(
            model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=RTOL, atol=ATOL
        )


@pytest.mark.parametrize("backend", ["loom_sdpa", "loom_varlen"])
@pytest.mark.parametrize("name", MODELS)
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["sdpa", "loom_sdpa", "loom_varlen"])
@pytest.mark.parametrize("name", MODELS)
def test_bf16_on_gpu_matches_upstream(name, backend):
    """bf16 on the GPU, the fused kernels' path: within bf16 tolerances of upstream."""
    reference = upstream(name).to("cuda", torch.bfloat16)
    model = build_model(TOY / f"{name}_toy", attn_implementation=backend, dtype=torch.bfloat16)
    model.load_state_dict(reference.state_dict())
    model.cuda()
    batch = [t.cuda() for t in packed_batch(reference.config.vocab_size)[:3]]
    want = loss_and_grad_norm(reference, *batch)
    got = loss_and_grad_norm(model, *batch)
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[1].float(), want[1].float(), rtol=5e-2, atol=5e-2)
