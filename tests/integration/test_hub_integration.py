"""Every model family Loom accepts, through the tools a user runs on a Hub checkpoint:
``loom truncate`` (the first layers), ``loom convert`` (HF -> Loom checkpoint -> HF, byte
for byte) and ``loom verify`` (Loom's logits and loss against upstream's), then each
implementation variant Loom can train it with (attention backends; eager and fused
experts) against upstream's eager logits.

Two modes, one pipeline:

- ``toy-<family>`` (default, CI): upstream's ``save_pretrained`` of seeded random weights of
  the family's toy config (``tests/toy_config/<family>_toy``) with more layers than are
  kept, in bf16 and in small shards with an index, with the Hub's expert layout and a
  tokenizer (a VLM's processor) beside it: the layout of a Hub checkpoint, offline.
- ``hub-<family>`` (``extra_slow``): the real checkpoint of ``HUB_TEST_CONFIGS``, of which
  only the shards holding the kept layers are fetched. Skipped unless ``--run-extra-slow``
  is given, and then unless the files are in the local HF cache or the Hub is reachable.

The steps depend on each other through module-scoped fixtures (``source_path`` ->
``truncated_path`` -> ``dcp_path`` -> ``converted_path``): when one fails, the tests that
need its result error with its exception instead of running on nothing.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _ports import BACKENDS, CASES
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from loom.dist.loading import INDEX_NAME, checkpoint_files
from loom.models.experts import StackedExperts
from loom.models.registry import (
    PORTS,
    UPSTREAM_FAMILIES,
    build_model,
    is_vision_language,
    load_weights,
    port_hooks,
    refusal,
)
from loom.trainer.tools.truncate import WEIGHT_SUFFIXES, truncate
from loom.trainer.tools.verify import (
    BASE_TOLERANCE,
    Difference,
    compare,
    load_upstream,
    random_ids,
)

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "tests/toy_config"


@dataclass(frozen=True)
class HubTestConfig:
    family: str  # config.json's model_type: a Loom port or an upstream family
    model_id: str  # the Hub checkpoint
    num_layers_to_keep: int = 2
    batch_size: int = 2
    sequence_length: int = 32  # longer than the toys' sliding windows (16)
    # times verify.BASE_TOLERANCE (relative): the MoE ports sum their experts in another
    # order than upstream (verify.FACTORS)
    compare_factor: float = 1.0


HUB_TEST_CONFIGS = {
    c.family: c
    for c in (
        HubTestConfig("llama", "meta-llama/Llama-3.2-1B"),
        HubTestConfig("qwen2", "Qwen/Qwen2.5-0.5B"),
        HubTestConfig("qwen3", "Qwen/Qwen3-0.6B"),
        HubTestConfig("qwen3_moe", "Qwen/Qwen3-30B-A3B", compare_factor=4.0),
        HubTestConfig("mixtral", "mistralai/Mixtral-8x7B-v0.1", compare_factor=4.0),
        HubTestConfig("qwen2_5_vl", "Qwen/Qwen2.5-VL-3B-Instruct"),
        HubTestConfig("qwen3_vl", "Qwen/Qwen3-VL-2B-Instruct"),
        HubTestConfig("qwen3_vl_moe", "Qwen/Qwen3-VL-30B-A3B-Instruct", compare_factor=4.0),
        HubTestConfig("gemma2", "google/gemma-2-2b"),
        # MXFP4 experts (``*_blocks`` / ``*_scales``) on the Hub: the toy's are bf16
        HubTestConfig("gpt_oss", "openai/gpt-oss-20b"),
        HubTestConfig("phi3", "microsoft/Phi-3-mini-4k-instruct"),
    )
}
TOY_LAYERS = 4  # the toy checkpoints' decoder layers, before truncation
TOY_DTYPE = torch.bfloat16  # the Hub's
TOY_SHARD = "100KB"  # several shards and an index, as on the Hub
PROCESSORS = {"qwen2_5_vl": "Qwen2_5_VLProcessor"}  # else the example's, Qwen3-VL's


@dataclass(frozen=True)
class Case:
    hub: bool  # the real checkpoint, else the toy
    config: HubTestConfig

    @property
    def id(self) -> str:
        return f"{'hub' if self.hub else 'toy'}-{self.config.family}"

    @property
    def marks(self) -> tuple:
        return (pytest.mark.extra_slow,) if self.hub else ()


@dataclass(frozen=True)
class Variant:
    # the case's id: pytest orders module-scoped parameters by value, and would otherwise
    # run one variant of every case together
    case: str
    attn: str
    experts: str | None = None  # an MoE port's expert computation: "eager" or "fused"

    @property
    def id(self) -> str:
        return self.attn if self.experts is None else f"{self.attn}+{self.experts}_experts"


@functools.cache
def variants(family: str) -> list[tuple[str, str | None]]:
    """``(attention, experts)``: each attention backend Loom trains ``family`` with (a
    port's, as its model tests run them; an upstream family's that Loom does not refuse),
    with the fused experts of an MoE port; and its eager experts under ``loom_sdpa``."""
    config = AutoConfig.from_pretrained(TOY / f"{family}_toy")
    port = CASES.get(family)
    backends = [b for b in (port.backends if port else BACKENDS) if refusal(config, b) is None]
    if port is None or not port.moe:
        return [(b, None) for b in backends]
    return [(b, "fused") for b in backends] + [("loom_sdpa", "eager")]


CASES_UNDER_TEST = [Case(hub, c) for hub in (False, True) for c in HUB_TEST_CONFIGS.values()]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``case`` is module-scoped, so each case's fixtures are built once and its tests run
    together, in the order they are written."""
    if "variant" in metafunc.fixturenames:
        pairs = [
            (c, Variant(c.id, *v)) for c in CASES_UNDER_TEST for v in variants(c.config.family)
        ]
        params = [pytest.param(c, v, marks=c.marks, id=f"{c.id}-{v.id}") for c, v in pairs]
        metafunc.parametrize(("case", "variant"), params, scope="module")
    elif "case" in metafunc.fixturenames:
        params = [pytest.param(c, marks=c.marks, id=c.id) for c in CASES_UNDER_TEST]
        metafunc.parametrize("case", params, scope="module")


# ------------------------------------------------------------------------ checkpoints

_TEXT_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_VISION = re.compile(r"(?:^|\.)visual\.")


def in_first_layers(key: str, keep: int) -> bool:
    """Whether a truncation to ``keep`` decoder layers keeps tensor ``key`` (a vision
    tower's blocks are kept whole)."""
    match = None if _VISION.search(key) else _TEXT_LAYER.search(key)
    return match is None or int(match[1]) < keep


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder's safetensors (the index checked against the files)."""
    out = {}
    for file, keys in checkpoint_files(folder).items():
        with safe_open(file, framework="pt") as f:
            out.update({key: f.get_tensor(key) for key in keys})
    return out


def text_config(raw: dict) -> dict:
    return raw.get("text_config", raw)


def toy_config(family: str) -> dict:
    """The family's toy config with ``TOY_LAYERS`` layers: per-layer lists lengthened,
    every other layer of an MoE model with ``mlp_only_layers`` dense (truncating to 2
    keeps one of each), and ``use_cache`` on, as in the Hub's configs."""
    raw = json.loads((TOY / f"{family}_toy/config.json").read_text())
    text = text_config(raw)
    text["num_hidden_layers"] = TOY_LAYERS
    text["use_cache"] = True
    if "layer_types" in text:
        types = text["layer_types"]
        text["layer_types"] = [types[i % len(types)] for i in range(TOY_LAYERS)]
    if "mlp_only_layers" in text:
        text["mlp_only_layers"] = list(range(1, TOY_LAYERS, 2))
    return raw


def add_tokenizer(raw: dict, out: Path) -> None:
    """The examples' tokenizer (and a VLM's processor, with its vision token ids set in the
    config) beside the weights, as a Hub checkpoint holds them; ``loom convert`` copies
    them to its HF output."""
    if "vision_config" not in raw:
        example = ROOT / "examples/tiny/model"
        names = ["tokenizer.json", "tokenizer_config.json"]
    else:  # the example's processor files serve every VLM family, with its processor class
        example = ROOT / "examples/tiny-vlm/model"
        names = ["tokenizer.json", "tokenizer_config.json", "video_preprocessor_config.json"]
        ids = json.loads((example / "config.json").read_text())
        raw.update({k: v for k, v in ids.items() if k.endswith("_token_id")})
        processor = json.loads((example / "preprocessor_config.json").read_text())
        processor["processor_class"] = PROCESSORS.get(raw["model_type"], "Qwen3VLProcessor")
        (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    for name in names:
        shutil.copy(example / name, out / name)
    (out / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )


def to_hub_layout(family: str, out: Path) -> None:
    """Rewrite the experts of a saved checkpoint that ``save_pretrained`` left in Loom's
    stacked layout (transformers 5.17's in memory: ``[E, 2I, H]`` / ``[E, H, I]``) into the
    Hub's, through the port's ``to_hf``. Measured: both majors write Mixtral's and
    Qwen3-MoE's per-expert keys as the Hub holds them; 4.57.3 writes Qwen3-VL-MoE's
    stacked experts as ``[E, H, 2I]`` as the Hub does, 5.17.0 as ``[E, 2I, H]``."""
    hooks = port_hooks(family)
    if hooks.converter is None:  # no experts: save_pretrained writes the Hub's layout
        return
    converter = hooks.converter(AutoConfig.from_pretrained(out))
    e, h, i = converter.num_experts, converter.hidden, converter.inter
    loom_shapes = {"gate_up_proj": (e, 2 * i, h), "down_proj": (e, h, i)}
    index_path = out / INDEX_NAME
    index = json.loads(index_path.read_text())
    for file, keys in checkpoint_files(out).items():
        with safe_open(file, framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in keys}
        loom = {
            k: t
            for k, t in tensors.items()
            if tuple(t.shape) == loom_shapes.get(k.rpartition(".")[2], ())
        }
        if not loom:
            continue
        for key in loom:
            del tensors[key], index["weight_map"][key]
        hub = hooks.to_hf(loom)
        tensors.update(hub)
        index["weight_map"].update(dict.fromkeys(hub, file.name))
        save_file(tensors, file, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index, indent=2) + "\n")


def save_toy(family: str, out: Path) -> Path:
    raw = toy_config(family)
    out.mkdir()
    add_tokenizer(raw, out)
    config = AutoConfig.for_model(**raw)
    auto = AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM
    torch.manual_seed(0)
    model = auto.from_config(config).to(TOY_DTYPE)
    model.save_pretrained(out, max_shard_size=TOY_SHARD)
    to_hub_layout(family, out)
    return out


@functools.cache
def hub_reachable(model_id: str) -> bool:
    from huggingface_hub import model_info
    from huggingface_hub.errors import HfHubHTTPError

    try:
        model_info(model_id, timeout=10)
    except HfHubHTTPError:  # the Hub answered (a gated or missing repository)
        return True
    except Exception:  # offline mode, no network, no DNS, a timeout: each library's own
        return False
    return True


def fetch_hub(model_id: str, keep: int, out: Path) -> Path:
    """A folder of links to the Hub checkpoint's files that the first ``keep`` layers
    need: its config, tokenizer and processor files, and the shards holding the kept
    tensors, with an index of those shards' tensors. Skips the test when the files are
    neither in the local HF cache nor reachable."""
    from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import LocalEntryNotFoundError

    online = hub_reachable(model_id)
    cached = try_to_load_from_cache(model_id, "config.json")
    if not online and not isinstance(cached, str):
        pytest.skip(
            f"{model_id} is not in the local HF cache ({HF_HUB_CACHE}) and the Hub is "
            "unreachable (offline)"
        )
    if online:
        names = HfApi().list_repo_files(model_id)
    else:
        names = [p.name for p in Path(cached).parent.iterdir()]

    def fetch(name: str) -> Path:
        try:
            return Path(hf_hub_download(model_id, name, local_files_only=not online))
        except LocalEntryNotFoundError:
            pytest.skip(
                f"{model_id}: {name} is not in the local HF cache and the Hub is unreachable "
                "(offline)"
            )

    top = [n for n in names if "/" not in n]  # not the original/ weights of other formats
    out.mkdir()
    for name in top:
        if not name.endswith(WEIGHT_SUFFIXES):
            (out / name).symlink_to(fetch(name))
    if INDEX_NAME not in top:
        (out / "model.safetensors").symlink_to(fetch("model.safetensors"))
        return out
    index = json.loads(fetch(INDEX_NAME).read_text())
    shards = {f for k, f in index["weight_map"].items() if in_first_layers(k, keep)}
    for shard in sorted(shards):
        (out / shard).symlink_to(fetch(shard))
    index["weight_map"] = {k: f for k, f in index["weight_map"].items() if f in shards}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return out


# ---------------------------------------------------------------- fixtures: the steps


@pytest.fixture(scope="module")
def hub_test_cache_dir(case: Case, tmp_path_factory: pytest.TempPathFactory):
    """The case's folder. A real checkpoint's is removed once its tests are done (its
    truncated and converted copies take GBs); a toy's stays for pytest's retention."""
    path = tmp_path_factory.mktemp(case.id)
    yield path
    if case.hub:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def source_path(case: Case, hub_test_cache_dir: Path) -> Path:
    """The checkpoint as the Hub holds it (the real one, or the toy)."""
    out = hub_test_cache_dir / "source"
    if case.hub:
        return fetch_hub(case.config.model_id, case.config.num_layers_to_keep, out)
    return save_toy(case.config.family, out)


@pytest.fixture(scope="module")
def truncated_path(case: Case, source_path: Path) -> Path:
    out = source_path.parent / "truncated"
    truncate(source_path, out, case.config.num_layers_to_keep)
    return out


@pytest.fixture(scope="module")
def dcp_path(truncated_path: Path) -> Path:
    # imported here: a broken converter errors the tests that need it, not the module
    from loom.trainer.tools.convert import hf_to_dcp

    return hf_to_dcp(truncated_path, truncated_path.parent / "dcp")


@pytest.fixture(scope="module")
def converted_path(truncated_path: Path, dcp_path: Path) -> Path:
    from loom.trainer.tools.convert import dcp_to_hf

    return dcp_to_hf(dcp_path, truncated_path.parent / "hf", model=truncated_path)


def inputs(config, case: Case) -> dict:
    """verify's batch: seeded random tokens, positions given to a text model as the
    trainer gives them (a VLM computes its own)."""
    c = case.config
    batch = {"input_ids": random_ids(config, c.batch_size, c.sequence_length)}
    if not is_vision_language(config):
        batch["position_ids"] = torch.arange(c.sequence_length).expand(c.batch_size, -1)
    return batch


@pytest.fixture(scope="module")
def upstream_logits(case: Case, converted_path: Path) -> torch.Tensor:
    """Upstream's eager logits on the converted checkpoint: the variants' reference."""
    config = AutoConfig.from_pretrained(converted_path)
    model = load_upstream(converted_path, config)
    with torch.no_grad():
        return model(**inputs(config, case)).logits


# What a truncation changes in a config (loom.trainer.tools.truncate): the layer count and
# the per-layer lists.
CUT = ("num_hidden_layers", "layer_types", "mlp_only_layers", "text_config")


def assert_cut(before: dict, after: dict, keep: int) -> None:
    """``after`` is ``before`` (a config's dict) cut to ``keep`` layers."""
    if "num_hidden_layers" in before:
        assert after["num_hidden_layers"] == keep
    if "layer_types" in before:
        assert after["layer_types"] == before["layer_types"][:keep]
    if "mlp_only_layers" in before:
        assert after["mlp_only_layers"] == [i for i in before["mlp_only_layers"] if i < keep]
    rest = [{k: v for k, v in c.items() if k not in CUT} for c in (before, after)]
    assert rest[1] == rest[0], "truncate changed more than the layers"


def comparable(config: dict) -> dict:
    """A config's dict without where it was read from and the dtypes it records (the
    dtype a model was built with; the tensors' own are compared one by one)."""
    skip = ("_name_or_path", "dtype", "torch_dtype")
    return {
        k: comparable(v) if isinstance(v, dict) else v for k, v in config.items() if k not in skip
    }


def preprocessing(folder: Path, vlm: bool) -> dict:
    """What a folder's tokenizer (and a VLM's image processor) does, whatever files hold
    it (5.17's processors save one ``processor_config.json``, 4.57's one file each)."""
    from transformers import AutoProcessor, AutoTokenizer

    processor = AutoProcessor.from_pretrained(folder) if vlm else None
    tokenizer = processor.tokenizer if vlm else AutoTokenizer.from_pretrained(folder)
    return {
        "vocab": tokenizer.get_vocab(),
        "special": tokenizer.special_tokens_map,
        "chat_template": tokenizer.chat_template,
        "image_processor": processor.image_processor.to_dict() if vlm else None,
    }


# ---------------------------------------------------------------------------- tests


def test_every_family_has_a_hub_config():
    """A family Loom accepts joins these tests with its entry in HUB_TEST_CONFIGS."""
    assert sorted(HUB_TEST_CONFIGS) == sorted([*PORTS, *UPSTREAM_FAMILIES])


def test_download_and_truncate(case: Case, source_path: Path, truncated_path: Path):
    keep = case.config.num_layers_to_keep
    before = json.loads((source_path / "config.json").read_text())
    after = json.loads((truncated_path / "config.json").read_text())
    assert text_config(before)["num_hidden_layers"] > keep, "the source must have layers to drop"
    for old, new in ((before, after), (before.get("text_config"), after.get("text_config"))):
        if old is not None:  # the top level, and a VLM's text config
            assert_cut(old, new, keep)

    source_keys = {k for keys in checkpoint_files(source_path).values() for k in keys}
    truncated_keys = {k for keys in checkpoint_files(truncated_path).values() for k in keys}
    assert truncated_keys == {k for k in source_keys if in_first_layers(k, keep)}
    assert truncated_keys != source_keys
    if not case.hub:  # the toy is sharded as the Hub's checkpoints are: so is its truncation
        assert (truncated_path / INDEX_NAME).is_file()

    config = AutoConfig.from_pretrained(truncated_path)
    auto = AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM
    _, info = auto.from_pretrained(truncated_path, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}  # missing, unexpected, mismatched keys
    assert not problems, f"upstream {auto.__name__} loads {truncated_path} with {problems}"


def test_conversion(case: Case, truncated_path: Path, dcp_path: Path, converted_path: Path):
    assert (dcp_path / ".metadata").is_file(), f"{dcp_path} is not a DCP checkpoint"
    want, got = read_tensors(truncated_path), read_tensors(converted_path)
    added, lost = sorted(set(got) - set(want)), sorted(set(want) - set(got))
    assert not added and not lost, (
        f"{len(added)} keys only in the round trip, e.g. {added[:3]}; "
        f"{len(lost)} only in the input, e.g. {lost[:3]}"
    )
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, f"{key}: {got[key].dtype}, was {tensor.dtype}"
        assert got[key].shape == tensor.shape, f"{key}: {got[key].shape}, was {tensor.shape}"
        assert torch.equal(got[key], tensor), f"{key}: values differ after the round trip"

    configs = [AutoConfig.from_pretrained(p) for p in (converted_path, truncated_path)]
    assert comparable(configs[0].to_dict()) == comparable(configs[1].to_dict())
    vlm = is_vision_language(configs[1])
    got, want = (preprocessing(p, vlm) for p in (converted_path, truncated_path))
    assert got == want, f"{converted_path}'s tokenizer or processor is not {truncated_path}'s"


def test_forward_equivalence(case: Case, converted_path: Path):
    c = case.config
    diffs, what = compare(converted_path, c.compare_factor, c.batch_size, c.sequence_length)
    failed = [d for d in diffs if not d.ok]
    assert not failed, f"{what}: {failed}"


def test_implementation_variants(
    case: Case, variant: Variant, converted_path: Path, upstream_logits: torch.Tensor
):
    model = build_model(converted_path, variant.attn, moe_implementation=variant.experts)
    load_weights(model, converted_path)
    config = model.config
    assert config.get_text_config()._attn_implementation == variant.attn
    if variant.experts is not None:  # the switch reached every expert module
        experts = [m for m in model.modules() if isinstance(m, StackedExperts)]
        assert experts and {m.moe_implementation for m in experts} == {variant.experts}
    with torch.no_grad():
        logits = model.eval()(**inputs(config, case)).logits
    diff = Difference(
        "logits",
        (logits - upstream_logits).abs().max().item(),
        upstream_logits.abs().max().item(),
        BASE_TOLERANCE * case.config.compare_factor,
    )
    assert diff.ok, f"{variant.id} vs upstream eager: {diff}"
