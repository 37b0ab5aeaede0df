"""`loom-patchgen check`: fails on drift with the diff, `--fix` repairs, says when nothing applies."""

from __future__ import annotations

import pytest

from loom.patchgen import registry
from loom.patchgen.cli import main
from loom.patchgen.upstream import installed_transformers, major_of

MAJOR = major_of(installed_transformers())

TOY_CONFIG = """
from loom.patchgen import PatchConfig

config = PatchConfig("toyupstream.models.modeling_toy", "patched_modeling_toy.py", "drift", {majors})
config.exclude_from_output("ToyForQuestionAnswering")
"""


def _check(capsys, *args: str) -> tuple[int, str]:
    status = main(["check", *args])
    return status, capsys.readouterr().out


def test_check_fails_on_missing_and_hand_edited_files_and_fix_repairs(
    config_module, tmp_path, capsys
):
    ref = config_module(TOY_CONFIG.format(majors=(4, 5)))
    out_dir = tmp_path / "generated" / f"v{MAJOR}"

    status, out = _check(capsys, ref)
    assert status == 1 and f"DRIFT {out_dir / 'patched_modeling_toy.py'}: missing" in out

    assert _check(capsys, ref, "--fix") == (
        0,
        f"fixed {ref}: rewrote patched_modeling_toy.py, patched_modeling_toy.diff\n",
    )
    status, out = _check(capsys, ref)
    assert (status, out) == (0, f"ok {ref} -> {out_dir}\n")

    generated = out_dir / "patched_modeling_toy.py"
    edited = generated.read_text().replace("return scale(x, 2.0)", "return scale(x, 3.0)")
    generated.write_text(edited)
    status, out = _check(capsys, ref)
    assert status == 1
    assert f"DRIFT {generated}: differs from what the config generates" in out
    # the diff, from the checked-in file to the regenerated one
    assert "-        return scale(x, 3.0)  # scaled on the way out\n" in out
    assert "+        return scale(x, 2.0)  # scaled on the way out\n" in out
    assert "loom-patchgen check --fix" in out

    assert _check(capsys, ref, "--fix")[0] == 0
    assert "return scale(x, 2.0)" in generated.read_text()
    assert _check(capsys, ref)[0] == 0


def test_a_stale_diff_file_is_drift(config_module, tmp_path, capsys):
    ref = config_module(TOY_CONFIG.format(majors=(4, 5)))
    main(["check", ref, "--fix"])
    diff = tmp_path / "generated" / f"v{MAJOR}" / "patched_modeling_toy.diff"
    diff.write_text(diff.read_text() + " \n")
    status, out = _check(capsys, ref)
    assert status == 1 and f"DRIFT {diff}: out of date" in out


def test_no_configs_for_the_installed_major_says_so(config_module, capsys):
    ref = config_module(TOY_CONFIG.format(majors=(MAJOR + 1,)))
    status, out = _check(capsys, ref)
    assert status == 1
    version = installed_transformers()
    assert f"no patch configs for transformers {version} (v{MAJOR})" in out
    assert f"cover: {ref} (v{MAJOR + 1})" in out
    assert f"loom-patchgen canary --against {version}" in out


def test_nothing_registered_at_all_is_not_a_failure(monkeypatch, capsys):
    monkeypatch.setattr(registry, "registered_refs", list)
    status, out = _check(capsys)
    assert status == 0 and "no patch configs registered" in out


def test_a_broken_config_fails_the_check_and_the_others_still_run(config_module, capsys):
    good = config_module(TOY_CONFIG.format(majors=(4, 5)))
    main(["check", good, "--fix"])
    capsys.readouterr()
    status, out = _check(capsys, "no_such_config_module", good)
    assert status == 1
    assert "FAILED no_such_config_module: cannot import" in out and f"ok {good}" in out


@pytest.mark.parametrize(
    "command", [["check", "--help"], ["canary", "--help"], ["generate", "--help"]]
)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(command)
    assert exit_.value.code == 0 and "usage: loom-patchgen" in capsys.readouterr().out
