"""The DSL records what it is told and refuses malformed declarations at once."""

from __future__ import annotations

import re

import pytest

from loom.patchgen import PatchConfig, PatchError, create_patch_from_external
from loom.patchgen.config import External


def _config() -> PatchConfig:
    return PatchConfig(
        source_module="toyupstream.models.modeling_toy",
        target_file="patched_modeling_toy.py",
        description="test",
        transformers_majors=(5,),
    )


def _forward(self, x):
    return x


def test_decorator_form_registers_and_returns_the_function_unchanged():
    config = _config()
    decorated = config.override_method("DenseBlock.forward", description="why")(_forward)
    assert decorated is _forward
    [patch] = config.patches
    assert (patch.kind, patch.target, patch.replacement) == (
        "override_method",
        "DenseBlock.forward",
        _forward,
    )
    assert patch.keep_decorators and not patch.allow_signature_change


def test_replacement_form_registers_with_options():
    config = _config()
    result = config.override_method(
        "MoeBlock.forward", replacement=_forward, name_map={"Dense": "Moe"}, description="why"
    )
    assert result is None
    assert config.patches[0].name_map == {"Dense": "Moe"}


def test_imports_blocks_drops_and_exclusions_are_recorded():
    config = _config()
    config.add_import("operator", names=["mul"])
    config.add_import("numpy", alias="np")
    config.add_post_import_block("\n    X = 1\n")
    config.drop_import_names("a", "b")
    config.exclude_from_output("C")
    assert [spec.code() for spec in config.imports] == [
        "from operator import mul",
        "import numpy as np",
    ]
    assert config.post_import_blocks == ["X = 1\n"]
    assert (config.dropped_import_names, config.excluded) == (["a", "b"], ["C"])


@pytest.mark.parametrize(
    ("declare", "message"),
    [
        (lambda c: c.override_method("forward", _forward, description="d"), "'Class.method'"),
        (lambda c: c.replace_class("A.B", _forward, description="d"), "a top-level name"),
        (lambda c: c.replace_function("f", _forward, description=""), "give description="),
        (lambda c: c.replace_function("f", _forward, description="a\nb"), "give description="),
        (
            lambda c: c.override_method(
                "A.f", create_patch_from_external("m", "n"), description="d"
            ),
            "external replacements replace whole classes or functions",
        ),
        (
            lambda c: c.replace_class(
                "A", create_patch_from_external("m", "n"), name_map={"A": "B"}, description="d"
            ),
            "an external is imported",
        ),
        (lambda c: c.add_import("m", names=["a"], alias="b"), "names or alias, not both"),
        (lambda c: c.add_post_import_block("def broken(:\n"), "is not valid Python"),
    ],
)
def test_malformed_declarations_are_refused(declare, message):
    with pytest.raises(PatchError, match=re.escape(message)):
        declare(_config())


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("replace_class", "A"), ("override_method", "A.forward")),
        (("override_method", "A.__init__"), ("modify_init", "A")),
        (("replace_function", "f"), ("replace_function", "f")),
    ],
)
def test_two_patches_on_one_definition_are_refused(first, second):
    config = _config()
    getattr(config, first[0])(first[1], _forward, description="d")
    with pytest.raises(PatchError, match=r"already patched by"):
        getattr(config, second[0])(second[1], _forward, description="d")


def test_patches_on_different_methods_of_one_class_coexist():
    config = _config()
    config.override_method("A.forward", _forward, description="d")
    config.modify_init("A", _forward, description="d")
    assert len(config.patches) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_file": "generated/x.py"}, "bare file name"),
        ({"target_file": "x.txt"}, "bare file name"),
        ({"transformers_majors": ()}, "transformers_majors"),
        ({"transformers_majors": ("5",)}, "transformers_majors"),
    ],
)
def test_bad_config_fields_are_refused(kwargs, message):
    fields = {
        "source_module": "m",
        "target_file": "x.py",
        "description": "d",
        "transformers_majors": (5,),
    }
    with pytest.raises(PatchError, match=re.escape(message)):
        PatchConfig(**{**fields, **kwargs})


def test_external_load_names_what_is_missing():
    assert External("toyconfigs.kernels", "FastNorm").load().__name__ == "FastNorm"
    with pytest.raises(PatchError, match="has no 'SlowNorm'"):
        External("toyconfigs.kernels", "SlowNorm").load()
    with pytest.raises(PatchError, match=re.escape("module 'toyconfigs.nope'")):
        External("toyconfigs.nope", "X").load()
