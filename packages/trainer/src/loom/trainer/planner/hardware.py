"""Device profiles: what one device offers a run (memory, bf16 peak, how devices are linked).

Built-in profiles carry the datasheet numbers of common GPUs: nominal memory and the
dense (not 2:4-sparse) bf16 tensor-core peak. ``detect()`` reads the running device:
a known GPU keeps its profile's peak and interconnect but takes the memory the device
reports (the driver keeps a little of the nominal size); an unknown GPU gets a generic
profile of its measured memory and a nominal peak; without CUDA, the CPU profile (the
host's memory, a nominal peak). Every GPU of a host is taken to be like the first.

A config overrides detection (``resolve``) with a built-in's name, a mapping of all four
fields, or the path of a YAML file holding that mapping.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loom.trainer.errors import ConfigError

logger = logging.getLogger(__name__)

GIB = 2**30
# How a host's devices reach each other: NVLink / NVSwitch, only PCIe, or not at all.
Interconnect = Literal["nvlink", "pcie", "none"]
INTERCONNECTS: tuple[str, ...] = get_args(Interconnect)


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    memory_gib: float  # one device's memory
    bf16_tflops: float  # one device's dense bf16 peak, TFLOP/s
    interconnect: Interconnect

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a device profile needs a name")
        if not self.memory_gib > 0 or not self.bf16_tflops > 0:
            raise ValueError(
                f"device profile {self.name!r}: memory_gib and bf16_tflops must be positive, "
                f"got {self.memory_gib} and {self.bf16_tflops}"
            )
        if self.interconnect not in INTERCONNECTS:
            raise ValueError(
                f"device profile {self.name!r}: interconnect {self.interconnect!r} is not one "
                f"of {', '.join(INTERCONNECTS)}"
            )

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    @property
    def peak_flops(self) -> float:
        """Dense bf16 FLOP/s."""
        return self.bf16_tflops * 1e12


BUILTIN_PROFILES: Mapping[str, DeviceProfile] = MappingProxyType(
    {
        p.name: p
        for p in (
            DeviceProfile("h100-sxm", 80, 989.5, "nvlink"),
            DeviceProfile("h100-pcie", 80, 756.5, "pcie"),
            DeviceProfile("h200", 141, 989.5, "nvlink"),
            DeviceProfile("a100-80gb", 80, 312, "nvlink"),
            DeviceProfile("a100-80gb-pcie", 80, 312, "pcie"),
            DeviceProfile("a100-40gb", 40, 312, "nvlink"),
            DeviceProfile("a100-40gb-pcie", 40, 312, "pcie"),
            DeviceProfile("l40s", 48, 362, "pcie"),
            DeviceProfile("rtx-4090", 24, 165.2, "pcie"),  # fp32 accumulation
        )
    }
)
CPU = "cpu"
CPU_TFLOPS = 1.0  # nominal: a CPU run is a test, not a training run worth timing
GENERIC_GPU = "generic-gpu"
GENERIC_GPU_TFLOPS = 100.0  # nominal, below every data-centre GPU above: set the real one
# torch's device name -> profile; the first pattern found in the name wins.
DEVICE_NAMES: tuple[tuple[str, str], ...] = (
    (r"H200", "h200"),
    (r"H100.*PCIe", "h100-pcie"),
    (r"H100(?!.*NVL)", "h100-sxm"),  # "NVIDIA H100 80GB HBM3"; the NVL part is not listed
    (r"A100.*PCIe.*40GB|A100.*40GB.*PCIe", "a100-40gb-pcie"),
    (r"A100.*PCIe", "a100-80gb-pcie"),
    (r"A100.*40GB", "a100-40gb"),
    (r"A100", "a100-80gb"),
    (r"L40S", "l40s"),
    (r"RTX 4090", "rtx-4090"),
)


def host_memory_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cpu_profile() -> DeviceProfile:
    """The CPU as a device: the host's memory, a nominal peak."""
    return DeviceProfile(CPU, host_memory_bytes() / GIB, CPU_TFLOPS, "none")


def profile_names() -> list[str]:
    return [*BUILTIN_PROFILES, CPU]


def profile_for_device(device_name: str, memory_bytes: int) -> DeviceProfile:
    """The profile of a GPU that torch calls ``device_name``, with its measured memory."""
    memory_gib = memory_bytes / GIB
    for pattern, name in DEVICE_NAMES:
        if re.search(pattern, device_name, re.I):
            return replace(BUILTIN_PROFILES[name], memory_gib=memory_gib)
    logger.warning(
        "no device profile for %r: planning with its measured %.1f GiB and a nominal %g "
        "TFLOP/s; give the real numbers in the config's hardware section",
        device_name,
        memory_gib,
        GENERIC_GPU_TFLOPS,
    )
    return DeviceProfile(GENERIC_GPU, memory_gib, GENERIC_GPU_TFLOPS, "pcie")


def detect() -> DeviceProfile:
    """The running device's profile: CUDA device 0, else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return cpu_profile()
    props = torch.cuda.get_device_properties(0)
    return profile_for_device(props.name, props.total_memory)


class DeviceProfileSpec(BaseModel):
    """A user's device profile, as the config gives it: every field, checked."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    memory_gib: float = Field(gt=0, description="one device's memory, GiB")
    bf16_tflops: float = Field(gt=0, description="one device's dense bf16 peak, TFLOP/s")
    interconnect: Interconnect = Field(description="nvlink, pcie or none")

    def profile(self) -> DeviceProfile:
        return DeviceProfile(**self.model_dump())


def builtin_profile(name: str, key: str = "hardware") -> DeviceProfile:
    """A built-in profile (or ``cpu``) by name; case and ``_`` / ``-`` do not matter."""
    normal = name.strip().lower().replace("_", "-")
    if normal == CPU:
        return cpu_profile()
    if normal in BUILTIN_PROFILES:
        return BUILTIN_PROFILES[normal]
    # "h100" means one of the h100s, not the h200 that difflib finds closest
    close = [n for n in profile_names() if n.startswith(normal)]
    close = close or difflib.get_close_matches(normal, profile_names(), n=1)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise ConfigError(
        f"{key}: no device profile named {name!r}{hint}; known: {', '.join(profile_names())}. "
        f"Or give a mapping of {', '.join(f.name for f in fields(DeviceProfile))}"
    )


def profile_from_mapping(raw: Mapping, key: str = "hardware") -> DeviceProfile:
    """A user's profile from a mapping of every field; ``ConfigError`` names a bad one."""
    return _validated(raw, f"{key}.")


def _validated(raw: Mapping, prefix: str) -> DeviceProfile:
    # prefix + field name the offending key: "hardware.memory_gib", "hardware: gpu.yaml: ..."
    try:
        return DeviceProfileSpec.model_validate(dict(raw)).profile()
    except ValidationError as err:
        raise ConfigError("; ".join(_describe(prefix, e) for e in err.errors())) from None


def _describe(prefix: str, err: dict) -> str:
    field = prefix + ".".join(str(p) for p in err["loc"])
    names = ", ".join(f.name for f in fields(DeviceProfile))
    if err["type"] == "missing":
        return f"{field} is missing (a device profile gives {names})"
    if err["type"] == "extra_forbidden":
        return f"{field} is not a device profile field ({names})"
    return f"{field}: {err['msg']} (got {err.get('input')!r})"


def load_profile(path: Path, key: str = "hardware") -> DeviceProfile:
    """A user's profile from a YAML file holding the mapping."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{key}: cannot read device profile {path}: {err}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{key}: device profile {path} must hold a mapping, not {raw!r}")
    return _validated(raw, f"{key}: {path}: ")


def resolve(
    spec: str | Path | Mapping | DeviceProfile | None, key: str = "hardware"
) -> DeviceProfile:
    """The profile a run plans with: detected (None or ``"auto"``), a built-in's name, a
    mapping of every field, or a YAML file of one. ``key`` names the config key in errors."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        return detect()
    if isinstance(spec, DeviceProfile):
        return spec
    if isinstance(spec, Mapping):
        return profile_from_mapping(spec, key)
    if isinstance(spec, Path) or (isinstance(spec, str) and spec.endswith((".yaml", ".yml"))):
        return load_profile(Path(spec), key)
    if isinstance(spec, str):
        return builtin_profile(spec, key)
    raise ConfigError(
        f"{key}: expected a device profile name or a mapping, got {type(spec).__name__} {spec!r}"
    )
