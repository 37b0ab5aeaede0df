"""Loom's Qwen3-MoE port computes what upstream HF computes, on one process and under
expert parallelism, and reads and writes HF's checkpoints.

- eager and fused experts vs upstream HF v5 (its eager experts and its default
  experts implementation): loss, aux loss, router logits, grad norm (CPU fp32, tight);
- ep 1, 2 and 4 on gloo (experts ``Shard(0)`` over the ep mesh, FSDP2 over the dense
  and expert meshes, the loss scaled as the trainer scales it) give the single-process
  loss, every gradient and the clipped-norm of the port;
- the checkpoint converter: stacking, pass-through, transpose, refusals, round trip;
  a checkpoint written by upstream's ``save_pretrained`` (sharded, per-expert keys)
  loads under ep 2 and gives upstream's logits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from loom.models import build_model
from loom.models.expert_plan import EXPERT_PLAN, expert_modules
from loom.models.experts import StackedExperts
from loom.models.qwen3_moe.converter import Qwen3MoeConverter, to_hf

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "packages" / "core-dist" / "tests"))
from _dist_harness import assert_close, run_distributed  # noqa: E402

TOY = ROOT / "tests" / "toy_config" / "qwen3_moe_toy"
RTOL, ATOL = 1e-5, 1e-6  # fp32 on CPU
E, TOP_K, INTER, HIDDEN = 8, 3, 20, 48  # the toy's, pairwise distinct (with 2 * INTER)
WORLD = 4
# The port is generated for transformers v5 only so far; the converter tests run on both.
v5_only = pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5, reason="qwen3_moe port: v5 only"
)


def batch(seed: int, rows: int = 2, seq: int = 16):
    """Token ids and already-shifted labels (-100 at each row's end)."""
    ids = torch.randint(0, 256, (rows, seq), generator=torch.Generator().manual_seed(seed))
    labels = torch.cat([ids[:, 1:], torch.full((rows, 1), -100)], dim=1)
    return ids, labels


def upstream(experts_implementation: str | None = "eager"):
    config = AutoConfig.from_pretrained(TOY)
    torch.manual_seed(0)
    kwargs = {"experts_implementation": experts_implementation} if experts_implementation else {}
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager", **kwargs)


def port(moe_implementation: str, state_dict=None):
    model = build_model(TOY, attn_implementation="eager", moe_implementation=moe_implementation)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def grad_norm(model) -> torch.Tensor:
    return torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None))


def step(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    return out, grad_norm(model)


@pytest.fixture(scope="module")
def reference():
    return upstream("eager")


@v5_only
@pytest.mark.parametrize("upstream_experts", ["eager", None], ids=["hf-eager", "hf-default"])
@pytest.mark.parametrize("moe", ["eager", "fused"])
def test_forward_backward_matches_upstream(reference, moe, upstream_experts):
    hf = reference if upstream_experts == "eager" else upstream(None)
    model = port(moe, hf.state_dict())
    assert isinstance(model.model.layers[0].mlp.experts, StackedExperts)
    ids, _ = batch(0)
    want, want_norm = step(hf, ids, ids)  # HF-style labels, shifted inside
    got, got_norm = step(model, ids, ids)
    assert got.logits is None and isinstance(got.aux_loss, torch.Tensor)
    torch.testing.assert_close(got.loss, want.loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=RTOL, atol=ATOL)
    assert len(got.router_logits) == len(want.router_logits) == 2  # layer 1 is dense
    for g, w in zip(got.router_logits, want.router_logits, strict=True):
        torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got_norm, want_norm, rtol=RTOL, atol=ATOL)


@v5_only
def test_shift_labels_and_no_labels(reference):
    model = port("fused", reference.state_dict())
    ids, labels = batch(1)
    with torch.no_grad():
        want = reference(input_ids=ids, labels=ids)
        got = model(input_ids=ids, shift_labels=labels)
        torch.testing.assert_close(got.loss, want.loss, rtol=RTOL, atol=ATOL)
        summed = model(input_ids=ids, shift_labels=labels, num_items_in_batch=1).loss
        ce_sum = (want.loss - 0.1 * want.aux_loss) * (labels != -100).sum()
        torch.testing.assert_close(summed, ce_sum + 0.1 * want.aux_loss, rtol=RTOL, atol=1e-4)
        logits = model(input_ids=ids).logits  # without labels: upstream's logits
        torch.testing.assert_close(logits, reference(input_ids=ids).logits, rtol=RTOL, atol=ATOL)
        # no router logits: the upstream helper's int 0 must not reach the loss
        plain = model(input_ids=ids, shift_labels=labels, output_router_logits=False)
        assert plain.aux_loss is None
        torch.testing.assert_close(
            plain.loss, want.loss - 0.1 * want.aux_loss, rtol=RTOL, atol=ATOL
        )


@v5_only
def test_init_weights_and_bad_implementation():
    model = build_model(TOY, moe_implementation="fused")  # random init through _init_weights
    experts = model.model.layers[2].mlp.experts
    assert experts.gate_up_proj.shape == (E, 2 * INTER, HIDDEN)
    assert experts.down_proj.shape == (E, HIDDEN, INTER)
    for param in (experts.gate_up_proj, experts.down_proj):
        assert torch.isfinite(param).all()
        assert abs(float(param.detach().std()) - 0.02) < 0.002
        assert abs(float(param.detach().mean())) < 0.002
    with pytest.raises(ValueError, match="moe_implementation 'grouped'"):
        build_model(TOY, moe_implementation="grouped")


# ---------------------------------------------------------------- converter


def hf_expert_tensors(prefix: str = "model.layers.0.mlp.experts", dtype=torch.float32):
    gen = torch.Generator().manual_seed(3)
    out = {}
    for e in range(E):
        out[f"{prefix}.{e}.gate_proj.weight"] = torch.randn(INTER, HIDDEN, generator=gen)
        out[f"{prefix}.{e}.up_proj.weight"] = torch.randn(INTER, HIDDEN, generator=gen)
        out[f"{prefix}.{e}.down_proj.weight"] = torch.randn(HIDDEN, INTER, generator=gen)
    return {k: v.to(dtype) for k, v in out.items()}


def convert_all(converter, tensors):
    out = {}
    for key, tensor in tensors.items():
        out.update(converter.convert(key, tensor))
    converter.finalize()
    return out


def test_converter_stacks_per_expert_keys():
    converter = Qwen3MoeConverter(E, HIDDEN, INTER)
    p = "model.layers.0.mlp.experts"
    assert converter.can_handle(f"{p}.7.gate_proj.weight")
    assert converter.can_handle(f"{p}.gate_up_proj") and converter.can_handle(f"{p}.down_proj")
    assert not converter.can_handle("model.layers.1.mlp.gate_proj.weight")  # dense MLP
    assert not converter.can_handle("model.layers.0.mlp.gate.weight")  # router
    assert not converter.can_handle("model.layers.0.self_attn.q_proj.weight")
    hf = hf_expert_tensors()
    last = [f"{p}.{E - 1}.gate_proj.weight", f"{p}.{E - 1}.down_proj.weight"]
    # buffered until every expert's part of a stacked tensor has arrived
    assert all(converter.convert(k, t) == [] for k, t in hf.items() if k not in last)
    (gate_up,) = converter.convert(last[0], hf[last[0]])
    (down,) = converter.convert(last[1], hf[last[1]])
    out = dict([gate_up, down])
    converter.finalize()
    assert set(out) == {f"{p}.gate_up_proj", f"{p}.down_proj"}
    assert out[f"{p}.gate_up_proj"].shape == (E, 2 * INTER, HIDDEN)
    assert out[f"{p}.down_proj"].shape == (E, HIDDEN, INTER)
    for e in range(E):
        assert torch.equal(out[f"{p}.gate_up_proj"][e, :INTER], hf[f"{p}.{e}.gate_proj.weight"])
        assert torch.equal(out[f"{p}.gate_up_proj"][e, INTER:], hf[f"{p}.{e}.up_proj.weight"])
        assert torch.equal(out[f"{p}.down_proj"][e], hf[f"{p}.{e}.down_proj.weight"])


def test_converter_stacked_keys_pass_through_or_transpose_or_fail():
    converter = Qwen3MoeConverter(E, HIDDEN, INTER)
    p = "model.layers.2.mlp.experts"
    gate_up, down = torch.randn(E, 2 * INTER, HIDDEN), torch.randn(E, HIDDEN, INTER)
    assert converter.convert(f"{p}.gate_up_proj", gate_up)[0][1] is gate_up  # Loom's layout
    assert converter.convert(f"{p}.down_proj", down)[0][1] is down
    ((_, t),) = converter.convert(f"{p}.gate_up_proj", gate_up.transpose(1, 2).contiguous())
    assert torch.equal(t, gate_up)
    ((_, t),) = converter.convert(f"{p}.down_proj", down.transpose(1, 2).contiguous())
    assert torch.equal(t, down)
    for key, shape in (
        (f"{p}.gate_up_proj", (E, INTER, HIDDEN)),
        (f"{p}.down_proj", (E, INTER, INTER)),
    ):
        with pytest.raises(ValueError, match="neither Loom's layout"):
            converter.convert(key, torch.zeros(shape))
    with pytest.raises(ValueError, match="expected"):
        converter.convert(f"{p}.0.gate_proj.weight", torch.zeros(HIDDEN, INTER))  # transposed
    converter.finalize()


def test_converter_finalize_raises_on_unflushed_experts():
    converter = Qwen3MoeConverter(E, HIDDEN, INTER)
    hf = hf_expert_tensors()
    hf.pop("model.layers.0.mlp.experts.5.up_proj.weight")
    for key, tensor in hf.items():
        converter.convert(key, tensor)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.experts: missing 5.up_proj"):
        converter.finalize()


def test_converter_from_flat_and_nested_config():
    flat = SimpleNamespace(num_experts=E, hidden_size=HIDDEN, moe_intermediate_size=INTER)
    for config in (flat, SimpleNamespace(text_config=flat), AutoConfig.from_pretrained(TOY)):
        c = Qwen3MoeConverter.from_config(config)
        assert (c.num_experts, c.hidden, c.inter) == (E, HIDDEN, INTER)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_hf_loom_hf_is_byte_identical(dtype):
    hf = hf_expert_tensors(dtype=dtype) | hf_expert_tensors("model.layers.2.mlp.experts", dtype)
    hf["model.layers.0.mlp.gate.weight"] = torch.randn(E, HIDDEN).to(dtype)
    converter = Qwen3MoeConverter(E, HIDDEN, INTER)
    loom = {k: v for k, v in hf.items() if not converter.can_handle(k)}
    loom |= convert_all(converter, {k: v for k, v in hf.items() if converter.can_handle(k)})
    back = to_hf(loom)
    assert set(back) == set(hf)
    for key, tensor in hf.items():
        assert back[key].dtype == tensor.dtype and back[key].shape == tensor.shape
        assert back[key].contiguous().view(torch.uint8).equal(tensor.view(torch.uint8)), key


# ---------------------------------------------------------------- expert parallelism


def _loss_scaled_as_trainer(model, ids, labels, loss_tokens: int, fsdp_size: int):
    """Summed token loss over ``loss_tokens / fsdp_size`` plus the aux term: FSDP's
    average over ranks then gives the gradient of the global token mean (+ the mean
    over ranks of the coefficient times each rank's aux loss)."""
    return model(
        input_ids=ids, shift_labels=labels, num_items_in_batch=loss_tokens / fsdp_size
    ).loss


def _expected_ep_results(state_dict, loss_tokens):
    """One process, no parallelism: the sum over ranks' batches of what each rank
    backpropagates, divided by the ranks FSDP averages over."""
    expected = {}
    for moe in ("eager", "fused"):
        model = port(moe, state_dict)
        loss = sum(
            _loss_scaled_as_trainer(model, *batch(10 + r), loss_tokens, WORLD) for r in range(WORLD)
        )
        (loss / WORLD).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        assert norm > 0.05, "the test needs a norm that clipping really scales"
        expected[moe] = (loss.detach() / WORLD, grads, norm)
    return expected


def _under_expert_parallelism(state_dict, loss_tokens, expected, checkpoint, want_logits):
    from loom.dist.clip import clip_grad_norm_
    from loom.dist.fsdp import apply_fsdp, mixed_precision
    from loom.dist.loading import load_safetensors, materialize
    from loom.dist.mesh import init_parallel
    from loom.trainer.model import recompute_buffers

    rank = dist.get_rank()
    ids, labels = batch(10 + rank)
    cpu = torch.device("cpu")
    for ep in (1, 2, 4):
        for moe in ("eager", "fused"):
            what = f"ep={ep} moe={moe}"
            state = init_parallel(dp_shard=WORLD, ep=ep)
            model = port(moe, state_dict)
            EXPERT_PLAN.apply(model, state.ep_mesh)
            experts = expert_modules(model)
            assert experts[0].gate_up_proj.to_local().shape == (E // ep, 2 * INTER, HIDDEN)
            layers = list(model.model.layers)
            apply_fsdp(model, layers, state.fsdp_mesh, mixed_precision(cpu), experts=experts,
                       expert_mesh=state.expert_fsdp_mesh)  # fmt: skip
            local = _loss_scaled_as_trainer(model, ids, labels, loss_tokens, state.fsdp_size)
            local.backward()
            total = local.detach().clone()
            dist.all_reduce(total)
            want_loss, want_grads, want_norm = expected[moe]
            assert_close(total / WORLD, want_loss, f"{what}: loss")
            for name, param in model.named_parameters():
                assert_close(param.grad.full_tensor(), want_grads[name], f"{what}: {name} grad")
            assert_close(clip_grad_norm_(model.parameters(), 0.05), want_norm, f"{what}: norm")

    # upstream's save_pretrained checkpoint, read shard by shard under ep 2
    state = init_parallel(dp_shard=WORLD, ep=2)
    with torch.device("meta"):
        model = build_model(TOY, attn_implementation="eager", moe_implementation="fused")
    EXPERT_PLAN.apply(model, state.ep_mesh)
    apply_fsdp(model, list(model.model.layers), state.fsdp_mesh, mixed_precision(cpu),
               experts=expert_modules(model), expert_mesh=state.expert_fsdp_mesh)  # fmt: skip
    materialize(model, cpu, init=recompute_buffers)
    load_safetensors(model, Path(checkpoint), Qwen3MoeConverter.from_config(model.config))
    with torch.no_grad():
        logits = model(input_ids=batch(20 + rank)[0]).logits
    assert_close(logits, want_logits[rank], f"rank {rank}: logits after loading under ep 2")


@v5_only
def test_expert_parallel_and_upstream_checkpoint(reference, tmp_path):
    """ep 1/2/4 x eager/fused equal one process; an upstream checkpoint loads under ep 2."""
    # which layout does v5's save_pretrained write? per-expert keys (checked here)
    reference.save_pretrained(tmp_path, max_shard_size="100KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1, "the test wants a sharded checkpoint"
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in weight_map
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in weight_map)
    with torch.no_grad():
        want_logits = [reference(input_ids=batch(20 + r)[0]).logits for r in range(WORLD)]
    state_dict = reference.state_dict()
    loss_tokens = sum(int((batch(10 + r)[1] != -100).sum()) for r in range(WORLD))
    expected = _expected_ep_results(state_dict, loss_tokens)
    run_distributed(
        _under_expert_parallelism, WORLD, state_dict, loss_tokens, expected, str(tmp_path),
        want_logits, timeout=180.0,
    )  # fmt: skip
