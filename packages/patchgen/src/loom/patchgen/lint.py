"""Ruff on generated text: the formatter, and the pass that finds undefined names."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

from loom.patchgen.config import PatchError

# transformers' own line length, so that formatting leaves upstream code as it is.
LINE_LENGTH = 119


def _ruff() -> str:
    try:
        from ruff.__main__ import find_ruff_bin

        return str(find_ruff_bin())
    except (ImportError, FileNotFoundError):
        found = shutil.which("ruff")
        if found is None:
            raise PatchError("ruff is not installed; loom-patchgen needs it") from None
        return found


def _run(args: list[str], text: str, filename: str) -> subprocess.CompletedProcess[str]:
    # --isolated: the repository's ruff settings (line length 100, excludes) must not apply.
    command = [_ruff(), *args, "--isolated", "--stdin-filename", filename, "-"]
    return subprocess.run(command, input=text, capture_output=True, text=True, check=False)


def format_source(text: str, filename: str) -> str:
    """`text` formatted by ruff as transformers formats its own code."""
    result = _run(["format", "--line-length", str(LINE_LENGTH)], text, filename)
    if result.returncode != 0:
        raise PatchError(f"ruff format failed on the generated {filename}:\n{result.stderr}")
    return result.stdout


def undefined_names(text: str, filename: str) -> list[tuple[str, int]]:
    """(name, line) for every name used but never defined or imported (F821, F822)."""
    # --ignore-noqa: a suppression comment copied from a config must not hide a missing name.
    args = ["check", "--select=F821,F822", "--ignore-noqa", "--output-format=json", "--exit-zero"]
    result = _run(args, text, filename)
    if result.returncode != 0:
        raise PatchError(f"ruff check failed on the generated {filename}:\n{result.stderr}")
    found = []
    for item in json.loads(result.stdout):
        name = re.search(r"`([^`]+)`", item["message"])
        found.append((name.group(1) if name else item["message"], item["location"]["row"]))
    return found
