import dataclasses
import logging
import os
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml

from loom.trainer.errors import ConfigError
from loom.trainer.planner.hardware import (
    BUILTIN_PROFILES,
    CPU_TFLOPS,
    GENERIC_GPU,
    GENERIC_GPU_TFLOPS,
    GIB,
    INTERCONNECTS,
    DeviceProfile,
    detect,
    host_memory_bytes,
    profile_for_device,
    profile_names,
    resolve,
)

H100_BYTES = 81559 * 2**20  # what an H100 80GB HBM3 reports (nvidia-smi: 81559 MiB)
GOOD = {"name": "my-gpu", "memory_gib": 48, "bf16_tflops": 200, "interconnect": "pcie"}


def sysconf_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda answering as a machine with the given GPU (None: no CUDA)."""

    def install(name: str | None, total_memory: int = H100_BYTES) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: name is not None)
        props = SimpleNamespace(name=name, total_memory=total_memory)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=0: props)

    return install


# ---- built-in profiles -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "memory_gib", "tflops", "interconnect"),
    [
        ("h100-sxm", 80, 989.5, "nvlink"),
        ("h100-pcie", 80, 756.5, "pcie"),
        ("h200", 141, 989.5, "nvlink"),
        ("a100-80gb", 80, 312, "nvlink"),
        ("a100-40gb", 40, 312, "nvlink"),
        ("l40s", 48, 362, "pcie"),
        ("rtx-4090", 24, 165.2, "pcie"),
    ],
)
def test_builtin_datasheet_numbers(name, memory_gib, tflops, interconnect):
    profile = BUILTIN_PROFILES[name]
    assert profile == DeviceProfile(name, memory_gib, tflops, interconnect)
    assert profile.memory_bytes == memory_gib * GIB
    assert profile.peak_flops == tflops * 1e12


def test_builtins_are_consistent_and_immutable():
    for name, profile in BUILTIN_PROFILES.items():
        assert profile.name == name and profile.interconnect in INTERCONNECTS
        assert profile.memory_gib > 0 and profile.bf16_tflops > 0
    assert set(profile_names()) == {*BUILTIN_PROFILES, "cpu"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        BUILTIN_PROFILES["h100-sxm"].memory_gib = 1
    with pytest.raises(TypeError):
        BUILTIN_PROFILES["mine"] = BUILTIN_PROFILES["h100-sxm"]


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        (("", 80, 900, "nvlink"), "needs a name"),
        (("x", -1, 900, "nvlink"), "must be positive"),
        (("x", 80, 0, "nvlink"), "must be positive"),
        (("x", 80, 900, "infiniband"), "'infiniband' is not one of nvlink, pcie, none"),
    ],
)
def test_profile_checks_its_fields(fields, needle):
    with pytest.raises(ValueError, match=needle):
        DeviceProfile(*fields)


# ---- detection ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device_name", "profile"),
    [
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
        ("NVIDIA A100 80GB PCIe", "a100-80gb-pcie"),
        ("NVIDIA A100-PCIE-40GB", "a100-40gb-pcie"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA GeForce RTX 4090", "rtx-4090"),
        # not listed: other parts of the same name
        ("NVIDIA H100 NVL", GENERIC_GPU),
        ("NVIDIA L40", GENERIC_GPU),
        ("NVIDIA B200", GENERIC_GPU),
    ],
)
def test_device_names(device_name, profile):
    assert profile_for_device(device_name, 40 * GIB).name == profile


def test_detect_known_gpu_keeps_its_numbers_and_measures_memory(fake_gpu):
    fake_gpu("NVIDIA H100 80GB HBM3")
    profile = detect()
    assert profile == dataclasses.replace(BUILTIN_PROFILES["h100-sxm"], memory_gib=H100_BYTES / GIB)
    assert profile.memory_bytes == H100_BYTES
    fake_gpu("NVIDIA H200", 143771 * 2**20)
    assert (detect().name, detect().bf16_tflops, detect().interconnect) == ("h200", 989.5, "nvlink")


def test_detect_unknown_gpu_is_generic_with_its_memory(fake_gpu, caplog):
    fake_gpu("NVIDIA B200", 192 * GIB)
    with caplog.at_level(logging.WARNING):
        profile = detect()
    assert profile == DeviceProfile(GENERIC_GPU, 192, GENERIC_GPU_TFLOPS, "pcie")
    assert "NVIDIA B200" in caplog.text and "hardware" in caplog.text


def test_detect_without_cuda_is_the_cpu(fake_gpu):
    fake_gpu(None)
    profile = detect()
    assert (profile.name, profile.bf16_tflops, profile.interconnect) == ("cpu", CPU_TFLOPS, "none")
    assert profile.memory_bytes == pytest.approx(sysconf_bytes(), rel=0.01)


def test_host_memory_without_psutil(monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil raises ImportError
    assert host_memory_bytes() == sysconf_bytes()


# ---- the config's override ---------------------------------------------------------------


def test_resolve_detects_when_nothing_is_given(fake_gpu):
    fake_gpu("NVIDIA H200", 140 * GIB)
    assert resolve(None).name == resolve("auto").name == resolve(" AUTO ").name == "h200"
    fake_gpu(None)
    assert resolve(None).name == "cpu"


@pytest.mark.parametrize("spelling", ["h100-sxm", "H100-SXM", "h100_sxm", " h100-sxm "])
def test_resolve_builtin_names(spelling, fake_gpu):
    fake_gpu("NVIDIA L40S")  # a name wins over the device
    assert resolve(spelling) is BUILTIN_PROFILES["h100-sxm"]


def test_resolve_cpu_profile_object_and_mapping():
    assert resolve("cpu").name == "cpu" and resolve("cpu").interconnect == "none"
    mine = DeviceProfile("mine", 10, 20, "none")
    assert resolve(mine) is mine
    assert resolve(GOOD) == DeviceProfile("my-gpu", 48.0, 200.0, "pcie")
    assert resolve({**GOOD, "memory_gib": "70.5"}).memory_gib == 70.5  # YAML / CLI strings


def test_resolve_yaml_file(tmp_path):
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    assert resolve(str(path)) == resolve(path) == resolve(GOOD)


def test_unknown_name_suggests_a_known_one():
    with pytest.raises(ConfigError, match=r"hardware: no device profile named 'h100'") as err:
        resolve("h100")
    assert "did you mean h100-sxm or h100-pcie?" in str(err.value) and "rtx-4090" in str(err.value)
    with pytest.raises(ConfigError, match=r"did you mean l40s\?"):
        resolve("l40")
    with pytest.raises(ConfigError, match=r"'tpu-v5'; known: h100-sxm"):
        resolve("tpu-v5")


@pytest.mark.parametrize("field", list(GOOD))
def test_missing_field_is_named(field):
    raw = {k: v for k, v in GOOD.items() if k != field}
    with pytest.raises(ConfigError, match=rf"hardware\.{field} is missing"):
        resolve(raw)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"memory_gib": -80}, r"hardware\.memory_gib: Input should be greater than 0 \(got -80\)"),
        ({"memory_gib": 0}, r"hardware\.memory_gib: Input should be greater than 0"),
        ({"bf16_tflops": -1.5}, r"hardware\.bf16_tflops: Input should be greater than 0"),
        ({"memory_gib": "lots"}, r"hardware\.memory_gib: .*number.*'lots'"),
        ({"interconnect": "infiniband"}, r"hardware\.interconnect: .*'nvlink'.*'infiniband'"),
        ({"name": ""}, r"hardware\.name: .*at least 1 character"),
        ({"memory": 80}, r"hardware\.memory is not a device profile field"),
    ],
)
def test_malformed_profile_names_the_field(change, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve({**GOOD, **change})


def test_every_problem_is_reported_at_once_under_the_callers_key():
    with pytest.raises(ConfigError) as err:
        resolve({"name": "x", "memory_gib": -1, "interconnect": "ib"}, key="plan.hardware")
    message = str(err.value)
    for field in ("memory_gib", "bf16_tflops", "interconnect"):
        assert f"plan.hardware.{field}" in message


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "cannot read device profile"),
        ("[1, 2]", "must hold a mapping"),
        ("name: x\nmemory_gib: [", "cannot read device profile"),
        (
            yaml.safe_dump({**GOOD, "memory_gib": -1}),
            r"hardware: .*gpu.yaml: memory_gib: Input should be greater than 0",
        ),
    ],
)
def test_bad_profile_file_is_named(tmp_path, content, needle):
    path = tmp_path / "gpu.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=needle) as err:
        resolve(str(path))
    assert "gpu.yaml" in str(err.value)


@pytest.mark.parametrize("spec", [42, 1.5, ["h100-sxm"]])
def test_other_types_are_refused(spec):
    with pytest.raises(ConfigError, match="expected a device profile name or a mapping"):
        resolve(spec)
