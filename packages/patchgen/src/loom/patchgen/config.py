"""The `PatchConfig` DSL: what one patch config declares about one upstream module.

Nothing here reads upstream source; declarations are checked against it when the file is
generated (`loom.patchgen.codegen`).
"""

from __future__ import annotations

import dataclasses
import importlib
import textwrap
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

import libcst as cst

PatchKind = Literal["replace_class", "replace_function", "override_method", "modify_init"]
R = TypeVar("R")


class PatchError(Exception):
    """A patch config that cannot be applied; the message names the patch and what to do."""


@dataclasses.dataclass(frozen=True)
class External:
    """A replacement imported from another module instead of copied into the generated file."""

    module: str
    name: str

    def load(self) -> Any:
        """The replacement object; PatchError when the module or the name is missing."""
        try:
            module = importlib.import_module(self.module)
        except ImportError as error:
            raise PatchError(
                f"cannot import external replacement module {self.module!r}: {error}"
            ) from None
        if not hasattr(module, self.name):
            raise PatchError(f"external replacement module {self.module!r} has no {self.name!r}")
        return getattr(module, self.name)


def create_patch_from_external(module: str, name: str) -> External:
    """A replacement for `replace_class` / `replace_function` imported from `module.name`.

    The generated file imports it under the upstream name instead of copying its source,
    e.g. a Loom kernel module replacing `Qwen3RMSNorm`.
    """
    return External(module, name)


@dataclasses.dataclass(frozen=True)
class Patch:
    """One declared change to one upstream definition."""

    kind: PatchKind
    target: str  # "Qwen3RMSNorm", "apply_rotary_pos_emb" or "Qwen3Attention.forward"
    replacement: Any  # a class or function written in the config, or an External
    description: str
    name_map: Mapping[str, str] = dataclasses.field(default_factory=dict)
    allow_signature_change: bool = False
    keep_decorators: bool = True

    @property
    def label(self) -> str:
        return f"{self.kind}({self.target!r})"


@dataclasses.dataclass(frozen=True)
class ImportSpec:
    """`from module import names` when names are given, else `import module [as alias]`."""

    module: str
    names: tuple[str, ...] = ()
    alias: str | None = None

    def code(self) -> str:
        if self.names:
            return f"from {self.module} import {', '.join(self.names)}"
        return f"import {self.module}" + (f" as {self.alias}" if self.alias else "")


@dataclasses.dataclass
class PatchConfig:
    """The patches for one upstream module, for the transformers majors listed.

    `target_file` is a file name (`patched_modeling_qwen3.py`); the registry decides the
    folder (`generated/v<major>/` beside the config module).
    """

    source_module: str
    target_file: str
    description: str
    transformers_majors: tuple[int, ...]
    patches: list[Patch] = dataclasses.field(default_factory=list)
    imports: list[ImportSpec] = dataclasses.field(default_factory=list)
    post_import_blocks: list[str] = dataclasses.field(default_factory=list)
    dropped_import_names: list[str] = dataclasses.field(default_factory=list)
    excluded: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        name = self.target_file
        if "/" in name or "\\" in name or not name.endswith(".py"):
            raise PatchError(
                f"PatchConfig(target_file={name!r}) for {self.source_module}: give a bare file "
                "name ending in .py, e.g. 'patched_modeling_qwen3.py'"
            )
        majors = tuple(self.transformers_majors)
        if not majors or not all(isinstance(m, int) for m in majors):
            raise PatchError(
                f"PatchConfig for {self.source_module}: transformers_majors must list the "
                f"transformers majors it is written for, e.g. (5,); got {self.transformers_majors!r}"
            )
        self.transformers_majors = majors

    def replace_class(
        self,
        target: str,
        replacement: type | External | None = None,
        *,
        description: str,
        name_map: Mapping[str, str] | None = None,
        allow_signature_change: bool = False,
    ) -> Callable[[R], R] | None:
        """Replace the upstream class `target`; a decorator unless `replacement` is given."""
        options = {
            "name_map": dict(name_map or {}),
            "allow_signature_change": allow_signature_change,
        }
        return self._register("replace_class", target, replacement, description, options)

    def replace_function(
        self,
        target: str,
        replacement: Callable[..., Any] | External | None = None,
        *,
        description: str,
        name_map: Mapping[str, str] | None = None,
        allow_signature_change: bool = False,
    ) -> Callable[[R], R] | None:
        """Replace the module-level function `target`; a decorator unless `replacement` is given."""
        options = {
            "name_map": dict(name_map or {}),
            "allow_signature_change": allow_signature_change,
        }
        return self._register("replace_function", target, replacement, description, options)

    def override_method(
        self,
        target: str,
        replacement: Callable[..., Any] | None = None,
        *,
        description: str,
        name_map: Mapping[str, str] | None = None,
        allow_signature_change: bool = False,
        keep_decorators: bool = True,
    ) -> Callable[[R], R] | None:
        """Replace `Class.method`; a decorator unless `replacement` is given.

        The upstream decorators stay on the method (`keep_decorators=True`); with False the
        replacement's own decorators are used instead.
        """
        options = {
            "name_map": dict(name_map or {}),
            "allow_signature_change": allow_signature_change,
            "keep_decorators": keep_decorators,
        }
        return self._register("override_method", target, replacement, description, options)

    def modify_init(
        self,
        target: str,
        replacement: Callable[..., Any] | None = None,
        *,
        description: str,
        name_map: Mapping[str, str] | None = None,
    ) -> Callable[[R], R] | None:
        """Append the body of a function to the upstream `target.__init__`.

        The function takes the same parameters as the upstream `__init__`; its statements
        run after the upstream body, in the same scope.
        """
        options = {"name_map": dict(name_map or {})}
        return self._register("modify_init", target, replacement, description, options)

    def add_import(
        self, module: str, names: tuple[str, ...] | list[str] = (), alias: str | None = None
    ) -> None:
        """Add `from module import names` (or `import module [as alias]`) after upstream's imports."""
        if names and alias:
            raise PatchError(f"add_import({module!r}): give names or alias, not both")
        self.imports.append(ImportSpec(module, tuple(names), alias))

    def drop_import_names(self, *names: str) -> None:
        """Remove names from upstream's top-level imports (an emptied import disappears)."""
        self.dropped_import_names.extend(names)

    def add_post_import_block(self, code: str) -> None:
        """Insert raw module-level code after the imports (guarded imports, helpers)."""
        code = textwrap.dedent(code).strip() + "\n"
        try:
            cst.parse_module(code)
        except cst.ParserSyntaxError as error:
            first = code.splitlines()[0]
            raise PatchError(
                f"add_post_import_block starting {first!r} in the config for "
                f"{self.source_module} is not valid Python: {error}"
            ) from None
        self.post_import_blocks.append(code)

    def exclude_from_output(self, *names: str) -> None:
        """Leave top-level classes, functions or assignments out (and out of `__all__`)."""
        self.excluded.extend(names)

    def _register(
        self,
        kind: PatchKind,
        target: str,
        replacement: Any,
        description: str,
        options: dict[str, Any],
    ) -> Callable[[R], R] | None:
        def register(obj: R) -> R:
            self._add(Patch(kind, target, obj, description, **options))
            return obj

        if replacement is None:
            return register
        register(replacement)
        return None

    def _add(self, patch: Patch) -> None:
        label = f"{patch.label} in the config for {self.source_module}"
        dotted = patch.kind == "override_method"
        parts = patch.target.split(".")
        if len(parts) != (2 if dotted else 1) or not all(p.isidentifier() for p in parts):
            shape = "'Class.method'" if dotted else "a top-level name"
            raise PatchError(f"{label}: the target must be {shape}")
        if not patch.description.strip() or "\n" in patch.description:
            raise PatchError(
                f"{label}: give description= one line saying what changed and why "
                "(it becomes the # [PATCHED by loom.patchgen: ...] marker)"
            )
        if isinstance(patch.replacement, External) and patch.kind not in (
            "replace_class",
            "replace_function",
        ):
            raise PatchError(f"{label}: external replacements replace whole classes or functions")
        if isinstance(patch.replacement, External) and patch.name_map:
            raise PatchError(f"{label}: name_map rewrites copied source; an external is imported")
        for other in self.patches:
            mine, theirs = _touched(patch), _touched(other)
            if mine == theirs or mine.startswith(theirs + ".") or theirs.startswith(mine + "."):
                raise PatchError(f"{label}: {patch.target} is already patched by {other.label}")
        self.patches.append(patch)


def _touched(patch: Patch) -> str:
    """The upstream definition a patch rewrites, as a dotted path."""
    return f"{patch.target}.__init__" if patch.kind == "modify_init" else patch.target
