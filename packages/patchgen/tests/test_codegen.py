"""Generating from the toy upstream: the golden files, the module's behaviour, every error."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest
from difftools import apply_unified_diff

from loom.patchgen import PatchConfig, PatchError, create_patch_from_external
from loom.patchgen.codegen import generate
from loom.patchgen.registry import load
from loom.patchgen.upstream import read_upstream

# Under a `generated/` folder so that the repository's ruff leaves the files alone.
GOLDEN = Path(__file__).parent / "golden" / "generated"
UPDATE = os.environ.get("LOOM_PATCHGEN_UPDATE_GOLDEN") == "1"
TOY = "toyupstream.models.modeling_toy"


@pytest.fixture(scope="module")
def everything():
    entry = load("toyconfigs.everything")
    return generate(entry.config, entry.regenerate_command)


def _import(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


@pytest.mark.parametrize("suffix", [".py", ".diff"])
def test_golden(everything, suffix):
    path = GOLDEN / f"patched_modeling_toy{suffix}"
    text = everything.source if suffix == ".py" else everything.diff
    if UPDATE:
        path.write_text(text)
    assert text == path.read_text(), (
        f"{path.name} differs from the golden copy; review the change, then rerun with "
        "LOOM_PATCHGEN_UPDATE_GOLDEN=1"
    )


def test_generated_module_behaves_as_patched(everything, tmp_path):
    path = tmp_path / everything.target_file
    path.write_text(everything.source)
    module = _import(path, "patched_toy_for_test")
    from toyconfigs.kernels import FastNorm

    assert module.ToyNorm is FastNorm  # external replacement, under the upstream name
    block = module.DenseBlock(module.ToyConfig(size=2), index=3)
    assert block.tag == "block3"  # modify_init ran after the upstream body
    assert block.forward.__func__.traced  # upstream decorator kept on the override
    # doubled (Patch.1), FastNorm halves, the clamp zeroes negatives
    assert block.forward([1.0, -4.0]).hidden == [1.0, 0.0]
    moe = module.MoeBlock(module.ToyConfig()).forward([1.0])
    assert (type(moe), moe.aux, moe.router_logits) == (module.MoeOutput, 0.5, None)
    assert not hasattr(module, "ToyForQuestionAnswering")
    assert module.__all__ == ["DenseBlock", "MoeBlock", "ToyModel", "ToyNorm"]
    assert not hasattr(module, "unused_helper")


def test_diff_turns_upstream_into_the_generated_module(everything):
    upstream = read_upstream(TOY)
    assert everything.diff.startswith(
        "--- a/toyupstream/models/modeling_toy.py\n+++ b/patched_modeling_toy.py\n"
    )
    assert apply_unified_diff(upstream.source, everything.diff) == everything.source


def test_markers_sit_above_each_patched_definition(everything):
    lines = everything.source.splitlines()
    top = {node.name: node for node in ast.parse(everything.source).body if hasattr(node, "name")}
    dense = {node.name: node for node in top["DenseBlock"].body}

    def comments_above(node) -> list[str]:
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
        above = []
        while first > 0 and lines[first - 1].lstrip().startswith("#"):
            first -= 1
            above.insert(0, lines[first].strip())
        return above

    for node, description in [
        (top["activation"], "clamp through _clamp"),
        (dense["__init__"], "tag each block"),
        (dense["forward"], "double the input first"),
    ]:
        above = comments_above(node)
        assert above[0] == f"# [PATCHED by loom.patchgen: {description}]"
        assert any(re.match(r"# 1\. ", line) for line in above)  # the numbered header follows
    markers = [line.strip() for line in lines if "[PATCHED by loom.patchgen" in line]
    assert len(markers) == 6  # 5 patches + the added imports


def test_header_records_source_release_and_regeneration_command(everything):
    head = everything.source.split("\n\n")[0]
    assert (
        "from toyupstream.models.modeling_toy (toyupstream, not an installed distribution)" in head
    )
    assert "    loom-patchgen generate toyconfigs.everything --diff\n" in head
    assert "  4. override_method('MoeBlock.forward')" in head
    assert (
        "calls renamed with their arguments unchanged: DenseOutput(...) -> MoeOutput(...)" in head
    )


# ---------------------------------------------------------------- errors


def _config() -> PatchConfig:
    return PatchConfig(TOY, "patched_modeling_toy.py", "errors", (5,))


def _problems(config: PatchConfig) -> str:
    with pytest.raises(PatchError) as error:
        generate(config, "loom-patchgen generate test")
    return str(error.value)


# ================================================================
# Patch: test replacement
# 1. returns its input — a stand-in
# ================================================================
def forward_x(self, x):
    return x


# ================================================================
# Patch: test replacement
# 1. a different signature from upstream's forward(self, x)
# ================================================================
def forward_x_y(self, x, y=None):
    return x


def test_missing_class_names_the_module_and_near_names():
    config = _config()
    config.replace_class("ToyNrom", replacement=forward_x, description="d")
    message = _problems(config)
    assert "replace_class('ToyNrom')" in message
    assert "toyupstream.models.modeling_toy" in message
    assert "defines no class 'ToyNrom'; near names: ToyNorm" in message


def test_missing_method_lists_the_class_methods():
    config = _config()
    config.override_method("DenseBlock.backward", replacement=forward_x, description="d")
    assert "class DenseBlock defines no method 'backward'; it has: __init__, forward" in _problems(
        config
    )


def test_missing_exclusion_and_dropped_import_are_reported_together():
    config = _config()
    config.exclude_from_output("ToyForQA")
    config.drop_import_names("helper")
    message = _problems(config)
    assert "2 problem(s)" in message
    assert "exclude_from_output('ToyForQA')" in message and "ToyForQuestionAnswering" in message
    assert "drop_import_names('helper')" in message


def test_signature_change_is_refused_unless_declared():
    config = _config()
    config.override_method("DenseBlock.forward", replacement=forward_x_y, description="d")
    message = _problems(config)
    assert "upstream (self, x) but the replacement has (self, x, y=…)" in message
    assert "allow_signature_change=True" in message

    allowed = _config()
    allowed.override_method(
        "DenseBlock.forward", replacement=forward_x_y, allow_signature_change=True, description="d"
    )
    assert "def forward(self, x, y=None):" in generate(allowed, "cmd").source


def test_external_class_signature_is_compared():
    config = _config()
    wrong = create_patch_from_external("toyupstream.utils", "scale")  # a function, not a norm
    config.replace_class("ToyNorm", replacement=wrong, description="d")
    assert "ToyNorm.__init__: upstream (self, size, eps=…)" in _problems(config)


def test_missing_external_is_reported():
    config = _config()
    config.replace_class(
        "ToyNorm", create_patch_from_external("toyconfigs.kernels", "Nope"), description="d"
    )
    assert "external replacement module 'toyconfigs.kernels' has no 'Nope'" in _problems(config)


# ================================================================
# Patch: test replacement
# 1. uses a name the generated file lacks
# ================================================================
def forward_undefined(self, x):
    return undefined_helper(x)  # noqa: F821


def test_undefined_name_in_a_replacement_names_the_patch():
    config = _config()
    config.override_method("DenseBlock.forward", replacement=forward_undefined, description="d")
    message = _problems(config)
    assert "override_method('DenseBlock.forward'): uses 'undefined_helper'" in message
    assert "(in DenseBlock)" in message and "config.add_import" in message


def test_exclusion_ripple_names_the_exclusion_and_the_user():
    config = _config()
    config.exclude_from_output("DenseOutput")  # DenseBlock.forward still builds one
    message = _problems(config)
    assert "exclude_from_output('DenseOutput'): upstream code still uses it" in message
    assert "(in DenseBlock)" in message


def test_dropped_import_still_used_is_reported():
    config = _config()
    config.drop_import_names("scale")
    assert "drop_import_names('scale'): upstream code still uses it" in _problems(config)


def forward_without_header(self, x):
    return x


# ================================================================
# Patch: test replacement
# 1. the only item
# ================================================================
def forward_bad_markers(self, x):
    # --- Patch.1 ---
    x = list(x)
    # --- Patch.2 ---
    return x


def test_numbered_header_and_paired_markers_are_required():
    config = _config()
    config.override_method(
        "DenseBlock.forward", replacement=forward_without_header, description="d"
    )
    config.override_method("MoeBlock.forward", replacement=forward_bad_markers, description="d")
    message = _problems(config)
    assert "needs a numbered header comment" in message
    assert "test_codegen.py:" in message  # says where the replacement is
    assert "opens '# --- Patch.1 ---' without closing it" in message
    assert "'# --- Patch.2 ---' but its header has no item 2" in message


def test_a_name_both_excluded_and_patched_is_a_conflict():
    config = _config()
    config.override_method("DenseBlock.forward", replacement=forward_x, description="d")
    config.exclude_from_output("DenseBlock")
    assert "exclude_from_output('DenseBlock'): it is also patched" in _problems(config)


def test_replace_class_needs_a_class():
    config = _config()
    config.replace_class("ToyNorm", replacement=forward_x, description="d")
    assert "replace_class('ToyNorm') (" in _problems(config)
    assert "test_codegen.py:" in _problems(config)
    assert "the replacement must be a class" in _problems(config)


def test_a_method_defined_twice_cannot_be_overridden():
    config = _config()
    config.override_method("ToyModel.depth", replacement=forward_x, description="d")
    assert "class ToyModel defines 'depth' 2 times; replace the class" in _problems(config)
