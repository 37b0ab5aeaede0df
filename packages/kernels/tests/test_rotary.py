import pytest
import torch

from loom.kernels import dispatch
from loom.kernels.rotary import apply_rotary, apply_rotary_reference

# (batch, q_heads, k_heads, seq, head_dim, rot_dim): one token; GQA; odd heads with
# partial rotary; a head_dim that is not a power of two.
SHAPES = [(1, 2, 1, 1, 8, 8), (2, 4, 2, 5, 16, 16), (1, 3, 3, 7, 24, 12), (2, 2, 1, 3, 20, 20)]
DTYPES = [torch.float32, torch.bfloat16]


def _cos_sin(batch, seq, rot_dim, device):
    # As HF builds them: positions times inverse frequencies, each half repeated.
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, device=device) / rot_dim))
    positions = (
        torch.arange(seq, device=device).float() + torch.arange(batch, device=device)[:, None]
    )
    freqs = positions[..., None] * inv_freq  # [batch, seq, rot/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _qk(batch, q_heads, k_heads, seq, head_dim, dtype, device, unsqueeze_dim):
    def make(heads):
        # HF's projections give [b, s, h, d]; unsqueeze_dim=1 sees its transposed view.
        x = torch.randn(batch, seq, heads, head_dim, device=device).to(dtype)
        x = x.transpose(1, 2) if unsqueeze_dim == 1 else x
        return x.requires_grad_(True)

    return make(q_heads), make(k_heads)


@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(
    triton_spy, triton_device, assert_no_worse, shape, dtype, unsqueeze_dim
):
    calls = triton_spy("loom.kernels._rotary_triton", "rotary")
    batch, q_heads, k_heads, seq, head_dim, rot_dim = shape
    torch.manual_seed(0)
    q, k = _qk(batch, q_heads, k_heads, seq, head_dim, dtype, triton_device, unsqueeze_dim)
    cos, sin = _cos_sin(batch, seq, rot_dim, triton_device)
    assert dispatch.choose_backend(q, k, cos, sin) == "triton"

    def with_layout(fn):
        return lambda q, k, cos, sin: fn(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    assert_no_worse(
        with_layout(apply_rotary),
        with_layout(apply_rotary_reference),
        (q, k, cos, sin),
        names=("q_out", "k_out", "d_q", "d_k"),
    )
    assert [name for name, _ in calls] == ["rotary", "rotary"]  # forward, backward


def test_shared_cos_and_unused_k(triton_device, assert_no_worse):
    """cos/sin as [seq, rot] shared by the batch; a loss that only uses q."""
    q, k = _qk(2, 2, 2, 4, 8, torch.float32, triton_device, 1)
    cos, sin = _cos_sin(1, 4, 8, triton_device)
    assert_no_worse(
        lambda q: apply_rotary(q, k, cos[0], sin[0])[0].sum(),
        lambda q: apply_rotary_reference(q, k, cos[0], sin[0])[0].sum(),
        (q,),
    )


def test_rotation_keeps_norms_and_relative_positions():
    """Independent of the reference: a rotation preserves norms, and <q_m, k_n> depends
    only on m - n."""
    torch.manual_seed(0)
    q_vec, k_vec = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    seq = 6
    q = q_vec.expand(1, 1, seq, 16)
    k = k_vec.expand(1, 1, seq, 16)
    cos, sin = (t.double() for t in _cos_sin(1, seq, 16, "cpu"))
    q_rot, k_rot = apply_rotary_reference(q, k, cos, sin)
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1))
    scores = q_rot[0, 0] @ k_rot[0, 0].T
    torch.testing.assert_close(scores[3, 1], scores[4, 2])
    torch.testing.assert_close(scores[5, 5], scores[0, 0])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"interleaved": True}, NotImplementedError, "interleaved"),
        (
            {"cos": torch.ones(3, 1, 4, 8), "sin": torch.ones(3, 1, 4, 8)},
            NotImplementedError,
            "multimodal",
        ),
        ({"cos": torch.ones(1, 4, 7), "sin": torch.ones(1, 4, 7)}, ValueError, "even rot_dim"),
        ({"k": torch.ones(1, 2, 4, 6)}, ValueError, "must agree"),
        ({"unsqueeze_dim": 3}, ValueError, "unsqueeze_dim"),
    ],
)
def test_unsupported_layouts_are_refused(kwargs, error, match):
    args = {"q": torch.ones(1, 2, 4, 8), "k": torch.ones(1, 1, 4, 8)}
    args["cos"], args["sin"] = torch.ones(1, 4, 8), torch.ones(1, 4, 8)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        apply_rotary(**args)
