"""Everything that can be wrong with a patch, found before (or right after) generating.

Each check returns `Problem`s rather than raising, so that `generate` can report them all
at once and `canary` can report them patch by patch.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import re
from collections.abc import Iterable, Mapping

import libcst as cst

from loom.patchgen.config import External, Patch, PatchConfig, PatchError
from loom.patchgen.replacement import Written
from loom.patchgen.transform import top_level_imported_names, top_level_name

_NUMBERED_ITEM = re.compile(r"^#\s*(\d+)\.\s+\S")
_REGION_MARKER = re.compile(r"#\s*---\s*Patch\.(\d+)\s*---")


@dataclasses.dataclass(frozen=True)
class Problem:
    subject: str  # the patch label, or the config verb ("drop_import_names('x')")
    kind: str  # "target missing", "signature changed", "undefined name", ...
    message: str


class PatchProblems(PatchError):
    """PatchError carrying the problems it lists, for callers that report them one by one."""

    def __init__(self, where: str, problems: list[Problem]) -> None:
        lines = "\n".join(f"  - {p.subject}: {p.message}" for p in problems)
        super().__init__(f"{where}: {len(problems)} problem(s)\n{lines}")
        self.problems = problems


def raise_if_any(problems: list[Problem], where: str) -> None:
    if problems:
        raise PatchProblems(where, problems)


@dataclasses.dataclass(frozen=True)
class UpstreamIndex:
    """The top-level definitions of an upstream module, by name."""

    classes: Mapping[str, cst.ClassDef]
    functions: Mapping[str, cst.FunctionDef]
    top_level: tuple[str, ...]
    imported: tuple[str, ...]

    @classmethod
    def of(cls, module: cst.Module) -> UpstreamIndex:
        body = module.body
        return cls(
            classes={s.name.value: s for s in body if isinstance(s, cst.ClassDef)},
            functions={s.name.value: s for s in body if isinstance(s, cst.FunctionDef)},
            top_level=tuple(n for n in map(top_level_name, body) if n is not None),
            imported=tuple(top_level_imported_names(module)),
        )

    def methods(self, class_name: str) -> dict[str, cst.FunctionDef]:
        members = self.classes[class_name].body.body
        return {m.name.value: m for m in members if isinstance(m, cst.FunctionDef)}


def _missing(what: str, name: str, candidates: Iterable[str], where: str) -> str:
    candidates = sorted(candidates)
    near = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    listing = [f"near names: {', '.join(near)}"] if near else []
    if len(candidates) <= 30 or not near:
        listing.append(f"it has: {', '.join(candidates)}")
    return f"{where} defines no {what} {name!r}; {'; '.join(listing)}"


def target_problems(config: PatchConfig, index: UpstreamIndex, where: str) -> list[Problem]:
    """Patches, exclusions and dropped imports that name something upstream lacks."""
    problems = []
    for patch in config.patches:
        message = _target_message(patch, index, where)
        if message:
            problems.append(Problem(patch.label, "target missing", message))
    patched = {p.target.partition(".")[0] for p in config.patches}
    for name in config.excluded:
        if name in patched:
            message = "it is also patched; patch it or exclude it, not both"
            problems.append(Problem(f"exclude_from_output({name!r})", "conflict", message))
        elif name not in index.top_level:
            message = _missing("top-level name", name, index.top_level, where)
            problems.append(Problem(f"exclude_from_output({name!r})", "target missing", message))
    for name in config.dropped_import_names:
        if name not in index.imported:
            message = _missing("top-level import of", name, index.imported, where)
            problems.append(Problem(f"drop_import_names({name!r})", "target missing", message))
    return problems


def _target_message(patch: Patch, index: UpstreamIndex, where: str) -> str | None:
    if patch.kind == "replace_function":
        if patch.target not in index.functions:
            return _missing("function", patch.target, index.functions, where)
        return None
    class_name, _, method = patch.target.partition(".")
    if class_name not in index.classes:
        return _missing("class", class_name, index.classes, where)
    method = method or ("__init__" if patch.kind == "modify_init" else "")
    if method and method not in index.methods(class_name):
        return _missing("method", method, index.methods(class_name), f"{where} class {class_name}")
    members = index.classes[class_name].body.body
    count = sum(isinstance(m, cst.FunctionDef) and m.name.value == method for m in members)
    if count > 1:  # a property's getter and setter: one replacement cannot stand for both
        return f"{where} class {class_name} defines {method!r} {count} times; replace the class"
    return None


def signature_problems(
    patch: Patch, index: UpstreamIndex, written: Written | None
) -> list[Problem]:
    """Replacements whose parameters differ from upstream's (names, kinds, which have defaults)."""
    if patch.allow_signature_change:
        return []
    try:
        pairs = _signature_pairs(patch, index, written)
    except PatchError as error:  # an external replacement that cannot be imported
        return [Problem(patch.label, "external missing", str(error))]
    problems = []
    for what, upstream, replacement in pairs:
        if upstream != replacement:
            hint = "" if patch.kind == "modify_init" else " or pass allow_signature_change=True"
            message = (
                f"{what}: upstream ({', '.join(upstream)}) but the replacement has "
                f"({', '.join(replacement)}); keep upstream's parameters{hint}"
            )
            problems.append(Problem(patch.label, "signature changed", message))
    return problems


def _signature_pairs(
    patch: Patch, index: UpstreamIndex, written: Written | None
) -> list[tuple[str, list[str], list[str]]]:
    if patch.kind == "replace_function":
        upstream = index.functions[patch.target]
        return [(patch.target, _cst_shape(upstream.params), _replacement_shape(patch, written))]
    if patch.kind == "override_method":
        class_name, method = patch.target.split(".")
        upstream = index.methods(class_name)[method]
        return [(patch.target, _cst_shape(upstream.params), _cst_shape(written.node.params))]
    upstream_methods = index.methods(patch.target)
    if patch.kind == "modify_init":
        upstream = upstream_methods["__init__"]
        init = f"{patch.target}.__init__"
        return [(init, _cst_shape(upstream.params), _cst_shape(written.node.params))]
    # replace_class: the methods upstream code calls on instances it builds.
    pairs = []
    for method in ("__init__", "forward"):
        theirs = _replacement_method_shape(patch, written, method)
        if method in upstream_methods and theirs is not None:
            mine = _cst_shape(upstream_methods[method].params)
            pairs.append((f"{patch.target}.{method}", mine, theirs))
    return pairs


def _replacement_shape(patch: Patch, written: Written | None) -> list[str]:
    if isinstance(patch.replacement, External):
        return _inspect_shape(patch.replacement.load())
    return _cst_shape(written.node.params)


def _replacement_method_shape(
    patch: Patch, written: Written | None, method: str
) -> list[str] | None:
    if isinstance(patch.replacement, External):
        cls = patch.replacement.load()
        return _inspect_shape(getattr(cls, method)) if method in dir(cls) else None
    members = written.node.body.body
    found = [m for m in members if isinstance(m, cst.FunctionDef) and m.name.value == method]
    return _cst_shape(found[0].params) if found else None


def _cst_shape(params: cst.Parameters) -> list[str]:
    def one(param: cst.Param, prefix: str = "") -> str:
        return prefix + param.name.value + ("=…" if param.default is not None else "")

    shape = [one(p) for p in params.posonly_params]
    shape += ["/"] if params.posonly_params else []
    shape += [one(p) for p in params.params]
    if isinstance(params.star_arg, cst.Param):
        shape.append(one(params.star_arg, "*"))
    elif params.kwonly_params:
        shape.append("*")
    shape += [one(p) for p in params.kwonly_params]
    if params.star_kwarg is not None:
        shape.append(one(params.star_kwarg, "**"))
    return shape


def _inspect_shape(obj: object) -> list[str]:
    kinds = inspect.Parameter
    prefix = {kinds.VAR_POSITIONAL: "*", kinds.VAR_KEYWORD: "**"}
    shape, seen_star = [], False
    parameters = list(inspect.signature(obj).parameters.values())
    for i, param in enumerate(parameters):
        if param.kind is kinds.KEYWORD_ONLY and not seen_star:
            shape.append("*")
        seen_star = seen_star or param.kind in (kinds.VAR_POSITIONAL, kinds.KEYWORD_ONLY)
        default = "=…" if param.default is not inspect.Parameter.empty else ""
        shape.append(prefix.get(param.kind, "") + param.name + default)
        following = parameters[i + 1].kind if i + 1 < len(parameters) else None
        if param.kind is kinds.POSITIONAL_ONLY and following is not kinds.POSITIONAL_ONLY:
            shape.append("/")
    return shape


def convention_problems(patch: Patch, written: Written) -> list[Problem]:
    """The numbered header above a replacement and its `# --- Patch.N ---` markers."""
    numbers = {m.group(1) for line in written.header if (m := _NUMBERED_ITEM.match(line))}
    where = f"{written.origin}: the replacement"
    if not numbers:
        message = (
            f"{where} needs a numbered header comment right above it, one line per change: "
            "'# 1. <what changed> — <why>' (see the loom-patchgen README)"
        )
        return [Problem(patch.label, "convention", message)]
    code = cst.Module([]).code_for_node(written.node.with_changes(leading_lines=[]))
    markers = _REGION_MARKER.findall(code)
    problems = []
    for number in sorted(set(markers)):
        if number not in numbers:
            message = f"{where} has '# --- Patch.{number} ---' but its header has no item {number}."
            problems.append(Problem(patch.label, "convention", message))
        if markers.count(number) % 2:
            message = (
                f"{where} opens '# --- Patch.{number} ---' without closing it (markers pair up)."
            )
            problems.append(Problem(patch.label, "convention", message))
    return problems


def undefined_name_problems(
    config: PatchConfig,
    text: str,
    undefined: list[tuple[str, int]],
    upstream_undefined: set[str],
) -> list[Problem]:
    """Names the generated text uses but neither defines nor imports, blamed on a patch."""
    regions = _patch_regions(config, ast.parse(text))
    enclosing = _top_level_spans(ast.parse(text))
    problems = []
    for name, line in undefined:
        if name in upstream_undefined:
            continue  # upstream's own (e.g. names it defines dynamically): not ours to judge
        owner = next((label for label, (lo, hi) in regions.items() if lo <= line <= hi), None)
        inside = next((n for n, (lo, hi) in enclosing.items() if lo <= line <= hi), "module level")
        problems.append(_undefined_problem(config, name, line, owner, inside))
    return problems


def _undefined_problem(
    config: PatchConfig, name: str, line: int, owner: str | None, inside: str
) -> Problem:
    where = f"line {line} of the generated {config.target_file} (in {inside})"
    if owner is not None:
        message = (
            f"uses {name!r} at {where}, which the generated file neither defines nor imports; "
            "add config.add_import(...) or a config.add_post_import_block(...) defining it"
        )
        return Problem(owner, "undefined name", message)
    if name in config.excluded:
        subject = f"exclude_from_output({name!r})"
        message = f"upstream code still uses it at {where}; exclude that too or override it"
    elif name in config.dropped_import_names:
        subject = f"drop_import_names({name!r})"
        message = f"upstream code still uses it at {where}; keep the import or override that code"
    else:
        subject = "generated file"
        message = f"{name!r} is used at {where} but neither defined nor imported"
    return Problem(subject, "undefined name", message)


def _top_level_spans(tree: ast.Module) -> dict[str, tuple[int, int]]:
    spans = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            spans[node.name] = _span(node)
    return spans


def _span(node: ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[int, int]:
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    return first, node.end_lineno or node.lineno


def _patch_regions(config: PatchConfig, tree: ast.Module) -> dict[str, tuple[int, int]]:
    """Line span of each copied replacement in the generated text, by patch label."""
    top = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef | ast.FunctionDef)}
    regions = {}
    for patch in config.patches:
        if isinstance(patch.replacement, External):
            continue
        class_name, _, method = patch.target.partition(".")
        method = method or ("__init__" if patch.kind == "modify_init" else "")
        node = top.get(class_name)
        if method and isinstance(node, ast.ClassDef):
            node = next((m for m in node.body if getattr(m, "name", None) == method), None)
        if node is not None:
            regions[patch.label] = _span(node)
    return regions
