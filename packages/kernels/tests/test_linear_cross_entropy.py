import pytest
import torch
import torch.nn.functional as F

from loom.kernels import dispatch
from loom.kernels.linear_cross_entropy import (
    MIN_CHUNK_TOKENS,
    _default_chunk_size,
    fused_linear_cross_entropy,
    linear_cross_entropy_reference,
)

TRITON_MODULE = "loom.kernels._linear_cross_entropy_triton"
LAUNCHER = "cross_entropy_loss_and_grad"
# (tokens, hidden, vocab): a single token; odd sizes with a vocab that is not a power of
# two; a batch dim in front; a vocab spanning two kernel blocks, the second partial.
SHAPES = [((1,), 16, 32), ((37,), 24, 100), ((2, 24), 64, 128), ((4,), 16, 16384 + 37)]
DTYPES = [torch.float32, torch.bfloat16]
OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-3},
    "softcap": {"softcap": 5.0},
    "mean": {"reduction": "mean"},
    "mean_by_count": {"reduction": "mean", "num_items": 1000},
    "combined": {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0, "reduction": "mean"},
}


def _inputs(tokens, hidden, vocab, dtype, device, ignore_every=3):
    torch.manual_seed(0)
    h = torch.randn(*tokens, hidden, device=device).to(dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden, device=device) / hidden**0.5).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, tokens, device=device)
    if ignore_every:
        labels.view(-1)[::ignore_every] = -100
    return h, w, labels


def _loss_and_grads(fn, h, w, labels, **kwargs):
    loss = fn(h, w, labels, **kwargs)
    return (loss, *torch.autograd.grad(loss, (h, w)))


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(triton_spy, triton_device, assert_close, shape, dtype, option):
    calls = triton_spy(TRITON_MODULE, LAUNCHER)
    h, w, labels = _inputs(*shape, dtype, triton_device)
    assert dispatch.choose_backend(h, w, labels) == "triton"
    kwargs = OPTIONS[option]
    got = _loss_and_grads(fused_linear_cross_entropy, h, w, labels, **kwargs)
    want = _loss_and_grads(linear_cross_entropy_reference, h, w, labels, **kwargs)
    assert calls and {name for name, _ in calls} == {LAUNCHER}
    for g, r, name in zip(got, want, ("loss", "d_hidden", "d_weight"), strict=True):
        assert g.dtype == r.dtype, name
        assert_close(g, r, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_plain_cross_entropy(triton_device, assert_close, dtype):
    """The contract in plain words: F.cross_entropy(hidden @ W.T, labels, reduction='sum')."""
    h, w, labels = _inputs((29,), 48, 96, dtype, triton_device)
    got = _loss_and_grads(fused_linear_cross_entropy, h, w, labels)
    want = _loss_and_grads(
        lambda h, w, y: F.cross_entropy((h @ w.T).float(), y, reduction="sum"), h, w, labels
    )
    for g, r in zip(got, want, strict=True):
        assert_close(g, r, dtype)


def test_all_labels_ignored(triton_device):
    h, w, labels = _inputs((8,), 16, 40, torch.float32, triton_device, ignore_every=1)
    for reduction in ("sum", "mean"):
        loss, dh, dw = _loss_and_grads(
            fused_linear_cross_entropy, h, w, labels, reduction=reduction
        )
        assert loss.item() == 0.0
        assert not dh.any() and not dw.any()


def test_chunks_bound_the_logits(triton_spy, triton_device):
    """The kernel only ever sees [chunk, vocab] logits; chunking does not change the result."""
    calls = triton_spy(TRITON_MODULE, LAUNCHER)
    h, w, labels = _inputs((50,), 16, 64, torch.float32, triton_device)
    chunked = _loss_and_grads(fused_linear_cross_entropy, h, w, labels, chunk_size=16)
    assert [tuple(args[0].shape) for _, args in calls] == [(16, 64)] * 3 + [(2, 64)]
    whole = _loss_and_grads(fused_linear_cross_entropy, h, w, labels, chunk_size=64)
    for a, b in zip(chunked, whole, strict=True):
        torch.testing.assert_close(a, b)


def test_default_chunk_follows_the_memory_budget():
    qwen3_lm_head = torch.empty(151936, 2048, dtype=torch.bfloat16, device="meta")
    # 4096 tokens: their bf16 logits are no larger than the fp32 [vocab, hidden] buffer
    # that several chunks would accumulate d weight into, so one chunk.
    assert _default_chunk_size(4096, 2048, qwen3_lm_head, needs_dw=True) == 4096
    # Beyond that, about 1 GiB of logits: 2048 tokens (622 MB), a power of two.
    assert _default_chunk_size(16384, 2048, qwen3_lm_head, needs_dw=True) == 2048
    assert _default_chunk_size(4096, 2048, qwen3_lm_head, needs_dw=False) == 2048
    assert _default_chunk_size(1500, 2048, qwen3_lm_head, needs_dw=False) == 1500
    huge_vocab = torch.empty(2**22, 64, dtype=torch.float32, device="meta")
    assert _default_chunk_size(10_000, 64, huge_vocab, needs_dw=True) == MIN_CHUNK_TOKENS


def test_grad_output_scales_and_no_grad(triton_device):
    h, w, labels = _inputs((12,), 16, 32, torch.float32, triton_device)
    (3.0 * fused_linear_cross_entropy(h, w, labels)).backward()
    dh, dw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    (3.0 * linear_cross_entropy_reference(h, w, labels)).backward()
    torch.testing.assert_close(dh, h.grad)
    torch.testing.assert_close(dw, w.grad)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(h, w, labels)
    torch.testing.assert_close(loss, linear_cross_entropy_reference(h, w, labels).detach())


def test_second_backward_is_refused(triton_device):
    h, w, labels = _inputs((4,), 16, 32, torch.float32, triton_device)
    loss = fused_linear_cross_entropy(h, w, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight": torch.randn(32, 15)}, "weight must be"),
        ({"labels": torch.zeros(5, dtype=torch.long)}, "labels"),
        ({"labels": torch.zeros(4)}, "integer"),
        ({"reduction": "max"}, "reduction"),
        ({"num_items": 3}, "only used with 'mean'"),
    ],
)
def test_bad_inputs_name_the_tensor(kwargs, match):
    args = {"hidden": torch.randn(4, 16), "weight": torch.randn(32, 16)}
    args["labels"] = torch.zeros(4, dtype=torch.long)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy(**args, backend="torch")
