"""`loom-patchgen`: generate one config, check every registered one, or run the canary."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loom.patchgen import registry
from loom.patchgen.canary import run_canary
from loom.patchgen.codegen import generate
from loom.patchgen.config import PatchError
from loom.patchgen.drift import run_check
from loom.patchgen.upstream import installed_transformers, major_of


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loom-patchgen", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="write the patched module of one config")
    gen.add_argument("config", help="config module (its `config`) or module:name")
    gen.add_argument("-o", "--out-dir", type=Path, help="default: generated/v<major>/ beside it")
    gen.add_argument("--diff", action="store_true", help="also write the .diff against upstream")

    check = commands.add_parser("check", help="fail when generated files drift from configs")
    check.add_argument(
        "configs", nargs="*", help=f"default: the {registry.ENTRY_POINT_GROUP} entry points"
    )
    check.add_argument("--fix", action="store_true", help="rewrite the drifted files")

    canary = commands.add_parser("canary", help="report which patches no longer apply")
    canary.add_argument("--against", required=True, help="the installed transformers version")
    canary.add_argument("configs", nargs="*", help="default: every registered config")
    return parser


def _generate(ref: str, out_dir: Path | None, with_diff: bool) -> int:
    entry = registry.load(ref)
    version = installed_transformers()
    if version is None:
        raise PatchError("transformers is not installed; patch configs target an installed version")
    major = major_of(version)
    if major not in entry.config.transformers_majors:
        raise PatchError(
            f"{ref} is written for transformers {registry.coverage([entry])} but "
            f"{version} is installed; switch environments (e.g. a nox session) first"
        )
    generated = generate(entry.config, entry.regenerate_command)
    for path in generated.write(out_dir or entry.output_dir(major), with_diff):
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args.config, args.out_dir, args.diff)
        if args.command == "check":
            return run_check(args.configs, args.fix, sys.stdout)
        return run_canary(args.against, args.configs, sys.stdout)
    except PatchError as error:
        print(f"loom-patchgen: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
