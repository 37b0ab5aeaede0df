"""The dispatch rule under torch.compile: every op asks it on every call, so Dynamo traces
it; it must trace quietly (a ``functools.cache``'d check draws one warning per call site)."""

import warnings

import pytest
import torch

from loom.kernels import dispatch
from loom.kernels.attention import varlen_attention


def _compile_warnings(fn, *args) -> list[str]:
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(fn, backend="eager", fullgraph=True)(*args)
    return [str(w.message) for w in caught]


def test_availability_checks_trace_without_warnings():
    def ask_everything(x):
        found = (
            dispatch.triton_available(),
            dispatch.flash_attn_available(),
            dispatch.torch_varlen_available(),
        )
        return x + sum(found)

    x = torch.ones(3)
    messages = _compile_warnings(ask_everything, x)
    assert not [m for m in messages if "lru_cache" in m], messages
    assert dispatch.choose_backend(x) in ("triton", "torch")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_cuda_attention_without_warnings():
    q, k, v = (torch.randn(64, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, 20, 64], device="cuda", dtype=torch.int32)
    messages = _compile_warnings(lambda q, k, v: varlen_attention(q, k, v, cu, 44), q, k, v)
    assert not [m for m in messages if "lru_cache" in m], messages
