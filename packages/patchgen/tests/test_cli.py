"""`loom-patchgen generate`: where it writes, and what it refuses."""

from __future__ import annotations

import subprocess
import sys

from loom.patchgen.cli import main
from loom.patchgen.upstream import installed_transformers, major_of

MAJOR = major_of(installed_transformers())

CONFIG = """
from loom.patchgen import PatchConfig

config = PatchConfig("toyupstream.models.modeling_toy", "patched_modeling_toy.py", "cli", {majors})
config.exclude_from_output("ToyForQuestionAnswering")
"""


def test_generate_writes_beside_the_config_by_default(config_module, tmp_path, capsys):
    ref = config_module(CONFIG.format(majors=(MAJOR,)))
    assert main(["generate", ref, "--diff"]) == 0
    out_dir = tmp_path / "generated" / f"v{MAJOR}"
    written = sorted(p.name for p in out_dir.iterdir())
    assert written == ["patched_modeling_toy.diff", "patched_modeling_toy.py"]
    assert (
        capsys.readouterr().out == f"wrote {out_dir / written[1]}\nwrote {out_dir / written[0]}\n"
    )


def test_generate_into_a_chosen_folder_without_the_diff(config_module, tmp_path):
    ref = config_module(CONFIG.format(majors=(MAJOR,)))
    assert main(["generate", ref, "-o", str(tmp_path / "out")]) == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["patched_modeling_toy.py"]


def test_generate_refuses_a_config_for_another_major(config_module, tmp_path, capsys):
    ref = config_module(CONFIG.format(majors=(MAJOR + 1,)))
    assert main(["generate", ref, "-o", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert f"{ref} is written for transformers {ref} (v{MAJOR + 1})" in error
    assert f"but {installed_transformers()} is installed" in error
    assert not (tmp_path / "out").exists()


def test_generate_reports_patch_errors_without_a_traceback(config_module, capsys):
    ref = config_module(CONFIG.format(majors=(MAJOR,)).replace("ToyForQuestionAnswering", "Nope"))
    assert main(["generate", ref]) == 1
    error = capsys.readouterr().err
    assert error.startswith("loom-patchgen: patch config for toyupstream.models.modeling_toy")
    assert "exclude_from_output('Nope')" in error


def test_module_entry_point_runs():
    # What the `loom-patchgen` console script runs, in a fresh interpreter.
    result = subprocess.run(
        [sys.executable, "-m", "loom.patchgen.cli", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and "{generate,check,canary}" in result.stdout
