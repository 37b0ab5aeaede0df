"""Replacement code written in a patch config, as syntax ready to splice into upstream.

The replacement's own source is read back with `inspect` (with the comment block above it,
which carries the numbered patch header), stripped of the DSL decorator, renamed to the
upstream name and passed through the patch's `name_map`.
"""

from __future__ import annotations

import dataclasses
import inspect
import linecache
import textwrap
from collections.abc import Mapping

import libcst as cst

from loom.patchgen.config import Patch, PatchError

DSL_VERBS = frozenset({"replace_class", "replace_function", "override_method", "modify_init"})


@dataclasses.dataclass(frozen=True)
class Written:
    """A replacement definition, renamed and name-mapped, with its header comments."""

    node: cst.ClassDef | cst.FunctionDef
    header: tuple[str, ...]  # the comment lines above the replacement in the config
    renamed_calls: tuple[str, ...]  # constructors name_map renamed (arguments unchanged)
    origin: str  # "path/to/patch_config.py:42", for messages


def written_replacement(patch: Patch, new_name: str) -> Written:
    """The replacement of `patch`, named `new_name`, as a class or function definition."""
    obj = patch.replacement
    comments, source, origin = _comments_source_origin(patch)
    module = cst.parse_module(textwrap.dedent(comments + source))
    node = module.body[0]
    wanted = cst.ClassDef if patch.kind == "replace_class" else cst.FunctionDef
    if not isinstance(node, wanted):
        what = "class" if wanted is cst.ClassDef else "function"
        raise PatchError(f"{patch.label} ({origin}): the replacement must be a {what}")
    decorators = [d for d in node.decorators if not _is_dsl_decorator(d)]
    node = node.with_changes(
        name=cst.Name(new_name),
        decorators=decorators,
        leading_lines=[*module.header, *node.leading_lines],
    )
    exact = {obj.__name__: new_name} if obj.__name__ != new_name else {}
    renamer = _Renamer(exact, patch.name_map)
    node = node.visit(renamer)
    header = tuple(line.rstrip() for line in textwrap.dedent(comments).splitlines())
    return Written(node, header, tuple(sorted(renamer.renamed_calls)), origin)


def _comments_source_origin(patch: Patch) -> tuple[str, str, str]:
    """The comment lines right above the replacement (its patch header), its source, file:line."""
    obj = inspect.unwrap(patch.replacement)  # decorators are in the source anyway
    try:
        lines, start = inspect.getsourcelines(obj)
        file_lines = linecache.getlines(inspect.getsourcefile(obj))
    except (OSError, TypeError) as error:
        raise PatchError(
            f"{patch.label}: cannot read the source of the replacement "
            f"{patch.replacement!r} ({error}); define it in a .py file"
        ) from None
    first = start - 1
    while first > 0 and file_lines[first - 1].lstrip().startswith("#"):
        first -= 1
    origin = f"{inspect.getsourcefile(obj)}:{start}"
    return "".join(file_lines[first : start - 1]), "".join(lines), origin


def _is_dsl_decorator(decorator: cst.Decorator) -> bool:
    call = decorator.decorator
    return (
        isinstance(call, cst.Call)
        and isinstance(call.func, cst.Attribute)
        and call.func.attr.value in DSL_VERBS
    )


def rename(name: str, exact: Mapping[str, str], prefixes: Mapping[str, str]) -> str:
    """`name` after an exact rename or, failing that, the longest matching prefix rename.

    A name that already carries the new prefix is left alone, so {"Qwen3": "Qwen3Moe"} does
    not turn `Qwen3MoeExperts` into `Qwen3MoeMoeExperts`.
    """
    if name in exact:
        return exact[name]
    for old in sorted(prefixes, key=len, reverse=True):
        new = prefixes[old]
        if name.startswith(old) and not (new.startswith(old) and name.startswith(new)):
            return new + name[len(old) :]
    return name


class _Renamer(cst.CSTTransformer):
    """Rewrites symbol references (not attributes, keywords or imported names)."""

    def __init__(self, exact: Mapping[str, str], prefixes: Mapping[str, str]) -> None:
        super().__init__()
        self._exact = exact
        self._prefixes = prefixes
        self._not_symbols: set[int] = set()
        self.renamed_calls: set[str] = set()

    def visit_Attribute(self, node: cst.Attribute) -> None:
        self._not_symbols.add(id(node.attr))

    def visit_Arg(self, node: cst.Arg) -> None:
        if node.keyword is not None:
            self._not_symbols.add(id(node.keyword))

    def visit_Import(self, node: cst.Import) -> bool:
        return False

    def visit_ImportFrom(self, node: cst.ImportFrom) -> bool:
        return False

    def visit_Call(self, node: cst.Call) -> None:
        if isinstance(node.func, cst.Name):
            new = rename(node.func.value, {}, self._prefixes)
            if new != node.func.value:
                self.renamed_calls.add(f"{node.func.value}(...) -> {new}(...)")

    def leave_Name(self, original_node: cst.Name, updated_node: cst.Name) -> cst.Name:
        if id(original_node) in self._not_symbols:
            return updated_node
        return updated_node.with_changes(
            value=rename(updated_node.value, self._exact, self._prefixes)
        )
