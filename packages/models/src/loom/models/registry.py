"""Which class builds a model: Loom's port for its ``model_type`` where one exists,
upstream HF's for the families proven to train with upstream's numbers through it
(``UPSTREAM_FAMILIES``); any other model type is refused, by name.

Ports register themselves (``loom/models/<model_type>/__init__.py``):

    @MODELING_REGISTRY.register("qwen3")
    def qwen3(architecture: str) -> type[PreTrainedModel]: ...

Registering costs nothing: a port's generated module is imported only when a model of
its type is built.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from loom.dist.loading import load_safetensors
from loom.models import attention

logger = logging.getLogger(__name__)
# A port is a folder with a patch config; nothing else lists them.
PORTS = tuple(sorted(p.parent.name for p in Path(__file__).parent.glob("*/patch_config.py")))
# Families without a port that train through their upstream class: each one is proven by
# the convergence test against a plain upstream loop (tests/e2e/test_upstream_families.py,
# on its toy in tests/toy_config/<model_type>_toy/). A family joins this list with its toy.
UPSTREAM_FAMILIES = ("gemma2", "gpt_oss", "phi3")


class Registry:
    def __init__(self, name: str) -> None:
        self.name = name
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, key: str) -> Callable:
        def add(fn: Callable) -> Callable:
            if key in self._entries:
                raise ValueError(f"{self.name}: {key!r} is registered twice")
            self._entries[key] = fn
            return fn

        return add

    def get(self, key: str) -> Callable[..., Any] | None:
        _import_ports()
        return self._entries.get(key)

    def keys(self) -> list[str]:
        _import_ports()
        return sorted(self._entries)


MODELING_REGISTRY = Registry("MODELING_REGISTRY")  # model_type -> fn(architecture) -> class
PORT_HOOKS_REGISTRY = Registry("PORT_HOOKS_REGISTRY")  # model_type -> fn() -> PortHooks


@dataclass(frozen=True)
class PortHooks:
    """What a port tells the trainer beyond its class: how to spread its experts, and how
    its parameters differ from HF's checkpoint layout (both ways)."""

    expert_plan: Any = None  # a loom.dist.plan.ParallelPlan over the ep mesh
    expert_modules: Callable[[Any], list] | None = None  # modules FSDP shards over experts
    converter: Callable[[PretrainedConfig], Any] | None = None  # -> loom.dist TensorConverter
    to_hf: Callable[[dict], dict] | None = None  # full tensors -> HF checkpoint layout
    # (regex, replacement): checkpoint keys saved under older module names -> the model's
    renames: tuple[tuple[str, str], ...] = ()


# A vision-language checkpoint in the older layout (the Hub's Qwen2.5-VL, and what
# save_pretrained writes for it): vision tower and text decoder at the top level, as
# transformers' own conversion mapping reads them.
VLM_LEGACY_KEYS = (
    (r"^visual\.", "model.visual."),
    (r"^model\.(?!visual\.|language_model\.)", "model.language_model."),
)


def to_legacy_vlm_keys(tensors: dict) -> dict:
    """The model's tensors under the older layout's names, as upstream's save_pretrained
    writes Qwen2.5-VL (and the Hub holds it); every major reads them back."""
    out = {}
    for key, tensor in tensors.items():
        if key.startswith("model.visual."):
            key = key.removeprefix("model.")
        elif key.startswith("model.language_model."):
            key = "model." + key.removeprefix("model.language_model.")
        out[key] = tensor
    return out


def port_hooks(model_type: str) -> PortHooks:
    factory = PORT_HOOKS_REGISTRY.get(model_type)
    return factory() if factory is not None else PortHooks()


def load_weights(
    model: PreTrainedModel,
    path: Path,
    renames: tuple[tuple[str, str], ...] = (),
    allow_missing: tuple[str, ...] = (),
):
    """Fill a built port from an HF checkpoint folder as the trainer does: through the
    port's key renames (then ``renames``) and tensor converter
    (``loom.dist.loading.load_safetensors``)."""
    hooks = port_hooks(model_type(model.config))
    converter = hooks.converter(model.config) if hooks.converter else None
    renames = (*hooks.renames, *renames)
    return load_safetensors(model, Path(path), converter, allow_missing, renames)


def _import_ports() -> None:
    for port in PORTS:
        try:
            importlib.import_module(f"loom.models.{port}")
        except ModuleNotFoundError as err:
            if err.name != f"loom.models.{port}":
                raise


def generated_class(model: str, architecture: str) -> type[PreTrainedModel]:
    """``architecture`` from the port's module generated for the installed transformers."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    name = f"loom.models.{model}.generated.v{major}.patched_modeling_{model}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name:
            raise
        raise RuntimeError(
            f"the {model} port has no module generated for transformers v{major} "
            f"({transformers.__version__}); run loom-patchgen generate on its patch config"
        ) from None
    if not hasattr(module, architecture):
        raise ValueError(f"the {model} port has no class {architecture!r} (config.architectures)")
    return getattr(module, architecture)


def load_config(source: str | Path | PretrainedConfig | dict) -> PretrainedConfig:
    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, dict):
        return AutoConfig.for_model(**source)
    return AutoConfig.from_pretrained(source)


def model_type(config: PretrainedConfig) -> str:
    """``config``'s model type, read from its class: under transformers v4, Qwen2.5-VL's
    config answers attribute reads from its text config (model_type qwen2_5_vl_text)."""
    return type(config).model_type or config.model_type


def model_class(config: PretrainedConfig) -> tuple[type[PreTrainedModel], bool]:
    """The class for ``config`` and whether it is a Loom port."""
    factory = MODELING_REGISTRY.get(model_type(config))
    if factory is None:
        return AutoModelForCausalLM._model_mapping[type(config)], False
    architecture = (getattr(config, "architectures", None) or [""])[0]
    return factory(architecture), True


def eager_only_features(config: PretrainedConfig) -> list[str]:
    """Attention features of ``config`` that only transformers' eager attention computes:
    its sdpa attention and Loom's backends would drop them without an error."""
    features = []
    if getattr(config, "attn_logit_softcapping", None) is not None:
        features.append("attention logit softcapping (config.attn_logit_softcapping)")
    if model_type(config) == "gpt_oss":
        features.append("attention sinks (the attention layers' sinks parameters)")
    return features


def refusal(config: PretrainedConfig, attn_implementation: str) -> str | None:
    """Why Loom will not train ``config`` with ``attn_implementation``, or None."""
    name = model_type(config)
    if MODELING_REGISTRY.get(name) is None and name not in UPSTREAM_FAMILIES:
        return (
            f"model_type {name!r} has no Loom port and is not among the upstream "
            f"families proven to train with upstream's numbers ({', '.join(UPSTREAM_FAMILIES)});"
            f" Loom ports: {', '.join(PORTS)}. docs/adding_a_model.md shows how to add one"
        )
    features = eager_only_features(config)
    if features and attn_implementation != "eager":
        return (
            f"model_type {name!r} uses {' and '.join(features)}, which "
            f"model.attn_implementation {attn_implementation!r} does not compute; "
            "use model.attn_implementation: eager"
        )
    return None


def is_vision_language(config: PretrainedConfig) -> bool:
    return getattr(config, "vision_config", None) is not None


def attention_per_config(config: PretrainedConfig, attn_implementation: str) -> str | dict:
    """A vision-language model's text decoder takes ``attn_implementation``; its vision
    tower attends bidirectionally within each image, which Loom's causal backends do not:
    it takes transformers' ``sdpa`` (``eager`` when the text decoder does)."""
    if not is_vision_language(config):
        return attn_implementation
    vision = "eager" if attn_implementation == "eager" else "sdpa"
    return {"text_config": attn_implementation, "vision_config": vision, "": vision}


def build_model(
    source: str | Path | PretrainedConfig | dict,
    attn_implementation: str = "loom_sdpa",
    moe_implementation: Literal["eager", "fused"] | None = None,
    init: Literal["pretrained", "random"] = "random",
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """Build a causal LM; ``init="pretrained"`` reads the safetensors of a model directory."""
    attention.register()
    config = load_config(source)
    config.use_cache = False
    problem = refusal(config, attn_implementation)
    if problem:
        raise ValueError(problem)
    if moe_implementation is not None:
        config._moe_implementation = moe_implementation
        # a VLM's experts are built from its text config
        config.get_text_config()._moe_implementation = moe_implementation
    cls, is_port = model_class(config)
    if not is_port:
        logger.warning(
            "no Loom port for model_type %r: training upstream %s unpatched (proven equal to "
            "upstream's loop; no fused kernels; sequence and expert parallelism are refused)",
            model_type(config),
            cls.__name__,
        )
    kwargs = {
        "attn_implementation": attention_per_config(config, attn_implementation),
        "dtype": dtype,
    }
    if init == "pretrained":
        if isinstance(source, PretrainedConfig | dict):
            raise ValueError("init='pretrained' needs a model directory, not a config")
        if not is_port:
            model = cls.from_pretrained(source, config=config, **kwargs)
        else:
            # HF's loader does not know a port's layout (stacked experts): it would leave
            # those parameters freshly initialised. Read as the trainer does.
            model = cls._from_config(config, **kwargs)
            load_weights(model, Path(source))
    else:
        model = cls._from_config(config, **kwargs)
    model.loom_port = is_port  # a port takes shift_labels / num_items_in_batch, fused loss
    return model
