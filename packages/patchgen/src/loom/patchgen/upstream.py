"""The upstream module a config patches: its source text, where it lives, which release."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
from pathlib import Path

from loom.patchgen.config import PatchError


@dataclasses.dataclass(frozen=True)
class Upstream:
    module: str  # "transformers.models.qwen3.modeling_qwen3"
    package: str  # the package its relative imports resolve against
    source: str
    relative_path: str  # "transformers/models/qwen3/modeling_qwen3.py", for the diff
    release: str  # "transformers 5.17.0"


def read_upstream(module: str) -> Upstream:
    """Read `module`'s source through importlib, without importing the module itself."""
    try:
        spec = importlib.util.find_spec(module)
    except ImportError as error:
        raise PatchError(f"upstream module {module!r} cannot be found: {error}") from None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise PatchError(
            f"upstream module {module!r} has no Python source here; is the package that "
            "provides it installed in this environment?"
        )
    is_package = spec.submodule_search_locations is not None
    relative = module.replace(".", "/") + ("/__init__.py" if is_package else ".py")
    return Upstream(
        module=module,
        package=module if is_package else module.rpartition(".")[0],
        source=Path(spec.origin).read_text(encoding="utf-8"),
        relative_path=relative,
        release=release_of(module),
    )


def release_of(module: str) -> str:
    """`"<distribution> <version>"` of the top-level package that provides `module`."""
    top = module.partition(".")[0]
    try:
        return f"{top} {importlib.metadata.version(top)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{top}, not an installed distribution"


def installed_transformers() -> str | None:
    """The installed transformers version, or None where it is not installed."""
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def major_of(version: str) -> int:
    return int(version.partition(".")[0])
