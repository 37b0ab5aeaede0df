"""Loom's MoE ports (qwen3_moe, mixtral) compute what upstream HF computes, on one
process and under expert parallelism, and read and write HF's checkpoints. Every test
runs for both ports, on their toy configs (whose expert sizes are pairwise distinct):

- eager and fused experts vs upstream HF (v5: its eager experts and its default
  experts implementation; v4: its per-expert loop, upstream's state dict converted to
  Loom's stacked layout): loss, aux loss, router logits and every parameter's gradient
  by name (upstream's gradients mapped through the same layout conversion as its
  weights; CPU fp32, tight); packed rows under every attention backend the trainer uses;
- ep 1, 2 and 4 on gloo (experts ``Shard(0)`` over the ep mesh, FSDP2 over the dense
  and expert meshes, the loss scaled as the trainer scales it) give the single-process
  loss, every gradient and the clipped-norm of the port;
- the checkpoint converter: stacking, pass-through, transpose, refusals, round trip;
  a checkpoint written by upstream's ``save_pretrained`` (sharded, per-expert keys)
  loads under ep 2 and gives upstream's logits; the port's HF export has exactly
  upstream's keys and bytes, and upstream's ``from_pretrained`` loads it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import transformers
from _grads import assert_grads_match, convert_all
from _ports import MOE, TOY, params
from safetensors.torch import load_file, save_file
from test_models_patch import packed_batch
from transformers import AutoConfig, AutoModelForCausalLM

from loom.dist.export import full_tensor
from loom.dist.testing import assert_close, run_distributed
from loom.models import build_model
from loom.models.expert_checkpoint import StackedExpertsConverter
from loom.models.expert_plan import EXPERT_PLAN, expert_modules
from loom.models.experts import StackedExperts
from loom.models.mixtral.converter import MixtralConverter
from loom.models.mixtral.converter import to_hf as mixtral_to_hf
from loom.models.qwen3_moe.converter import Qwen3MoeConverter
from loom.models.qwen3_moe.converter import to_hf as qwen3_moe_to_hf

RTOL, ATOL = 1e-5, 1e-6  # fp32 on CPU
WORLD = 4
MAJOR = int(transformers.__version__.split(".")[0])
# v5's upstream computes its experts eagerly or with its default implementation; v4's has
# only its per-expert loop.
UPSTREAM_EXPERTS = ["eager", None] if MAJOR >= 5 else ["eager"]


@dataclass(frozen=True)
class MoeCase:
    """A port's toy: its sizes (from the toy's README), where its experts live, how its
    HF checkpoints name them, and the config fields the converter reads."""

    toy: str
    experts: int
    inter: int  # one expert's intermediate size
    hidden: int
    sparse_layers: tuple[int, ...]
    dense_key: str | None  # a dense-MLP key the converter must leave alone
    converter: type[StackedExpertsConverter]
    to_hf: Callable[[dict], dict]
    config_fields: tuple[str, str, str]  # experts, hidden, intermediate

    @property
    def path(self) -> Path:
        return TOY / self.toy

    @property
    def layout(self):
        return self.converter.layout

    def hf_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.layout.block}.experts"

    def loom_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.experts"

    def make_converter(self) -> StackedExpertsConverter:
        return self.converter(self.experts, self.hidden, self.inter)


CASES = {
    "qwen3_moe": MoeCase(
        "qwen3_moe_toy", 8, 20, 48, (0, 2), "model.layers.1.mlp.gate_proj.weight",
        Qwen3MoeConverter, qwen3_moe_to_hf, ("num_experts", "hidden_size", "moe_intermediate_size"),
    ),
    "mixtral": MoeCase(
        "mixtral_toy", 4, 28, 40, (0, 1), None,
        MixtralConverter, mixtral_to_hf, ("num_local_experts", "hidden_size", "intermediate_size"),
    ),
}  # fmt: skip
MODELS = params(MOE)
assert set(CASES) == set(MOE), f"each MoE port needs its case here: {sorted(set(MOE) ^ set(CASES))}"


def batch(seed: int, rows: int = 2, seq: int = 16):
    """Token ids and already-shifted labels (-100 at each row's end)."""
    ids = torch.randint(0, 256, (rows, seq), generator=torch.Generator().manual_seed(seed))
    labels = torch.cat([ids[:, 1:], torch.full((rows, 1), -100)], dim=1)
    return ids, labels


def upstream(case: MoeCase, experts_implementation: str | None = "eager"):
    config = AutoConfig.from_pretrained(case.path)
    torch.manual_seed(0)
    kwargs = {}
    if experts_implementation and MAJOR >= 5:
        kwargs["experts_implementation"] = experts_implementation
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager", **kwargs)


def port(case: MoeCase, moe_implementation: str, state_dict=None):
    """The port, with upstream's ``state_dict`` (in Loom's layout) when given."""
    model = build_model(
        case.path, attn_implementation="eager", moe_implementation=moe_implementation
    )
    if state_dict is not None:
        model.load_state_dict(loom_state_dict(case, state_dict))
    return model


def loom_state_dict(case: MoeCase, state_dict: dict) -> dict:
    """Upstream's state dict in Loom's layout: v4's per-expert tensors stacked (and
    Mixtral's ``block_sparse_moe`` renamed), v5's stacked tensors passed through."""
    return convert_all(case.make_converter(), state_dict)


def in_loom_layout(case: MoeCase) -> Callable[[dict], dict]:
    """``rename`` for ``assert_grads_match``: upstream's gradients converted as its
    weights are (stacking and renaming are linear, so they map gradients too)."""
    return functools.partial(loom_state_dict, case)


def step(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    return out


@functools.cache
def reference(name: str):
    """Upstream's model with eager experts, one per port for the whole session."""
    return upstream(CASES[name], "eager")


@pytest.mark.parametrize("upstream_experts", UPSTREAM_EXPERTS, ids=lambda e: f"hf-{e or 'default'}")
@pytest.mark.parametrize("moe", ["eager", "fused"])
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_matches_upstream(name, moe, upstream_experts):
    case = CASES[name]
    hf = reference(name) if upstream_experts == "eager" else upstream(case, None)
    model = port(case, moe, hf.state_dict())
    assert type(model).__module__.startswith(f"loom.models.{name}.generated.v{MAJOR}.")
    for layer in case.sparse_layers:
        assert isinstance(model.model.layers[layer].mlp.experts, StackedExperts)
    ids, _ = batch(0)
    want = step(hf, ids, ids)  # HF-style labels, shifted inside
    got = step(model, ids, ids)
    assert got.logits is None and isinstance(got.aux_loss, torch.Tensor)
    torch.testing.assert_close(got.loss, want.loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=RTOL, atol=ATOL)
    assert len(got.router_logits) == len(want.router_logits) == len(case.sparse_layers)
    for g, w in zip(got.router_logits, want.router_logits, strict=True):
        assert g.shape == (ids.numel(), case.experts)
        torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL)
    assert_grads_match(model, hf, rtol=RTOL, atol=ATOL, rename=in_loom_layout(case))


def packed_rows():
    """Two rows of 16 tokens (three samples, then one): ids, labels, position ids."""
    return packed_batch(256, seed=4)[:3]


@pytest.mark.parametrize("backend", ["sdpa", "loom_sdpa", "loom_varlen"])
@pytest.mark.parametrize("name", MODELS)
def test_attention_backends_on_packed_rows(name, backend):
    """Packed rows under the trainer's attention backends: upstream eager's cross-entropy
    plus its weighted aux loss, and every parameter's gradient."""
    hf, case = reference(name), CASES[name]
    model = build_model(case.path, attn_implementation=backend, moe_implementation="fused")
    model.load_state_dict(loom_state_dict(case, hf.state_dict()))
    ids, labels, positions = packed_rows()
    hf.zero_grad(set_to_none=True)
    out = hf(input_ids=ids, position_ids=positions)
    ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten())
    want = ce + hf.config.router_aux_loss_coef * out.aux_loss
    want.backward()
    model.zero_grad(set_to_none=True)
    got = model(input_ids=ids, position_ids=positions, shift_labels=labels).loss
    got.backward()
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    assert_grads_match(model, hf, rtol=RTOL, atol=ATOL, rename=in_loom_layout(case))


@pytest.mark.parametrize("name", MODELS)
def test_shift_labels_and_no_labels(name):
    hf, case = reference(name), CASES[name]
    model = port(case, "fused", hf.state_dict())
    coef = hf.config.router_aux_loss_coef
    ids, labels = batch(1)
    with torch.no_grad():
        want = hf(input_ids=ids, labels=ids)
        got = model(input_ids=ids, shift_labels=labels)
        torch.testing.assert_close(got.loss, want.loss, rtol=RTOL, atol=ATOL)
        summed = model(input_ids=ids, shift_labels=labels, num_items_in_batch=1).loss
        ce_sum = (want.loss - coef * want.aux_loss) * (labels != -100).sum()
        torch.testing.assert_close(summed, ce_sum + coef * want.aux_loss, rtol=RTOL, atol=1e-4)
        scaled = model(input_ids=ids, shift_labels=labels, aux_loss_scale=0.5).loss
        torch.testing.assert_close(scaled, want.loss - 0.5 * coef * want.aux_loss, rtol=RTOL, atol=ATOL)  # fmt: skip
        logits = model(input_ids=ids).logits  # without labels: upstream's logits
        torch.testing.assert_close(logits, hf(input_ids=ids).logits, rtol=RTOL, atol=ATOL)
        # no router logits: the upstream helper's int 0 must not reach the loss
        plain = model(input_ids=ids, shift_labels=labels, output_router_logits=False)
        assert plain.aux_loss is None
        torch.testing.assert_close(plain.loss, want.loss - coef * want.aux_loss, rtol=RTOL, atol=ATOL)  # fmt: skip


@pytest.mark.parametrize("name", MODELS)
def test_init_weights_and_bad_implementation(name):
    case = CASES[name]
    model = build_model(case.path, moe_implementation="fused")  # random init via _init_weights
    experts = model.model.layers[case.sparse_layers[-1]].mlp.experts
    assert experts.gate_up_proj.shape == (case.experts, 2 * case.inter, case.hidden)
    assert experts.down_proj.shape == (case.experts, case.hidden, case.inter)
    for param in (experts.gate_up_proj, experts.down_proj):
        assert torch.isfinite(param).all()
        assert abs(float(param.detach().std()) - 0.02) < 0.002
        assert abs(float(param.detach().mean())) < 0.002
    with pytest.raises(ValueError, match="moe_implementation 'grouped'"):
        build_model(case.path, moe_implementation="grouped")


# ---------------------------------------------------------------- converter


def hf_expert_tensors(case: MoeCase, layer: int = 0, dtype=torch.float32):
    """One layer's experts in the port's HF layout (random values)."""
    gen, prefix = torch.Generator().manual_seed(3 + layer), case.hf_prefix(layer)
    gate, up, down = case.layout.projs
    out = {}
    for e in range(case.experts):
        out[f"{prefix}.{e}.{gate}.weight"] = torch.randn(case.inter, case.hidden, generator=gen)
        out[f"{prefix}.{e}.{up}.weight"] = torch.randn(case.inter, case.hidden, generator=gen)
        out[f"{prefix}.{e}.{down}.weight"] = torch.randn(case.hidden, case.inter, generator=gen)
    return {k: v.to(dtype) for k, v in out.items()}


@pytest.mark.parametrize("name", MODELS)
def test_converter_stacks_per_expert_keys(name):
    case = CASES[name]
    converter, p, q = case.make_converter(), case.hf_prefix(0), case.loom_prefix(0)
    gate, up, down = case.layout.projs
    E, INTER = case.experts, case.inter
    assert converter.can_handle(f"{p}.{E - 1}.{gate}.weight")
    assert converter.can_handle(f"{q}.gate_up_proj") and converter.can_handle(f"{q}.down_proj")
    assert not converter.can_handle("model.layers.0.self_attn.q_proj.weight")
    assert not converter.can_handle("model.layers.0.mlp.gate.weight")  # Loom's router key
    if case.dense_key:
        assert not converter.can_handle(case.dense_key)
    hf = hf_expert_tensors(case)
    last = [f"{p}.{E - 1}.{gate}.weight", f"{p}.{E - 1}.{down}.weight"]
    # buffered until every expert's part of a stacked tensor has arrived
    assert all(converter.convert(k, t) == [] for k, t in hf.items() if k not in last)
    (gate_up,) = converter.convert(last[0], hf[last[0]])
    (down_proj,) = converter.convert(last[1], hf[last[1]])
    out = dict([gate_up, down_proj])
    converter.finalize()
    assert set(out) == {f"{q}.gate_up_proj", f"{q}.down_proj"}
    assert out[f"{q}.gate_up_proj"].shape == (E, 2 * INTER, case.hidden)
    assert out[f"{q}.down_proj"].shape == (E, case.hidden, INTER)
    for e in range(E):  # gate rows first: the half upstream's experts feed to the activation
        assert torch.equal(out[f"{q}.gate_up_proj"][e, :INTER], hf[f"{p}.{e}.{gate}.weight"])
        assert torch.equal(out[f"{q}.gate_up_proj"][e, INTER:], hf[f"{p}.{e}.{up}.weight"])
        assert torch.equal(out[f"{q}.down_proj"][e], hf[f"{p}.{e}.{down}.weight"])


@pytest.mark.parametrize("name", MODELS)
def test_converter_stacked_keys_pass_through_or_transpose_or_fail(name):
    case = CASES[name]
    converter, q = case.make_converter(), case.loom_prefix(case.sparse_layers[-1])
    E, INTER, H = case.experts, case.inter, case.hidden
    gate_up, down = torch.randn(E, 2 * INTER, H), torch.randn(E, H, INTER)
    assert converter.convert(f"{q}.gate_up_proj", gate_up)[0][1] is gate_up  # Loom's layout
    assert converter.convert(f"{q}.down_proj", down)[0][1] is down
    ((_, t),) = converter.convert(f"{q}.gate_up_proj", gate_up.transpose(1, 2).contiguous())
    assert torch.equal(t, gate_up)
    ((_, t),) = converter.convert(f"{q}.down_proj", down.transpose(1, 2).contiguous())
    assert torch.equal(t, down)
    for key, shape in ((f"{q}.gate_up_proj", (E, INTER, H)), (f"{q}.down_proj", (E, INTER, INTER))):
        with pytest.raises(ValueError, match="neither Loom's layout"):
            converter.convert(key, torch.zeros(shape))
    gate = case.layout.gate
    with pytest.raises(ValueError, match="expected"):  # a transposed per-expert matrix
        converter.convert(f"{case.hf_prefix(0)}.0.{gate}.weight", torch.zeros(H, INTER))
    with pytest.raises(ValueError, match=f"expert {E} but the model has {E}"):
        converter.convert(f"{case.hf_prefix(0)}.{E}.{gate}.weight", torch.zeros(INTER, H))
    converter.finalize()


@pytest.mark.parametrize("name", MODELS)
def test_converter_finalize_raises_on_unflushed_experts(name):
    case = CASES[name]
    converter, up = case.make_converter(), case.layout.up
    hf = hf_expert_tensors(case)
    hf.pop(f"{case.hf_prefix(0)}.1.{up}.weight")
    for key, tensor in hf.items():
        converter.convert(key, tensor)
    with pytest.raises(ValueError, match=rf"{case.hf_prefix(0)}: missing 1\.{up}$"):
        converter.finalize()
    converter = case.make_converter()
    key = f"{case.hf_prefix(0)}.0.{up}.weight"
    converter.convert(key, hf[key])
    with pytest.raises(ValueError, match="appears twice"):
        converter.convert(key, hf[key])


@pytest.mark.parametrize("name", MODELS)
def test_converter_from_flat_and_nested_config(name):
    case = CASES[name]
    sizes = (case.experts, case.hidden, case.inter)
    flat = SimpleNamespace(**dict(zip(case.config_fields, sizes, strict=True)))
    for config in (flat, SimpleNamespace(text_config=flat), AutoConfig.from_pretrained(case.path)):
        c = case.converter.from_config(config)
        assert (c.num_experts, c.hidden, c.inter) == (case.experts, case.hidden, case.inter)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", MODELS)
def test_round_trip_hf_loom_hf_is_byte_identical(name, dtype):
    case = CASES[name]
    hf = {}
    for layer in case.sparse_layers:
        hf |= hf_expert_tensors(case, layer, dtype)
    hf["model.layers.0.self_attn.q_proj.weight"] = torch.randn(64, case.hidden).to(dtype)
    loom = convert_all(case.make_converter(), hf)
    stacked = {f"{case.loom_prefix(i)}.{p}" for i in case.sparse_layers for p in ("gate_up_proj", "down_proj")}  # fmt: skip
    assert {k for k in loom if ".experts." in k} == stacked
    back = case.to_hf(loom)
    assert set(back) == set(hf)
    for key, tensor in hf.items():
        assert back[key].dtype == tensor.dtype and back[key].shape == tensor.shape
        assert back[key].contiguous().view(torch.uint8).equal(tensor.view(torch.uint8)), key


@pytest.mark.parametrize("name", MODELS)
def test_upstream_save_and_port_export_are_the_same_checkpoint(name, tmp_path):
    """upstream save_pretrained -> converter -> the port -> to_hf: upstream's keys, bytes
    and (through upstream's from_pretrained) logits."""
    hf, case = reference(name), CASES[name]
    hf.save_pretrained(tmp_path / "upstream")
    saved = load_file(tmp_path / "upstream" / "model.safetensors")
    loom = convert_all(case.converter.from_config(hf.config), saved)
    model = port(case, "fused")
    model.load_state_dict(loom, strict=True)  # every parameter, no key left over
    exported = case.to_hf({k: v.detach() for k, v in model.state_dict().items()})
    assert set(exported) == set(saved)
    for key, tensor in saved.items():
        assert exported[key].view(torch.uint8).equal(tensor.view(torch.uint8)), key
    out = tmp_path / "export"
    hf.config.save_pretrained(out)
    save_file(exported, out / "model.safetensors", metadata={"format": "pt"})
    back, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    ids, _ = batch(2)
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(back(input_ids=ids).logits, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", MODELS)
def test_build_model_pretrained_reads_upstream_checkpoints(name, tmp_path):
    """build_model(init="pretrained") on upstream's save_pretrained output (per-expert keys
    under v4 and on disk in v5) gives upstream's logits: the port's converter is used."""
    hf = reference(name)
    hf.save_pretrained(tmp_path)
    model = build_model(tmp_path, attn_implementation="eager", init="pretrained")
    ids, _ = batch(3)
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- expert parallelism


def _loss_scaled_as_trainer(model, ids, labels, loss_tokens: int, fsdp_size: int):
    """Summed token loss over ``loss_tokens / fsdp_size`` plus the aux term: FSDP's
    average over ranks then gives the gradient of the global token mean (+ the mean
    over ranks of the coefficient times each rank's aux loss)."""
    return model(
        input_ids=ids, shift_labels=labels, num_items_in_batch=loss_tokens / fsdp_size
    ).loss


def _expected_ep_results(case, state_dict, loss_tokens):
    """One process, no parallelism: the sum over ranks' batches of what each rank
    backpropagates, divided by the ranks FSDP averages over."""
    expected = {}
    for moe in ("eager", "fused"):
        model = port(case, moe, state_dict)
        loss = sum(
            _loss_scaled_as_trainer(model, *batch(10 + r), loss_tokens, WORLD) for r in range(WORLD)
        )
        (loss / WORLD).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        assert norm > 0.05, "the test needs a norm that clipping really scales"
        expected[moe] = (loss.detach() / WORLD, grads, norm)
    return expected


def _under_expert_parallelism(name, state_dict, loss_tokens, expected, checkpoint, want_logits):
    from loom.dist.clip import clip_grad_norm_
    from loom.dist.fsdp import apply_fsdp, mixed_precision
    from loom.dist.loading import load_safetensors, materialize, meta_parameters
    from loom.dist.mesh import init_parallel

    case, rank = CASES[name], dist.get_rank()
    ids, labels = batch(10 + rank)
    cpu = torch.device("cpu")
    for ep in (1, 2, 4):
        for moe in ("eager", "fused"):
            what = f"{name} ep={ep} moe={moe}"
            state = init_parallel(dp_shard=WORLD, ep=ep)
            model = port(case, moe, state_dict)
            EXPERT_PLAN.apply(model, state.ep_mesh)
            experts = expert_modules(model)
            assert len(experts) == len(case.sparse_layers)
            local_shape = (case.experts // ep, 2 * case.inter, case.hidden)
            assert experts[0].gate_up_proj.to_local().shape == local_shape
            layers = list(model.model.layers)
            apply_fsdp(model, layers, state.fsdp_mesh, mixed_precision(cpu), experts=experts,
                       expert_mesh=state.expert_fsdp_mesh)  # fmt: skip
            local = _loss_scaled_as_trainer(model, ids, labels, loss_tokens, state.fsdp_size)
            local.backward()
            total = local.detach().clone()
            dist.all_reduce(total)
            want_loss, want_grads, want_norm = expected[moe]
            assert_close(total / WORLD, want_loss, f"{what}: loss")
            for param_name, param in model.named_parameters():
                assert_close(
                    full_tensor(param.grad), want_grads[param_name], f"{what}: {param_name} grad"
                )
            assert_close(clip_grad_norm_(model.parameters(), 0.05), want_norm, f"{what}: norm")

    # upstream's save_pretrained checkpoint, read shard by shard under ep 2
    state = init_parallel(dp_shard=WORLD, ep=2)
    with meta_parameters():
        model = build_model(case.path, attn_implementation="eager", moe_implementation="fused")
    EXPERT_PLAN.apply(model, state.ep_mesh)
    apply_fsdp(model, list(model.model.layers), state.fsdp_mesh, mixed_precision(cpu),
               experts=expert_modules(model), expert_mesh=state.expert_fsdp_mesh)  # fmt: skip
    materialize(model, cpu, init=lambda m: None)  # every weight is loaded
    load_safetensors(model, Path(checkpoint), case.converter.from_config(model.config))
    with torch.no_grad():
        logits = model(input_ids=batch(20 + rank)[0]).logits
    assert_close(logits, want_logits[rank], f"{name} rank {rank}: logits after loading under ep 2")


@pytest.mark.parametrize("name", MODELS)
def test_expert_parallel_and_upstream_checkpoint(name, tmp_path):
    """ep 1/2/4 x eager/fused equal one process; an upstream checkpoint loads under ep 2."""
    hf, case = reference(name), CASES[name]
    # which layout does save_pretrained write? per-expert HF keys (checked here)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1, "the test wants a sharded checkpoint"
    down = case.layout.down
    assert f"{case.hf_prefix(0)}.{case.experts - 1}.{down}.weight" in weight_map
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in weight_map)
    with torch.no_grad():
        want_logits = [hf(input_ids=batch(20 + r)[0]).logits for r in range(WORLD)]
    state_dict = hf.state_dict()
    loss_tokens = sum(int((batch(10 + r)[1] != -100).sum()) for r in range(WORLD))
    expected = _expected_ep_results(case, state_dict, loss_tokens)
    run_distributed(
        _under_expert_parallelism, WORLD, name, state_dict, loss_tokens, expected, str(tmp_path),
        want_logits, timeout=240.0,
    )  # fmt: skip
