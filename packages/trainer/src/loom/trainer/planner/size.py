"""How big a model is: exact parameter counts from its config, else an estimate from its name.

Exact counts (``count_parameters``) build the model on the meta device (shapes only: no
memory, no weights) with its upstream transformers class and count the parameters by
name, so every family is counted without a formula of its own:

- ``total``: every distinct parameter; tied input and output embeddings count once.
- ``active``: what one token passes through: ``total`` less, in each MoE layer, the
  ``num_experts - num_experts_per_tok`` routed experts it is not sent to. Routed experts
  are the parameters under a module named ``experts`` (one tensor per expert, or stacked
  with the experts first); shared experts, routers and dense layers stay active. A dense
  model's ``active`` is its ``total``.
- ``vision``: a vision-language model's vision tower, its merger / projector included
  (modules named ``visual``, ``vision_tower``, ``vision_model``, ``multi_modal_projector``);
  ``text`` is the rest, embeddings and head included.

Without a config, ``size_from_name`` reads a size out of a name or path (``7B``,
``llama-3.1-8b``, ``Mixtral-8x7B``, ``8 billion``, ``500M``, ``Qwen3-30B-A3B``), then looks
the name up among known models whose names hold no size (``phi-2``); ``model_size`` takes
a model directory's config.json where there is one and falls back to the name. Such an
estimate is marked ``exact=False``.

Size categories (``size_category``), by total parameters, upper bounds inclusive:
small <= 10B < medium <= 20B < large <= 50B < xlarge (B = 10**9). A model of exactly
10B is small, 10B + 1 parameter medium. The total decides, not the active count: every
parameter must be held, and trained, whichever experts a token uses.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    PretrainedConfig,
    PreTrainedModel,
    modeling_utils,
)

from loom.models.registry import load_config, model_type

logger = logging.getLogger(__name__)

BILLION = 10**9
MILLION = 10**6


class SizeCategory(StrEnum):
    SMALL = "small"
    MEDIUM = "medium"
    LARGE = "large"
    XLARGE = "xlarge"


# Inclusive upper bounds in parameters; above the last one a model is XLARGE.
CATEGORY_UPPER_BOUNDS: tuple[tuple[SizeCategory, int], ...] = (
    (SizeCategory.SMALL, 10 * BILLION),
    (SizeCategory.MEDIUM, 20 * BILLION),
    (SizeCategory.LARGE, 50 * BILLION),
)


def size_category(params: int) -> SizeCategory:
    """The category of a model with ``params`` parameters (see the module docstring)."""
    if params < 0:
        raise ValueError(f"a parameter count cannot be negative, got {params}")
    for category, upper in CATEGORY_UPPER_BOUNDS:
        if params <= upper:
            return category
    return SizeCategory.XLARGE


@dataclass(frozen=True)
class ModelSize:
    """Parameter counts of one model. From a name (``exact=False``) only ``total`` and
    ``active`` are known (``active == total`` unless the name gives it, as ``-A3B``);
    ``vision`` and ``routed_experts`` are then 0."""

    total: int
    active: int
    vision: int = 0  # the vision tower with its merger / projector
    routed_experts: int = 0  # every routed expert of every MoE layer
    exact: bool = True
    source: str = ""  # where the numbers came from, for messages

    @property
    def text(self) -> int:
        """The language model: everything but the vision tower."""
        return self.total - self.vision

    @property
    def category(self) -> SizeCategory:
        return size_category(self.total)


# ---- exact counts from a config ---------------------------------------------------------

VISION_MODULES = ("visual", "vision_tower", "vision_model", "multi_modal_projector")
# Config keys, across families, for the routed experts of a layer and those used per token.
NUM_EXPERTS_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
TOP_K_KEYS = ("num_experts_per_tok",)


def upstream_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The upstream transformers class that trains ``config``: causal LM or image-text."""
    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if type(config) in auto._model_mapping:
            return auto._model_mapping[type(config)]
    raise ValueError(
        f"model_type {model_type(config)!r} has no causal-LM or image-text-to-text class "
        "in the installed transformers"
    )


def meta_model(config: PretrainedConfig) -> PreTrainedModel:
    """``config``'s upstream model built on the meta device: shapes, no memory."""
    # transformers v4 runs every weight's initialiser even on the meta device: seconds for
    # a model of thousands of experts. v5 skips them on meta and has no such switch.
    skip_init = getattr(modeling_utils, "no_init_weights", contextlib.nullcontext)
    with torch.device("meta"), skip_init():
        # eager attention: nothing to check about installed kernels for a shape-only model
        model = upstream_class(config)._from_config(
            copy.deepcopy(config), attn_implementation="eager"
        )
    model.tie_weights()  # v4 ties embeddings only when it initialises them
    return model


def count_parameters(source: PretrainedConfig | Mapping | str | Path) -> ModelSize:
    """Exact counts of a model from its config (a config, a config dict with
    ``model_type``, or a model directory holding config.json)."""
    config = load_config(dict(source) if isinstance(source, Mapping) else source)
    model = meta_model(config)
    named = dict(model.named_parameters())  # shared (tied) tensors appear once
    total = sum(p.numel() for p in named.values())
    vision = sum(p.numel() for name, p in named.items() if _in_module(name, VISION_MODULES))
    if getattr(config, "vision_config", None) is not None and not vision:
        raise ValueError(
            f"model_type {model_type(config)!r} has a vision_config but no parameters under "
            f"a module named {', '.join(VISION_MODULES)}: its vision tower cannot be counted"
        )
    routed, inactive = _routed_experts(named, config.get_text_config())
    where = source if isinstance(source, str | Path) else f"a {model_type(config)} config"
    return ModelSize(
        total=total,
        active=total - inactive,
        vision=vision,
        routed_experts=routed,
        source=f"{where} (counted exactly)",
    )


def _in_module(name: str, modules: tuple[str, ...]) -> bool:
    return any(part in modules for part in name.split("."))


def _first_set(config, keys: tuple[str, ...]) -> int | None:
    return next((value for key in keys if (value := getattr(config, key, None))), None)


def _routed_experts(named: dict[str, torch.Tensor], text_config) -> tuple[int, int]:
    """(parameters of all routed experts, those a token does not use)."""
    experts = {n: p for n, p in named.items() if _in_module(n, ("experts",))}
    if not experts:
        return 0, 0
    num, top_k = _first_set(text_config, NUM_EXPERTS_KEYS), _first_set(text_config, TOP_K_KEYS)
    if not (num and top_k):
        raise ValueError(
            f"the model has routed experts ({next(iter(experts))}, ...) but its config gives "
            f"no expert count ({' / '.join(NUM_EXPERTS_KEYS)}) or experts per token "
            f"({' / '.join(TOP_K_KEYS)})"
        )
    for name, p in experts.items():
        parts = name.split(".")
        after = parts[parts.index("experts") + 1]
        # one module per expert (experts.3.w1.weight), or stacked: [num_experts, ...]
        if not after.isdigit() and (p.dim() == 0 or p.shape[0] != num):
            raise ValueError(
                f"expert parameter {name} of shape {tuple(p.shape)} is neither one expert's "
                f"nor stacked over the {num} experts: its active share is unknown"
            )
    routed = sum(p.numel() for p in experts.values())
    # every layer holds `num` identical experts, so the division is exact
    return routed, routed * (num - top_k) // num


# ---- estimates from a name ----------------------------------------------------------------

_UNITS = {"b": BILLION, "bn": BILLION, "billion": BILLION}
_UNITS |= {"m": MILLION, "mn": MILLION, "million": MILLION}
_NUMBER = r"\d+(?:\.\d+)?"
# A number not inside another one ("3.1-8b": 8, not 1); a unit not followed by a letter
# ("8bit", "4k" context lengths are no sizes).
# "8x7B": experts x the size of one.
_EXPERTS_TIMES = re.compile(rf"(?<![\d.])(\d+)\s*x\s*({_NUMBER})(bn|b|mn|m)(?![a-z])", re.I)
# "7b", "1.5B", "500M", "8 billion", "1b7" (BLOOM: 1.7B), "-A3B" (Qwen: 3B active).
_SIZE = re.compile(
    rf"(?<![\d.])(?P<active>(?<=[-_ ])a)?(?P<number>{_NUMBER})"
    r"(?:(?P<unit>bn|b|mn|m)(?P<decimals>\d+)?|[-_ ]?(?P<word>billion|million))(?![a-z])",
    re.I,
)
# Models whose names hold no size: published totals, by name with case and separators
# dropped; the longest key contained in the name wins. A family name alone (llama3,
# qwen, mistral) names several sizes and is not here.
KNOWN_SIZES = {
    "distilgpt2": 82 * MILLION,
    "gpt2": 124 * MILLION,
    "gpt2medium": 355 * MILLION,
    "gpt2large": 774 * MILLION,
    "gpt2xl": 1_500 * MILLION,
    "tinyllama": 1_100 * MILLION,
    "phi15": 1_400 * MILLION,
    "phi2": 2_700 * MILLION,
    "phi3mini": 3_800 * MILLION,
    "phi35mini": 3_800 * MILLION,
    "phi3small": 7 * BILLION,
    "phi3medium": 14 * BILLION,
    "phi4mini": 3_800 * MILLION,
    "phi4": 14 * BILLION,
    "mistralnemo": 12 * BILLION,
    "deepseekv2lite": 15_700 * MILLION,
    "deepseekv2": 236 * BILLION,
    "deepseekv3": 671 * BILLION,
    "deepseekr1": 671 * BILLION,
}


def _scaled(number: str, unit: str) -> int:
    return round(float(number) * _UNITS[unit.lower()])


def parse_size(text: str) -> tuple[int, int] | None:
    """(total, active) parameters written in ``text``, or None. The first size written is
    the total; ``-A<size>`` is the active count; ``NxM`` is N * M for both (the name does
    not say how many experts a token uses, nor how much the experts share: Mixtral-8x7B
    gives 56B, its real total is 46.7B)."""
    moe = _EXPERTS_TIMES.search(text)
    if moe:
        total = int(moe[1]) * _scaled(moe[2], moe[3])
        return total, total
    total = active = None
    for match in _SIZE.finditer(text):
        number = match["number"] + (f".{match['decimals']}" if match["decimals"] else "")
        params = _scaled(number, match["unit"] or match["word"])
        if match["active"]:
            active = active or params
        else:
            total = total or params
    if total is None:
        return None
    return total, active or total


def known_size(text: str) -> int | None:
    """The published size of a model whose name holds none (``phi-2``), or None."""
    key = re.sub(r"[^a-z0-9]", "", text.lower())
    for known in sorted(KNOWN_SIZES, key=len, reverse=True):
        if known in key:
            return KNOWN_SIZES[known]
    return None


def size_from_name(name: str | Path) -> ModelSize | None:
    """An estimate from a model's name, hub id or path (no file is read), or None.

    The components of a path are tried from the last one (``/ckpt/llama-3.1-8b/step-500``
    is 8B); in each, a written size first, then the known names."""
    for part in reversed([p for p in re.split(r"[\\/]+", str(name)) if p.strip()]):
        parsed = parse_size(part)
        if parsed is None and (known := known_size(part)) is not None:
            parsed = known, known
        if parsed is not None:
            total, active = parsed
            return ModelSize(total, active, exact=False, source=f"the name {str(name)!r}")
    return None


def model_size(source: PretrainedConfig | Mapping | str | Path) -> ModelSize | None:
    """Exact counts where there is a config (a config, a dict, a model directory with
    config.json), else an estimate from the name or path; None when neither tells."""
    if isinstance(source, PretrainedConfig | Mapping):
        return count_parameters(source)
    path = Path(source)
    if str(source).strip() and (path / "config.json").is_file():
        try:
            return count_parameters(path)
        except (OSError, ValueError, KeyError) as err:
            # e.g. a model_type the installed transformers does not know: the name still helps
            logger.warning("cannot count %s from its config.json (%s); reading its name", path, err)
    return size_from_name(source)
