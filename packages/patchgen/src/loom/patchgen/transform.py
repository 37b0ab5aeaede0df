"""Syntax-tree edits of an upstream module (libcst keeps every untouched comment and line).

Each function takes the module and returns the edited module; targets are checked to exist
before any edit runs (`loom.patchgen.validate`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence

import libcst as cst

from loom.patchgen.config import External, ImportSpec, Patch
from loom.patchgen.replacement import Written

MARKER = "# [PATCHED by loom.patchgen: {}]"

Definition = cst.ClassDef | cst.FunctionDef


def _marker(description: str) -> cst.EmptyLine:
    return cst.EmptyLine(comment=cst.Comment(MARKER.format(description)))


def top_level_name(statement: cst.CSTNode) -> str | None:
    """The name a top-level class, function or single-target assignment binds."""
    if isinstance(statement, Definition):
        return statement.name.value
    if isinstance(statement, cst.SimpleStatementLine) and len(statement.body) == 1:
        small = statement.body[0]
        if isinstance(small, cst.Assign) and len(small.targets) == 1:
            target = small.targets[0].target
            return target.value if isinstance(target, cst.Name) else None
        if isinstance(small, cst.AnnAssign) and isinstance(small.target, cst.Name):
            return small.target.value
    return None


class _AbsoluteImports(cst.CSTTransformer):
    def __init__(self, package: str) -> None:
        super().__init__()
        self._package = package

    def leave_ImportFrom(
        self, original_node: cst.ImportFrom, updated_node: cst.ImportFrom
    ) -> cst.ImportFrom:
        if not updated_node.relative:
            return updated_node
        dots = "." * len(updated_node.relative)
        name = cst.Module([]).code_for_node(updated_node.module) if updated_node.module else ""
        absolute = importlib.util.resolve_name(dots + name, self._package)
        return updated_node.with_changes(
            relative=[],
            module=cst.parse_expression(absolute),
            whitespace_after_from=cst.SimpleWhitespace(" "),
        )


def absolutize_imports(module: cst.Module, package: str) -> cst.Module:
    """`from ...utils import x` in `transformers.models.qwen3` -> `from transformers.utils import x`."""
    return module.visit(_AbsoluteImports(package))


def drop_import_names(module: cst.Module, names: Sequence[str]) -> cst.Module:
    """Remove `names` from top-level import statements; an emptied statement disappears."""
    if not names:
        return module
    body = []
    for statement in module.body:
        small = _import_of(statement)
        if small is None or isinstance(small.names, cst.ImportStar):
            body.append(statement)
            continue
        kept = [a for a in small.names if bound_name(a) not in names]
        if kept:
            # The new last name takes the old last one's comma (a trailing comma or none).
            kept[-1] = kept[-1].with_changes(comma=small.names[-1].comma)
            body.append(statement.with_changes(body=[small.with_changes(names=kept)]))
    return module.with_changes(body=body)


def _import_of(statement: cst.CSTNode) -> cst.Import | cst.ImportFrom | None:
    if isinstance(statement, cst.SimpleStatementLine) and len(statement.body) == 1:
        small = statement.body[0]
        if isinstance(small, cst.Import | cst.ImportFrom):
            return small
    return None


def bound_name(alias: cst.ImportAlias) -> str:
    """The name an import alias binds: `b` for `a as b`, `a` for `a.b.c`."""
    if alias.asname is not None:
        return cst.Module([]).code_for_node(alias.asname.name)
    return cst.Module([]).code_for_node(alias.name).partition(".")[0]


def top_level_imported_names(module: cst.Module) -> list[str]:
    names = []
    for statement in module.body:
        small = _import_of(statement)
        if small is not None and not isinstance(small.names, cst.ImportStar):
            names.extend(bound_name(a) for a in small.names)
    return names


def exclude(module: cst.Module, names: Sequence[str]) -> cst.Module:
    """Drop top-level definitions named in `names` and their entries in `__all__`."""
    if not names:
        return module
    body = [s for s in module.body if top_level_name(s) not in names]
    return module.with_changes(body=[_filter_all(s, names) for s in body])


def _filter_all(statement: cst.BaseStatement, names: Sequence[str]) -> cst.BaseStatement:
    if top_level_name(statement) != "__all__":
        return statement
    assign = statement.body[0]
    if not isinstance(assign.value, cst.List | cst.Tuple):
        return statement
    old = assign.value.elements
    elements = [
        e
        for e in old
        if not (isinstance(e.value, cst.SimpleString) and e.value.evaluated_value in names)
    ]
    if elements:
        elements[-1] = elements[-1].with_changes(comma=old[-1].comma)
    value = assign.value.with_changes(elements=elements)
    return statement.with_changes(body=[assign.with_changes(value=value)])


def replace_top_level(module: cst.Module, patch: Patch, written: Written | None) -> cst.Module:
    """Swap the top-level class or function `patch.target` for its replacement."""
    body = []
    for statement in module.body:
        if isinstance(statement, Definition) and statement.name.value == patch.target:
            statement = _replacement_statement(statement, patch, written)
        body.append(statement)
    return module.with_changes(body=body)


def _replacement_statement(
    upstream: Definition, patch: Patch, written: Written | None
) -> cst.BaseStatement:
    lines = [*upstream.leading_lines, _marker(patch.description)]
    if isinstance(patch.replacement, External):
        # Imported where the class stood, under the upstream name, so every reference
        # to the upstream name (and the diff) stays where it was.
        external = patch.replacement
        alias = "" if external.name == patch.target else f" as {patch.target}"
        statement = cst.parse_statement(f"from {external.module} import {external.name}{alias}\n")
        return statement.with_changes(leading_lines=lines)
    return written.node.with_changes(leading_lines=[*lines, *written.node.leading_lines])


def override_method(module: cst.Module, patch: Patch, written: Written) -> cst.Module:
    """Swap `Class.method` for the replacement, keeping upstream decorators unless told."""
    class_name, method_name = patch.target.split(".")

    def swap(method: cst.FunctionDef) -> cst.FunctionDef:
        lines = [*method.leading_lines, _marker(patch.description), *written.node.leading_lines]
        decorators = method.decorators if patch.keep_decorators else written.node.decorators
        return written.node.with_changes(leading_lines=lines, decorators=decorators)

    return _edit_method(module, class_name, method_name, swap)


def modify_init(module: cst.Module, patch: Patch, written: Written) -> cst.Module:
    """Append the replacement's body to the upstream `__init__` of `patch.target`."""
    extra = list(written.node.body.body)
    if extra and _is_docstring(extra[0]):
        extra = extra[1:]

    def append(init: cst.FunctionDef) -> cst.FunctionDef:
        lines = [*init.leading_lines, _marker(patch.description), *written.node.leading_lines]
        body = init.body.with_changes(body=[*init.body.body, *extra])
        return init.with_changes(leading_lines=lines, body=body)

    return _edit_method(module, patch.target, "__init__", append)


def _is_docstring(statement: cst.BaseStatement) -> bool:
    return (
        isinstance(statement, cst.SimpleStatementLine)
        and isinstance(statement.body[0], cst.Expr)
        and isinstance(statement.body[0].value, cst.SimpleString | cst.ConcatenatedString)
    )


def _edit_method(
    module: cst.Module,
    class_name: str,
    method_name: str,
    edit: Callable[[cst.FunctionDef], cst.FunctionDef],
) -> cst.Module:
    body = []
    for statement in module.body:
        if isinstance(statement, cst.ClassDef) and statement.name.value == class_name:
            members = [
                edit(m) if isinstance(m, cst.FunctionDef) and m.name.value == method_name else m
                for m in statement.body.body
            ]
            statement = statement.with_changes(body=statement.body.with_changes(body=members))
        body.append(statement)
    return module.with_changes(body=body)


def insert_after_imports(
    module: cst.Module, imports: Sequence[ImportSpec], blocks: Sequence[str]
) -> cst.Module:
    """Add the config's imports and post-import blocks after upstream's leading imports."""
    statements = [cst.parse_statement(spec.code() + "\n") for spec in imports]
    for block in blocks:
        statements.extend(cst.parse_module(block).body)
    if not statements:
        return module
    first = statements[0]
    statements[0] = first.with_changes(
        leading_lines=[cst.EmptyLine(), _marker("added by the patch config"), *first.leading_lines]
    )
    at = _end_of_imports(module)
    return module.with_changes(body=[*module.body[:at], *statements, *module.body[at:]])


def _end_of_imports(module: cst.Module) -> int:
    """Index of the first top-level statement after the leading docstring and imports."""
    for index, statement in enumerate(module.body):
        if _import_of(statement) is None and not (index == 0 and _is_docstring(statement)):
            return index
    return len(module.body)
