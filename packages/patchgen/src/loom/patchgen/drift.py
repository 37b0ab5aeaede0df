"""The drift check: regenerate every config for the installed transformers and compare."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TextIO

from loom.patchgen import registry
from loom.patchgen.codegen import generate
from loom.patchgen.config import PatchError
from loom.patchgen.registry import ConfigEntry
from loom.patchgen.upstream import installed_transformers, major_of


def load_entries(refs: list[str], out: TextIO) -> tuple[list[ConfigEntry], int]:
    """The configs that import, and how many did not (each reported on `out`)."""
    entries, failures = [], 0
    for ref in refs:
        try:
            entries.append(registry.load(ref))
        except PatchError as error:
            print(f"FAILED {ref}: {error}", file=out)
            failures += 1
    return entries, failures


def run_check(refs: list[str], fix: bool, out: TextIO) -> int:
    """Exit status of `loom-patchgen check`: 0 when every generated file is current."""
    version = installed_transformers()
    if version is None:
        print("transformers is not installed: the drift check compares against it", file=out)
        return 1
    refs = refs or registry.registered_refs()
    if not refs:
        print(
            f"no patch configs registered (entry point group {registry.ENTRY_POINT_GROUP}) "
            "and none given: nothing to check",
            file=out,
        )
        return 0
    entries, failures = load_entries(refs, out)
    major = major_of(version)
    selected = registry.for_major(entries, major)
    if entries and not selected:
        print(
            f"no patch configs for transformers {version} (v{major}); the registered configs "
            f"cover: {registry.coverage(entries)}. Write configs for v{major}, or run "
            f"`loom-patchgen canary --against {version}` to see which patches still apply.",
            file=out,
        )
        return 1
    for entry in selected:
        failures += _check_entry(entry, major, fix, out)
    return 1 if failures else 0


def _check_entry(entry: ConfigEntry, major: int, fix: bool, out: TextIO) -> int:
    try:
        generated = generate(entry.config, entry.regenerate_command)
    except PatchError as error:
        print(f"FAILED {entry.ref}: {error}", file=out)
        return 1
    out_dir = entry.output_dir(major)
    expected = {
        out_dir / generated.target_file: generated.source,
        out_dir / generated.diff_file: generated.diff,
    }
    stale = {path: text for path, text in expected.items() if _read(path) != text}
    if not stale:
        print(f"ok {entry.ref} -> {out_dir}", file=out)
        return 0
    if fix:
        generated.write(out_dir)
        print(f"fixed {entry.ref}: rewrote {', '.join(p.name for p in stale)}", file=out)
        return 0
    for path, text in stale.items():
        _report_drift(path, text, out)
    print(
        f"  generated files are never edited by hand: change {entry.ref} and run "
        f"`{entry.regenerate_command}`, or `loom-patchgen check --fix`",
        file=out,
    )
    return 1


def _read(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.exists() else None


def _report_drift(path: Path, regenerated: str, out: TextIO) -> None:
    current = _read(path)
    if current is None:
        print(f"DRIFT {path}: missing", file=out)
    elif path.suffix == ".diff":
        print(f"DRIFT {path}: out of date with the regenerated module", file=out)
    else:
        print(f"DRIFT {path}: differs from what the config generates", file=out)
        lines = difflib.unified_diff(
            current.splitlines(keepends=True),
            regenerated.splitlines(keepends=True),
            fromfile=f"{path} (checked in)",
            tofile=f"{path} (regenerated)",
        )
        out.writelines(lines)
