"""Loom's attention backends compute exactly what they are asked, or refuse by name: a
keyword they do not implement would otherwise change the model's math silently."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loom.models.attention import loom_sdpa, loom_varlen


class Attention(nn.Module):
    pass


def qkv(seq=8):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, seq, 4, generator=gen) for _ in range(3)]


@pytest.mark.parametrize("backend", [loom_sdpa, loom_varlen])
@pytest.mark.parametrize(
    "keyword, value",
    [
        ("softcap", 50.0),
        ("s_aux", torch.zeros(2)),
        ("dropout", 0.1),
        ("is_causal", False),
        ("head_mask", torch.ones(2)),
    ],
)
def test_a_feature_the_backend_lacks_is_refused_by_name(backend, keyword, value):
    with pytest.raises(ValueError, match=keyword if keyword != "is_causal" else "causal only"):
        backend(Attention(), *qkv(), None, scaling=0.5, **{keyword: value})


@pytest.mark.parametrize("backend", [loom_sdpa, loom_varlen])
def test_what_it_handles_gives_causal_attention(backend):
    q, k, v = qkv()
    out, _ = backend(
        Attention(), q, k, v, None, scaling=0.5, dropout=0.0, softcap=None, s_aux=None,
        sliding_window=8, use_cache=False, output_attentions=False,
    )  # fmt: skip
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5).transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_a_window_shorter_than_a_sample_is_refused():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="sliding_window=4, but a sample is 8 tokens"):
        loom_sdpa(Attention(), q, k, v, None, scaling=0.5, sliding_window=4)
