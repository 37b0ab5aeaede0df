"""``train.auto``: the settings a run takes to fit its devices, chosen from the memory model.

Of the candidates whose predicted peak stays within ``HEADROOM`` of the device's memory,
the one ``relative_speed`` ranks fastest is taken: micro-batches that divide each rank's
share of the global batch, with and without activation checkpointing (and offloading its
inputs to the host); sequence parallelism (over more of the GPUs) only when one row does
not fit otherwise. ``lora.rank: auto`` takes the rank for the model's size
(``LORA_RANKS``), halved while nothing fits.
Keys the config sets itself (in the file or on the command line) are never changed;
the config given is never mutated: a new one is returned with the changes listed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from loom.trainer.config import Config
from loom.trainer.errors import ConfigError
from loom.trainer.planner.hardware import DeviceProfile
from loom.trainer.planner.memory import GIB, Estimate, Setup, estimate
from loom.trainer.planner.plan import setup_of
from loom.trainer.planner.size import SizeCategory, count_parameters

HEADROOM = 0.93  # the allocator's fragmentation and what the model does not count (it is
# within 6% of measured peaks: benchmarks/RESULTS.md, 2026-12-06)
# A forward of T tokens runs at T / (T + T0) of full speed: fixed costs per forward
# (launches, FSDP's gathers, QLoRA's dequantization) weigh on short ones. T0 is
# SATURATION / hidden size tokens, more for LoRA (no weight gradients: less work per token)
# and QLoRA; checkpointing recomputes the forward, offload adds host copies. Calibrated on
# the H100 grid of benchmarks/memory_model.py (benchmarks/RESULTS.md, 2026-12-06).
SATURATION = 2**22
LORA_SATURATION, QLORA_SATURATION = 1.5, 3.0
AC_SPEED, OFFLOAD_SPEED = 0.8, 0.9
# lora.rank auto: larger models get larger adapters (multiples of 4 in 8..256); halved
# while nothing fits, down to MIN_LORA_RANK.
LORA_RANKS = {SizeCategory.SMALL: 16, SizeCategory.MEDIUM: 32, SizeCategory.LARGE: 64,
              SizeCategory.XLARGE: 128}  # fmt: skip
MIN_LORA_RANK = 8


@dataclass(frozen=True)
class Choice:
    config: Config
    changes: dict[str, Any]  # "section.key" -> the value chosen
    estimate: Estimate


def explicit_keys(config: Config) -> set[str]:
    """``section.key`` of every value the config sets itself."""
    keys = set()
    for section in config.model_fields_set:
        value = getattr(config, section)
        for key in getattr(value, "model_fields_set", ()):
            keys.add(f"{section}.{key}")
    return keys


def _options(config: Config, key: str, candidates: list) -> list:
    section, name = key.split(".")
    current = getattr(getattr(config, section), name)
    return [current] if key in explicit_keys(config) else candidates


def _micro_batches(config: Config, gpus: int, sp: int) -> list[int]:
    rows = config.global_rows()
    dp = max(gpus // (sp * config.parallel.dp_replicate), 1) * config.parallel.dp_replicate
    limit = config.train.micro_batch_size if rows is None else max(rows // dp, 1)
    if rows is None:
        return sorted({max(limit >> i, 1) for i in range(limit.bit_length())}, reverse=True)
    return [m for m in range(limit, 0, -1) if (rows // dp) % m == 0 and rows % dp == 0] or [1]


def relative_speed(setup: Setup, hidden_size: int) -> float:
    """How fast a step runs under ``setup``, relative to the others (HEADROOM's comment)."""
    t0 = SATURATION / hidden_size
    if setup.lora_rank:
        t0 *= QLORA_SATURATION if setup.lora_quantize else LORA_SATURATION
    tokens = setup.micro * setup.seq / setup.sp
    speed = tokens / (tokens + t0)
    speed *= AC_SPEED if setup.activation_checkpointing else 1.0
    return speed * (OFFLOAD_SPEED if setup.activation_offload else 1.0)


def lora_rank_for(model_config) -> int:
    """``lora.rank: auto``'s rank for a model: by its size category (``LORA_RANKS``)."""
    return LORA_RANKS[count_parameters(model_config).category]


def with_lora_rank(config: Config, rank: int) -> tuple[Config, dict[str, Any]]:
    """``config`` with ``lora.rank`` (and ``lora.alpha`` 2 x rank unless the config sets
    it); the changes."""
    changes: dict[str, Any] = {"lora.rank": rank}
    if "lora.alpha" not in explicit_keys(config):
        changes["lora.alpha"] = float(2 * rank)
    # a copy, not a re-validated dump: which keys the config set itself stays known
    lora = config.lora.model_copy(update={k.split(".")[1]: v for k, v in changes.items()})
    return config.model_copy(update={"lora": lora}), changes


def choose(config: Config, gpus: int, profile: DeviceProfile, model_config) -> Choice:
    """The fastest candidate that fits (module docstring); ``ConfigError`` when none does.
    ``lora.rank: auto`` starts from ``lora_rank_for`` and halves the rank (down to
    ``MIN_LORA_RANK``) while nothing fits."""
    if config.lora.rank != "auto":
        return _choose(config, gpus, profile, model_config)
    rank = lora_rank_for(model_config)
    while True:
        ranked, rank_changes = with_lora_rank(config, rank)
        try:
            choice = _choose(ranked, gpus, profile, model_config)
        except ConfigError:
            if rank // 2 < MIN_LORA_RANK:
                raise
            rank //= 2
            continue
        return Choice(choice.config, rank_changes | choice.changes, choice.estimate)


def _choose(config: Config, gpus: int, profile: DeviceProfile, model_config) -> Choice:
    budget = HEADROOM * profile.memory_bytes
    hidden = (model_config.get_text_config() if hasattr(model_config, "get_text_config")
              else model_config).hidden_size  # fmt: skip
    sps = [s for s in (1, 2, 4, 8, 16) if gpus % (s * config.parallel.dp_replicate) == 0]
    smallest = None
    for sp in _options(config, "parallel.sp_size", sps):
        fits = []
        for ac, offload in itertools.product(
            _options(config, "memory.activation_checkpointing", [False, True]),
            _options(config, "memory.activation_offload", [False, True]),
        ):
            if offload and not ac:
                continue
            for micro in _options(
                config, "train.micro_batch_size", _micro_batches(config, gpus, sp)
            ):
                changes = {"parallel.sp_size": sp, "memory.activation_checkpointing": ac,
                           "memory.activation_offload": offload, "train.micro_batch_size": micro}  # fmt: skip
                candidate = _with(config, changes)
                setup = setup_of(candidate, gpus)
                result = estimate(model_config, setup)
                if result.peak <= budget:
                    fits.append((relative_speed(setup, hidden), candidate, changes, result))
                elif smallest is None or result.peak < smallest[1].peak:
                    smallest = (changes, result)
        if fits:
            _, candidate, changes, result = max(fits, key=lambda fit: fit[0])
            return Choice(candidate, _changed(config, changes), result)
    changes, result = smallest
    raise ConfigError(
        f"train.auto: nothing fits {gpus} x {profile.name} ({profile.memory_gib:g} GiB each): "
        f"the smallest step ({_describe(changes)}) needs {result.peak / GIB:.1f} GiB a GPU; "
        "use more GPUs, LoRA (lora.rank) or a shorter data.max_seq_len"
    )


def _with(config: Config, changes: dict[str, Any]) -> Config:
    raw = config.model_dump()
    for key, value in changes.items():
        section, name = key.split(".")
        raw[section][name] = value
    return Config.model_validate(raw)


def _changed(config: Config, changes: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in changes.items():
        section, name = key.split(".")
        if getattr(getattr(config, section), name) != value:
            out[key] = value
    return out


def _describe(changes: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in changes.items())
