import pytest
import torch
import torch.nn.functional as F

from loom.kernels import dispatch
from loom.kernels.linear_cross_entropy import (
    fused_linear_cross_entropy,
    linear_cross_entropy_reference,
    plan_chunks,
)

TRITON_MODULE = "loom.kernels._linear_cross_entropy_triton"
LAUNCHER = "cross_entropy_loss_and_grad"
BLOCK_LAUNCHER = "cross_entropy_grad_block"
# One pass (the whole batch is one chunk), one pass over chunks (d weight summed over
# them in fp32) and two (token chunks for the loss and d hidden, vocabulary blocks for
# d weight), forced small so that the split ones have several pieces, the last partial.
PASSES = {
    "one": lambda vocab: {},
    "one_chunked": lambda vocab: {"chunk_size": 3},
    "two": lambda vocab: {"chunk_size": 3, "vocab_block": vocab // 3 + 1},
}
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


@pytest.mark.parametrize("passes", list(PASSES))
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(
    triton_spy, triton_device, assert_no_worse, shape, dtype, option, passes
):
    calls = triton_spy(TRITON_MODULE, LAUNCHER, BLOCK_LAUNCHER)
    h, w, labels = _inputs(*shape, dtype, triton_device)
    assert dispatch.choose_backend(h, w, labels) == "triton"
    kwargs = OPTIONS[option]
    split = PASSES[passes](shape[2])
    got = assert_no_worse(
        lambda h, w: fused_linear_cross_entropy(h, w, labels, **kwargs, **split),
        lambda h, w: linear_cross_entropy_reference(h, w, labels, **kwargs),
        (h, w),
        names=("loss", "d_hidden", "d_weight"),
    )
    assert got[0].dtype == torch.float32
    launched = {name for name, _ in calls}
    two_pass = passes == "two"
    assert launched == ({LAUNCHER, BLOCK_LAUNCHER} if two_pass else {LAUNCHER})


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_plain_cross_entropy(triton_device, assert_no_worse, dtype):
    """The contract in plain words: F.cross_entropy(hidden @ W.T, labels, reduction='sum')."""
    h, w, labels = _inputs((29,), 48, 96, dtype, triton_device)
    assert_no_worse(
        lambda h, w: fused_linear_cross_entropy(h, w, labels),
        lambda h, w: F.cross_entropy((h @ w.T).float(), labels, reduction="sum"),
        (h, w),
    )


def test_all_labels_ignored(triton_device):
    h, w, labels = _inputs((8,), 16, 40, torch.float32, triton_device, ignore_every=1)
    for reduction in ("sum", "mean"):
        loss, dh, dw = _loss_and_grads(
            fused_linear_cross_entropy, h, w, labels, reduction=reduction
        )
        assert loss.item() == 0.0
        assert not dh.any() and not dw.any()


def test_chunks_and_blocks_bound_the_logits(triton_spy, triton_device):
    """The kernels only ever see [chunk, vocab] or [tokens, block] logits; the result does
    not depend on the split."""
    calls = triton_spy(TRITON_MODULE, LAUNCHER, BLOCK_LAUNCHER)
    h, w, labels = _inputs((50,), 16, 64, torch.float32, triton_device)
    split = _loss_and_grads(fused_linear_cross_entropy, h, w, labels, chunk_size=16, vocab_block=40)
    shapes = [(name, tuple(args[0].shape)) for name, args in calls]
    chunks = [(LAUNCHER, (16, 64))] * 3 + [(LAUNCHER, (2, 64))]
    assert shapes == [*chunks, (BLOCK_LAUNCHER, (50, 40)), (BLOCK_LAUNCHER, (50, 24))]
    whole = _loss_and_grads(fused_linear_cross_entropy, h, w, labels, chunk_size=64)
    assert len(calls) == 7  # one more launch: a single chunk, no weight pass
    for a, b in zip(split, whole, strict=True):
        torch.testing.assert_close(a, b)


def test_default_plan_holds_about_the_hidden_states():
    qwen3_lm_head = torch.empty(151936, 2048, dtype=torch.bfloat16, device="meta")
    # 64k tokens: hidden is 256 MiB, so blocks of 2048 vocabulary rows (256 MiB); the loss
    # pass, before d weight exists, also takes its 594 MiB: chunks of 2880 tokens (835 MiB
    # of logits, a multiple of 64).
    assert plan_chunks(65536, 2048, qwen3_lm_head) == (2880, 2048)
    # Without d weight there is no weight pass to share the peak with.
    assert plan_chunks(65536, 2048, qwen3_lm_head, needs_dw=False)[0] == 832
    assert plan_chunks(16384, 2048, qwen3_lm_head, needs_dw=False)[0] == 192
    # Logits of at most ONE_PASS_BYTES (2 GiB): one pass, three GEMMs.
    assert plan_chunks(4096, 2048, qwen3_lm_head) == (4096, None)
    # 16k tokens (4.6 GiB of logits, at most ACCUMULATE_BYTES): still one pass, in three
    # equal chunks of at most 2 GiB each (5504 tokens, a multiple of 64).
    assert plan_chunks(16384, 2048, qwen3_lm_head) == (5504, None)
    assert plan_chunks(27648, 2048, qwen3_lm_head) == (6912, None)  # 7.8 GiB: four chunks
    assert plan_chunks(28672, 2048, qwen3_lm_head) == (2432, 2048)  # 8.1 GiB: two passes
    # Short batches with a vast vocabulary: the loss pass takes chunks of 1024 tokens (2 GiB),
    # d weight comes from the weight pass (blocks within the 64 MiB floor), so the 2.1 GiB of
    # logits are never alive beside it.
    lm_head_1m = torch.empty(2**20, 1024, dtype=torch.bfloat16, device="meta")
    assert plan_chunks(1100, 1024, lm_head_1m) == (1024, 30464)
    assert plan_chunks(1100, 1024, lm_head_1m, needs_dw=False) == (64, 30464)
    # Logits that fit the budget (8 MB of 64 MiB): one chunk, one pass.
    small_vocab = torch.empty(1000, 2048, dtype=torch.bfloat16, device="meta")
    assert plan_chunks(4096, 2048, small_vocab) == (4096, None)
    # An explicit chunk without a block is one pass; with a block, two.
    assert plan_chunks(30, 64, small_vocab, chunk_size=30) == (30, None)
    assert plan_chunks(30, 64, small_vocab, chunk_size=8) == (8, None)
    assert plan_chunks(30, 64, small_vocab, chunk_size=30, vocab_block=100) == (30, 100)
    # Never fewer than 64 rows, never more than there are.
    huge_vocab = torch.empty(2**22, 64, dtype=torch.float32, device="meta")
    assert plan_chunks(10_000, 64, huge_vocab, needs_dw=False) == (64, 1664)
    assert plan_chunks(30, 64, huge_vocab)[0] == 30
    assert plan_chunks(16384, 2048, qwen3_lm_head, chunk_size=5, vocab_block=7) == (5, 7)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("passes", list(PASSES))
def test_logits_on_request(triton_device, softcap, passes):
    h, w, labels = _inputs((2, 9), 16, 40, torch.float32, triton_device)
    loss, logits = fused_linear_cross_entropy(
        h, w, labels, softcap=softcap, return_logits=True, **PASSES[passes](40)
    )
    want_loss, want_logits = linear_cross_entropy_reference(
        h, w, labels, softcap=softcap, return_logits=True
    )
    assert logits.shape == (2, 9, 40) and not logits.requires_grad
    torch.testing.assert_close(logits, want_logits)
    torch.testing.assert_close(loss, want_loss)
    loss.backward()  # the gradients are still there
    torch.testing.assert_close(w.grad, torch.autograd.grad(want_loss, w)[0])


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
