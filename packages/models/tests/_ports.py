"""The test matrices, derived from what is registered: every port folder of loom.models
(``registry.PORTS``) with its toy config in ``tests/toy_config/<model>_toy/``. A new port
joins every suite by adding those two. What a port cannot do is said here, per case (as
the model-testing SOP's matrices do): the transformers majors it runs under, the
attention backends, the largest sequence-parallel size, its tolerances.

On the path through pytest's ``pythonpath`` setting (pyproject.toml), as the suites'
other helpers are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import transformers

from loom.models.registry import PORTS

ROOT = Path(__file__).resolve().parents[3]
TOY = ROOT / "tests" / "toy_config"
MAJOR = int(transformers.__version__.split(".")[0])
BACKENDS = ("eager", "sdpa", "loom_sdpa", "loom_varlen")


def toy(name: str) -> Path:
    return TOY / f"{name}_toy"


@dataclass(frozen=True)
class PortCase:
    name: str
    moe: bool
    vlm: bool = False  # a vision-language model (tests with images: test_vlm.py)
    min_major: int = 4  # 5: a v5-only case
    backends: tuple[str, ...] = BACKENDS
    max_sp_size: int = 4  # the toy's kv heads bound it
    rtol: float = 1e-5  # fp32 on CPU
    atol: float = 1e-6
    marks: tuple = field(default=(), compare=False)

    def param(self, *values) -> pytest.param:
        """This case as a pytest.param of ``(name, *values)``, skipped under a major it
        does not run under."""
        skip = pytest.mark.skipif(
            self.min_major > MAJOR,
            reason=f"{self.name} runs under transformers >= {self.min_major}",
        )
        return pytest.param(self.name, *values, marks=(skip, *self.marks))


def _is_moe(name: str) -> bool:
    config = json.loads((toy(name) / "config.json").read_text())
    config = config.get("text_config", config)  # a VLM's experts are its text decoder's
    return any(key in config for key in ("num_experts", "num_local_experts"))


def _is_vlm(name: str) -> bool:
    return "vision_config" in json.loads((toy(name) / "config.json").read_text())


# What a port cannot do, by name; a port absent here runs every case.
LIMITS: dict[str, dict] = {}

CASES = {
    name: PortCase(name, _is_moe(name), _is_vlm(name), **LIMITS.get(name, {})) for name in PORTS
}
DENSE = [name for name, case in CASES.items() if not case.moe and not case.vlm]
MOE = [name for name, case in CASES.items() if case.moe and not case.vlm]
VLM = [name for name, case in CASES.items() if case.vlm]


def decoder_layers(model) -> list:
    """The text decoder's layers: ``model.model.layers``, or a VLM's
    ``model.model.language_model.layers``."""
    return list(getattr(model.model, "language_model", model.model).layers)


def params(names: list[str]) -> list[pytest.param]:
    return [CASES[name].param() for name in names]


def sp_params(names: list[str], sizes: tuple[int, ...]) -> list[pytest.param]:
    """``(name, sp)`` for each size the port's toy takes."""
    return [CASES[n].param(sp) for n in names for sp in sizes if sp <= CASES[n].max_sp_size]


def backend_params(names: list[str], backends=BACKENDS) -> list[pytest.param]:
    """``(name, backend)`` for each backend the port supports."""
    return [CASES[n].param(b) for n in names for b in backends if b in CASES[n].backends]
