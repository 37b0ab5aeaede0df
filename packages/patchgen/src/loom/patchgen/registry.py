"""Finding patch configs: explicit references, or the `loom.patchgen.configs` entry points.

A reference is `package.module` (the module's `config`) or `package.module:name`. Packages
register theirs in pyproject.toml:

    [project.entry-points."loom.patchgen.configs"]
    qwen3 = "loom.models.qwen3.patch_config"
    qwen3-v4 = "loom.models.qwen3.patch_config_v4"

A config's files live in `generated/v<major>/` beside its module, one folder per
transformers major it lists in `transformers_majors`.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
from pathlib import Path

from loom.patchgen.config import PatchConfig, PatchError

ENTRY_POINT_GROUP = "loom.patchgen.configs"


@dataclasses.dataclass(frozen=True)
class ConfigEntry:
    ref: str  # "loom.models.qwen3.patch_config" or "package.module:name"
    config: PatchConfig
    module_file: Path

    def output_dir(self, major: int) -> Path:
        return self.module_file.parent / "generated" / f"v{major}"

    @property
    def regenerate_command(self) -> str:
        return f"loom-patchgen generate {self.ref} --diff"


def load(ref: str) -> ConfigEntry:
    """Import the config `ref` names; PatchError says what is missing."""
    module_name, _, attribute = ref.partition(":")
    attribute = attribute or "config"
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise PatchError(f"cannot import patch config module {module_name!r}: {error}") from None
    config = getattr(module, attribute, None)
    if not isinstance(config, PatchConfig):
        found = type(config).__name__ if config is not None else "nothing"
        raise PatchError(
            f"{module_name}.{attribute} should be a PatchConfig but is {found}; "
            f"name the config as '{module_name}:<name>' if it is called something else"
        )
    return ConfigEntry(ref, config, Path(module.__file__))


def registered_refs() -> list[str]:
    """Config references of every installed distribution, in a stable order."""
    points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return sorted({point.value for point in points})


def for_major(entries: list[ConfigEntry], major: int) -> list[ConfigEntry]:
    return [e for e in entries if major in e.config.transformers_majors]


def coverage(entries: list[ConfigEntry]) -> str:
    """`"ref (v4, v5), ..."`: which majors each config covers, for messages."""
    return ", ".join(
        f"{e.ref} ({', '.join(f'v{m}' for m in e.config.transformers_majors)})" for e in entries
    )
