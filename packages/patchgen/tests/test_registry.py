"""Config references, entry-point discovery and where generated files go."""

from __future__ import annotations

from pathlib import Path

import pytest

from loom.patchgen import PatchError, registry

TOY_CONFIG = """
from loom.patchgen import PatchConfig

config = PatchConfig("toyupstream.models.modeling_toy", "patched_modeling_toy.py", "t", (4, 5))
other = PatchConfig("toyupstream.models.modeling_toy", "patched_other.py", "t", (5,))
not_a_config = 3
"""


def test_load_by_module_or_attribute(config_module, tmp_path):
    ref = config_module(TOY_CONFIG)
    entry = registry.load(ref)
    assert entry.config.target_file == "patched_modeling_toy.py"
    assert entry.output_dir(5) == tmp_path / "generated" / "v5"
    assert entry.regenerate_command == f"loom-patchgen generate {ref} --diff"
    assert registry.load(f"{ref}:other").config.target_file == "patched_other.py"


@pytest.mark.parametrize(
    ("suffix", "message"),
    [(":not_a_config", "should be a PatchConfig but is int"), (":missing", "but is nothing")],
)
def test_load_names_what_is_wrong(config_module, suffix, message):
    with pytest.raises(PatchError, match=message):
        registry.load(config_module(TOY_CONFIG) + suffix)


def test_load_of_a_missing_module():
    with pytest.raises(PatchError, match="cannot import patch config module 'no_such_configs'"):
        registry.load("no_such_configs")


def test_entry_points_are_discovered(config_module, tmp_path: Path, monkeypatch):
    # A distribution's metadata as an installed package would leave it on sys.path.
    ref = config_module(TOY_CONFIG)
    info = tmp_path / "loom_test_models-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: loom-test-models\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        f"[{registry.ENTRY_POINT_GROUP}]\ntoy = {ref}\ntoy-other = {ref}:other\n"
    )
    assert {ref, f"{ref}:other"} <= set(registry.registered_refs())


def test_for_major_and_coverage(config_module):
    ref = config_module(TOY_CONFIG)
    both, v5 = registry.load(ref), registry.load(f"{ref}:other")
    assert registry.for_major([both, v5], 4) == [both]
    assert registry.coverage([both, v5]) == f"{ref} (v4, v5), {ref}:other (v5)"
