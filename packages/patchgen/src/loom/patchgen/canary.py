"""The canary: which patches still apply to a newer transformers, patch by patch.

Nothing is written. With no configs for the installed major, the newest earlier major's
configs are tried: that is the question a transformers bump asks first.
"""

from __future__ import annotations

from typing import TextIO

from loom.patchgen import registry
from loom.patchgen.codegen import generate, preflight
from loom.patchgen.config import PatchError
from loom.patchgen.drift import load_entries
from loom.patchgen.registry import ConfigEntry
from loom.patchgen.upstream import installed_transformers, major_of
from loom.patchgen.validate import PatchProblems, Problem


def run_canary(against: str, refs: list[str], out: TextIO) -> int:
    """Exit status of `loom-patchgen canary`: 0 when every patch still applies."""
    version = installed_transformers()
    if version != against:
        print(
            f"canary --against {against}, but the installed transformers is {version}; "
            f"install it first (uv pip install transformers=={against})",
            file=out,
        )
        return 2
    entries, failures = load_entries(refs or registry.registered_refs(), out)
    major = major_of(version)
    selected = registry.for_major(entries, major)
    if not selected:
        earlier = sorted({m for e in entries for m in e.config.transformers_majors if m < major})
        if not earlier:
            print(f"no patch configs for transformers v{major} or earlier to try", file=out)
            return 1
        print(
            f"no patch configs for transformers v{major}; trying the v{earlier[-1]} ones", file=out
        )
        selected = registry.for_major(entries, earlier[-1])
    for entry in selected:
        failures += _report(entry, _problems(entry), out)
    return 1 if failures else 0


def _problems(entry: ConfigEntry) -> list[Problem]:
    try:
        problems = preflight(entry.config)
        if not problems:
            generate(entry.config, entry.regenerate_command)
    except PatchProblems as error:
        return error.problems
    except PatchError as error:
        return [Problem(entry.ref, "cannot generate", str(error))]
    return problems


def _report(entry: ConfigEntry, problems: list[Problem], out: TextIO) -> int:
    print(f"{entry.ref} ({entry.config.source_module}):", file=out)
    labels = [p.label for p in entry.config.patches]
    for label in labels:
        mine = [p for p in problems if p.subject == label]
        for problem in mine:
            print(f"  FAILED {label}: {problem.kind}: {problem.message}", file=out)
        if not mine:
            print(f"  ok     {label}", file=out)
    for problem in problems:
        if problem.subject not in labels:
            print(f"  FAILED {problem.subject}: {problem.kind}: {problem.message}", file=out)
    return 1 if problems else 0
