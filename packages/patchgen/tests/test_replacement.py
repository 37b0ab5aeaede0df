"""Replacement source: read back with its header, DSL decorator stripped, renamed, name-mapped."""

from __future__ import annotations

import functools

import libcst as cst
import pytest

from loom.patchgen import PatchConfig
from loom.patchgen.replacement import rename, written_replacement


def _code(node: cst.CSTNode) -> str:
    return cst.Module([]).code_for_node(node)


def _config() -> PatchConfig:
    return PatchConfig(
        source_module="m", target_file="x.py", description="d", transformers_majors=(5,)
    )


@pytest.mark.parametrize(
    ("name", "exact", "prefixes", "expected"),
    [
        ("Qwen3Attention", {}, {"Qwen3": "Qwen3Moe"}, "Qwen3MoeAttention"),
        ("Qwen3MoeExperts", {}, {"Qwen3": "Qwen3Moe"}, "Qwen3MoeExperts"),  # already renamed
        ("Qwen3VLModel", {}, {"Qwen3": "X", "Qwen3VL": "Y"}, "YModel"),  # longest prefix wins
        ("helper", {"helper": "upstream_name"}, {}, "upstream_name"),
        ("LlamaMLP", {}, {"Qwen3": "Llama"}, "LlamaMLP"),
    ],
)
def test_rename(name, exact, prefixes, expected):
    assert rename(name, exact, prefixes) == expected


# ================================================================
# Patch: DenseBlock.forward
# 1. a test header — must come along with the source
# ================================================================
@functools.cache
def _shared_forward(self, DenseBlock: int = 0, *, x=None):
    from toyupstream.models.modeling_toy import DenseOutput  # imported names are not symbols

    hidden = DenseBlock + self.DenseBlock  # attribute names are not symbols
    out = DenseOutput(hidden=hidden, aux=DenseBlock)  # constructor keeps its arguments
    note: "DenseOutput" = out  # noqa: UP037 (string annotations are left alone)
    return _shared_forward, DenseOutput, dict(DenseBlock=note)


def test_name_map_rewrites_symbols_only_and_keeps_constructor_arguments():
    config = _config()
    config.override_method(
        "MoeBlock.forward",
        replacement=_shared_forward,
        name_map={"Dense": "Moe"},
        description="d",
        keep_decorators=False,
    )
    written = written_replacement(config.patches[0], "forward")
    code = _code(written.node)
    assert "def forward(self, MoeBlock: int = 0, *, x=None):" in code
    assert "from toyupstream.models.modeling_toy import DenseOutput" in code
    assert "hidden = MoeBlock + self.DenseBlock" in code
    # The pitfall, by design: the class name changes, the argument list does not.
    assert "out = MoeOutput(hidden=hidden, aux=MoeBlock)" in code
    assert 'note: "DenseOutput" = out' in code
    assert "return forward, MoeOutput, dict(DenseBlock=note)" in code
    assert written.renamed_calls == ("DenseOutput(...) -> MoeOutput(...)",)


def test_dsl_decorator_is_stripped_other_decorators_kept_header_carried():
    config = _config()
    config.replace_function("activation", description="d")(_shared_forward)
    written = written_replacement(config.patches[0], "activation")
    assert [_code(d.decorator) for d in written.node.decorators] == ["functools.cache"]
    assert written.header[1] == "# Patch: DenseBlock.forward"
    assert written.header[2].startswith("# 1. a test header")
    leading = [line.comment.value for line in written.node.leading_lines if line.comment]
    assert leading == list(written.header)


def test_decorated_with_the_dsl_in_a_module():
    # The decorator form, as a config module writes it: the DSL line must not survive.
    from toyconfigs.everything import config

    patch = next(p for p in config.patches if p.target == "DenseBlock.forward")
    written = written_replacement(patch, "forward")
    code = _code(written.node)
    assert "override_method" not in code and "config." not in code
    assert code.lstrip().startswith("# ====")
