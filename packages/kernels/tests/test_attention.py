import pytest
import torch
import torch.nn.functional as F

from loom.kernels import dispatch
from loom.kernels.attention import varlen_attention, varlen_attention_reference

DTYPES = [torch.float32, torch.bfloat16]
# Sequence lengths packed into one row: single tokens; unequal lengths.
LENGTHS = [[1], [3, 1, 4], [5, 8, 2, 1]]


def _packed(lengths, q_heads, kv_heads, head_dim, dtype, device="cpu"):
    torch.manual_seed(0)
    tokens = sum(lengths)
    q = torch.randn(tokens, q_heads, head_dim, device=device).to(dtype).requires_grad_(True)
    k = torch.randn(tokens, kv_heads, head_dim, device=device).to(dtype).requires_grad_(True)
    v = torch.randn(tokens, kv_heads, head_dim, device=device).to(dtype).requires_grad_(True)
    cu = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
    return q, k, v, cu


def _fwd_bwd(fn, q, k, v, cu, max_seqlen, **kwargs):
    out = fn(q, k, v, cu, max_seqlen, **kwargs)
    torch.manual_seed(1)
    dout = torch.randn(out.shape, device=out.device).to(out.dtype)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def _reference(q, k, v, cu, max_seqlen, **kwargs):
    return varlen_attention_reference(q, k, v, cu, **kwargs)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_sdpa_matches_reference(assert_close, lengths, dtype, heads, causal):
    q, k, v, cu = _packed(lengths, *heads, 16, dtype)
    kwargs = {"causal": causal, "scale": 0.3 if causal else None}
    got = _fwd_bwd(varlen_attention, q, k, v, cu, max(lengths), backend="sdpa", **kwargs)
    want = _fwd_bwd(_reference, q, k, v, cu, max(lengths), **kwargs)
    for g, r in zip(got, want, strict=True):
        assert g.shape == r.shape and g.dtype == r.dtype
        assert_close(g, r, dtype)


def test_reference_matches_per_sequence_sdpa():
    """The reference against torch's own attention run one sequence at a time."""
    q, k, v, cu = _packed([3, 5], 2, 2, 8, torch.float64)
    got = varlen_attention_reference(q, k, v, cu)
    want = torch.cat(
        [
            F.scaled_dot_product_attention(
                *(t[s:e].transpose(0, 1) for t in (q, k, v)), is_causal=True
            ).transpose(0, 1)
            for s, e in ((0, 3), (3, 8))
        ]
    )
    torch.testing.assert_close(got, want)


def test_auto_backend_on_cpu_is_sdpa(monkeypatch):
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    q = torch.randn(4, 2, 8)
    assert dispatch.choose_attention_backend(q) == "sdpa"
    monkeypatch.setenv(dispatch.BACKEND_ENV, "torch")
    assert dispatch.choose_attention_backend(q) == "torch"
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")  # forces Triton ops; attention: auto
    assert dispatch.choose_attention_backend(q) == "sdpa"
    with pytest.raises(RuntimeError, match="needs CUDA"):
        dispatch.choose_attention_backend(q, "varlen")


def test_bad_inputs_are_named():
    q, k, v, cu = _packed([2, 2], 3, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        varlen_attention(q, k, v, cu, 2)
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen_attention(q[:, :2], k, v, cu.float(), 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flash_attn", "varlen", "sdpa"])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_cuda_backends_match_reference(assert_close, backend, heads):
    available = {
        "flash_attn": dispatch.flash_attn_available(),
        "varlen": dispatch.torch_varlen_available(),
        "sdpa": True,
    }
    if not available[backend]:
        pytest.skip(f"{backend} is not installed")
    lengths = [100, 1, 300, 57]
    q, k, v, cu = _packed(lengths, *heads, 64, torch.bfloat16, device="cuda")
    got = _fwd_bwd(varlen_attention, q, k, v, cu, max(lengths), backend=backend)
    want = _fwd_bwd(_reference, q, k, v, cu, max(lengths))
    for g, r in zip(got, want, strict=True):
        assert_close(g, r, torch.bfloat16, scale=2.0)
