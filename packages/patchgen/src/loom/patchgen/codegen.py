"""One config in, one generated module out: header, patched source, and the diff beside it."""

from __future__ import annotations

import dataclasses
import difflib
import os
import tempfile
from pathlib import Path

import libcst as cst

from loom.patchgen import lint, transform
from loom.patchgen.config import External, Patch, PatchConfig, PatchError
from loom.patchgen.replacement import Written, written_replacement
from loom.patchgen.upstream import Upstream, read_upstream
from loom.patchgen.validate import (
    Problem,
    UpstreamIndex,
    convention_problems,
    raise_if_any,
    signature_problems,
    target_problems,
    undefined_name_problems,
)


@dataclasses.dataclass(frozen=True)
class Generated:
    target_file: str  # "patched_modeling_qwen3.py"
    source: str
    diff: str  # unified diff, upstream -> source

    @property
    def diff_file(self) -> str:
        return self.target_file.removesuffix(".py") + ".diff"

    def write(self, out_dir: Path, with_diff: bool = True) -> list[Path]:
        """Write the module (and its diff) into `out_dir`, each file atomically."""
        out_dir.mkdir(parents=True, exist_ok=True)
        files = {self.target_file: self.source}
        if with_diff:
            files[self.diff_file] = self.diff
        paths = []
        for name, text in files.items():
            paths.append(out_dir / name)
            _write_atomically(out_dir / name, text)
        return paths


def _write_atomically(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(text)
    os.replace(temporary, path)


def generate(config: PatchConfig, regenerate_command: str) -> Generated:
    """Apply `config` to the installed upstream module; PatchError lists every problem."""
    upstream = read_upstream(config.source_module)
    tree = cst.parse_module(upstream.source)
    index = UpstreamIndex.of(tree)
    where = f"{upstream.module} ({upstream.release})"
    written, problems = _check_patches(config, index, where)
    raise_if_any(problems, f"patch config for {where}")

    tree = transform.absolutize_imports(tree, upstream.package)
    tree = transform.drop_import_names(tree, config.dropped_import_names)
    tree = transform.exclude(tree, config.excluded)
    for patch in config.patches:
        tree = _apply(tree, patch, written.get(patch.label))
    tree = transform.insert_after_imports(tree, config.imports, config.post_import_blocks)

    text = _header(config, upstream, written, regenerate_command) + tree.code
    text = lint.format_source(text, config.target_file)
    _check_undefined_names(config, upstream, text, where)
    return Generated(config.target_file, text, _unified_diff(upstream, config.target_file, text))


def preflight(config: PatchConfig) -> list[Problem]:
    """The problems `generate` would stop at before editing anything (for the canary)."""
    upstream = read_upstream(config.source_module)
    index = UpstreamIndex.of(cst.parse_module(upstream.source))
    return _check_patches(config, index, f"{upstream.module} ({upstream.release})")[1]


def _check_patches(
    config: PatchConfig, index: UpstreamIndex, where: str
) -> tuple[dict[str, Written], list[Problem]]:
    """The replacements as syntax, by patch label, and every problem found before editing."""
    problems = target_problems(config, index, where)
    missing = {p.subject for p in problems}
    written = {}
    for patch in config.patches:
        if patch.label in missing:
            continue
        replacement = None
        if not isinstance(patch.replacement, External):
            name = "__init__" if patch.kind == "modify_init" else patch.target.rpartition(".")[2]
            try:
                replacement = written_replacement(patch, name)
            except PatchError as error:
                problems.append(Problem(patch.label, "unreadable replacement", str(error)))
                continue
            written[patch.label] = replacement
            problems += convention_problems(patch, replacement)
        problems += signature_problems(patch, index, replacement)
    return written, problems


def _apply(tree: cst.Module, patch: Patch, written: Written | None) -> cst.Module:
    if patch.kind in ("replace_class", "replace_function"):
        return transform.replace_top_level(tree, patch, written)
    if patch.kind == "override_method":
        return transform.override_method(tree, patch, written)
    return transform.modify_init(tree, patch, written)


def _check_undefined_names(config: PatchConfig, upstream: Upstream, text: str, where: str) -> None:
    upstream_undefined = {n for n, _ in lint.undefined_names(upstream.source, config.target_file)}
    undefined = lint.undefined_names(text, config.target_file)
    problems = undefined_name_problems(config, text, undefined, upstream_undefined)
    raise_if_any(problems, f"generated {config.target_file} from {where}")


def _header(
    config: PatchConfig, upstream: Upstream, written: dict[str, Written], command: str
) -> str:
    """The comment block that makes a generated file explain itself."""
    lines = [
        f"Generated by loom.patchgen from {upstream.module} ({upstream.release}).",
        "Do not edit: change the patch config and regenerate with",
        f"    {command}",
        "(`loom-patchgen check --fix` regenerates every registered config).",
        f"Config: {config.description}",
        "Changes against upstream:",
    ]
    changes = [_change_line(p, written.get(p.label)) for p in config.patches]
    if config.excluded:
        changes.append(f"exclude_from_output: {', '.join(config.excluded)} (and from __all__)")
    if config.dropped_import_names:
        changes.append(f"drop_import_names: {', '.join(config.dropped_import_names)}")
    if config.imports or config.post_import_blocks:
        blocks = len(config.post_import_blocks)
        changes.append(
            f"added after the imports: {len(config.imports)} import(s), {blocks} block(s)"
        )
    changes.append("relative imports of upstream rewritten as absolute imports")
    lines += [f"  {n}. {change}" for n, change in enumerate(changes, start=1)]
    return "".join(f"# {line}\n" for line in lines) + "\n"


def _change_line(patch: Patch, written: Written | None) -> str:
    line = f"{patch.label}: {patch.description}"
    if isinstance(patch.replacement, External):
        return f"{line} (imported from {patch.replacement.module}.{patch.replacement.name})"
    if patch.name_map:
        mapping = ", ".join(f"{old}* -> {new}*" for old, new in patch.name_map.items())
        line += f" [name_map {mapping}"
        if written.renamed_calls:
            # The rename keeps each call's arguments: a sibling class with other fields
            # (an MoE output with router_logits) silently loses them. Say so in the file.
            line += f"; calls renamed with their arguments unchanged: {', '.join(written.renamed_calls)}"
        line += "]"
    return line


def _unified_diff(upstream: Upstream, target_file: str, text: str) -> str:
    """A unified diff that `patch -p1` applies to upstream's file to give `text`."""
    lines = difflib.unified_diff(
        _lines(upstream.source),
        _lines(text),
        fromfile=f"a/{upstream.relative_path}",
        tofile=f"b/{target_file}",
    )
    return "".join(lines)


def _lines(text: str) -> list[str]:
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n\\ No newline at end of file\n"
    return lines
