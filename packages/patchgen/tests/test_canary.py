"""`loom-patchgen canary`: which patches still apply, patch by patch."""

from __future__ import annotations

from loom.patchgen.cli import main
from loom.patchgen.upstream import installed_transformers, major_of

VERSION = installed_transformers()
MAJOR = major_of(VERSION)

# Written as if for an older toy upstream: one target has since been renamed, one method
# has grown a parameter, one patch still applies.
CONFIG = """
from loom.patchgen import PatchConfig

config = PatchConfig("toyupstream.models.modeling_toy", "patched_modeling_toy.py", "c", ({major},))


# 1. a no-op stand-in
def forward(self, x):
    return x


# 1. the old signature
def init(self, config):
    self.tag = 1


config.override_method("DenseBlock.forward", replacement=forward, description="still applies")
config.override_method("ToyBlock.forward", replacement=forward, description="class renamed")
config.modify_init("DenseBlock", replacement=init, description="signature changed")
"""


def _canary(capsys, *args: str) -> tuple[int, str]:
    status = main(["canary", *args])
    return status, capsys.readouterr().out


def test_canary_reports_each_patch(config_module, capsys):
    ref = config_module(CONFIG.format(major=MAJOR))
    status, out = _canary(capsys, "--against", VERSION, ref)
    assert status == 1
    lines = out.splitlines()
    assert lines[0] == f"{ref} (toyupstream.models.modeling_toy):"
    assert lines[1] == "  ok     override_method('DenseBlock.forward')"
    assert lines[2].startswith("  FAILED override_method('ToyBlock.forward'): target missing: ")
    assert "defines no class 'ToyBlock'" in lines[2]
    assert lines[3].startswith("  FAILED modify_init('DenseBlock'): signature changed: ")
    assert "upstream (self, config, index) but the replacement has (self, config)" in lines[3]


def test_canary_tries_the_newest_earlier_major(config_module, capsys):
    ref = config_module(CONFIG.format(major=MAJOR - 1))
    status, out = _canary(capsys, "--against", VERSION, ref)
    assert status == 1
    assert out.startswith(
        f"no patch configs for transformers v{MAJOR}; trying the v{MAJOR - 1} ones\n"
    )


def test_canary_passes_when_every_patch_applies(config_module, capsys):
    text = CONFIG.format(major=MAJOR).split('config.override_method("ToyBlock')[0]
    ref = config_module(text)
    assert _canary(capsys, "--against", VERSION, ref) == (
        0,
        f"{ref} (toyupstream.models.modeling_toy):\n  ok     override_method('DenseBlock.forward')\n",
    )


def test_canary_refuses_another_version_than_the_installed_one(capsys):
    status, out = _canary(capsys, "--against", "0.0.1")
    assert status == 2
    assert f"the installed transformers is {VERSION}; install it first" in out
