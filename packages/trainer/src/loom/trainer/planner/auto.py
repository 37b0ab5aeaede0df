"""``train.auto``: the settings a run takes to fit its devices, chosen from the memory model.

Candidates are tried fastest first and the first whose predicted peak stays within
``HEADROOM`` of the device's memory is taken: no activation checkpointing before
checkpointing, checkpointing before offloading its inputs to the host, the largest
micro-batch that divides each rank's share of the global batch before smaller ones, and
sequence parallelism (over more of the GPUs) only when one row does not fit otherwise.
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
from loom.trainer.planner.memory import GIB, Estimate, estimate
from loom.trainer.planner.plan import setup_of

HEADROOM = 0.9  # the allocator's fragmentation and what the model does not count
# (section, key) the rules may choose
CHOSEN = {
    ("memory", "activation_checkpointing"),
    ("memory", "activation_offload"),
    ("train", "micro_batch_size"),
    ("parallel", "sp_size"),
}


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


def choose(config: Config, gpus: int, profile: DeviceProfile, model_config) -> Choice:
    """The fastest candidate that fits (module docstring); ``ConfigError`` when none does."""
    budget = HEADROOM * profile.memory_bytes
    sps = [s for s in (1, 2, 4, 8, 16) if gpus % (s * config.parallel.dp_replicate) == 0]
    best = None
    for sp, ac, offload in itertools.product(
        _options(config, "parallel.sp_size", sps),
        _options(config, "memory.activation_checkpointing", [False, True]),
        _options(config, "memory.activation_offload", [False, True]),
    ):
        if offload and not ac:
            continue
        for micro in _options(config, "train.micro_batch_size", _micro_batches(config, gpus, sp)):
            changes = {"parallel.sp_size": sp, "memory.activation_checkpointing": ac,
                       "memory.activation_offload": offload, "train.micro_batch_size": micro}  # fmt: skip
            candidate = _with(config, changes)
            result = estimate(model_config, setup_of(candidate, gpus))
            if result.peak <= budget:
                return Choice(candidate, _changed(config, changes), result)
            if best is None or result.peak < best[1].peak:
                best = (changes, result)
    changes, result = best
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
