"""Patched copies of the installed transformers' modeling_llama and modeling_qwen3.

The patches (hfconfigs/patches.py) keep upstream's arithmetic, so the patched model must
give bit-identical logits to upstream on CPU.
"""

from __future__ import annotations

import ast
import importlib
import io
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
from difftools import apply_unified_diff

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hfconfigs.norms import ReferenceRMSNorm  # noqa: E402

from loom.patchgen import PatchConfig, PatchError  # noqa: E402
from loom.patchgen.cli import main  # noqa: E402
from loom.patchgen.codegen import generate  # noqa: E402
from loom.patchgen.registry import load  # noqa: E402
from loom.patchgen.upstream import read_upstream  # noqa: E402

MODELS = {"llama": "Llama", "qwen3": "Qwen3"}
TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)


@pytest.fixture(scope="module", params=sorted(MODELS))
def patched(request, tmp_path_factory):
    """(model, generated, imported patched module, upstream module)."""
    model = request.param
    entry = load(f"hfconfigs.{model}")
    generated = generate(entry.config, entry.regenerate_command)
    path = tmp_path_factory.mktemp(model) / generated.target_file
    path.write_text(generated.source)
    name = f"patchgen_test_patched_{model}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield model, generated, module, importlib.import_module(entry.config.source_module)
    del sys.modules[name]


def test_patched_definitions_are_the_replacements(patched):
    model, _, module, upstream = patched
    prefix = MODELS[model]
    assert getattr(module, f"{prefix}RMSNorm") is ReferenceRMSNorm
    assert getattr(module, f"{prefix}MLP") is not getattr(upstream, f"{prefix}MLP")
    assert not hasattr(module, f"{prefix}ForQuestionAnswering")
    assert f"{prefix}ForQuestionAnswering" not in module.__all__
    assert set(module.__all__) == set(upstream.__all__) - {f"{prefix}ForQuestionAnswering"}


def test_untouched_code_gives_bit_identical_logits(patched):
    model, _, module, upstream = patched
    prefix = MODELS[model]
    config_class = getattr(upstream, f"{prefix}ForCausalLM").config_class
    config = config_class(**TINY, attn_implementation="eager")
    torch.manual_seed(0)
    reference = getattr(upstream, f"{prefix}ForCausalLM")(config).eval()
    mine = getattr(module, f"{prefix}ForCausalLM")(config).eval()
    mine.load_state_dict(reference.state_dict(), strict=True)  # the same parameter names
    assert mine.model.layers[1].self_attn.loom_tag == "layer1"  # modify_init ran
    ids = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = reference(input_ids=ids).logits, mine(input_ids=ids).logits
    # the MLP override asserts isinstance(self, <Prefix>MLP): name_map made that name right
    assert torch.equal(actual, expected)


def _comments(source: str) -> list[tuple[int, str]]:
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return [(t.start[0], t.string) for t in tokens if t.type == tokenize.COMMENT]


def test_upstream_comments_survive(patched):
    model, generated, _, _ = patched
    prefix = MODELS[model]
    upstream = read_upstream(f"transformers.models.{model}.modeling_{model}").source
    replaced = {f"{prefix}RMSNorm", f"{prefix}ForQuestionAnswering", "rotate_half"}
    spans = []
    for node in ast.parse(upstream).body:
        if getattr(node, "name", None) in replaced:
            spans.append((node.lineno - len(node.decorator_list), node.end_lineno))
        if getattr(node, "name", None) == f"{prefix}MLP":
            forward = next(m for m in node.body if getattr(m, "name", None) == "forward")
            spans.append((forward.lineno, forward.end_lineno))
    kept = [text for line, text in _comments(upstream) if not any(a <= line <= b for a, b in spans)]
    assert len(kept) > 10
    surviving = [text for _, text in _comments(generated.source)]
    assert [c for c in kept if c not in surviving] == []


def test_imports_are_absolute(patched):
    model, generated, _, _ = patched
    imports = [n for n in ast.walk(ast.parse(generated.source)) if isinstance(n, ast.ImportFrom)]
    assert [n.module for n in imports if n.level] == []
    modules = {n.module for n in imports}
    assert {"transformers.utils", f"transformers.models.{model}.configuration_{model}"} <= modules


def test_diff_patches_upstream_into_generated(patched, tmp_path):
    model, generated, _, _ = patched
    upstream = read_upstream(f"transformers.models.{model}.modeling_{model}")
    assert apply_unified_diff(upstream.source, generated.diff) == generated.source
    if shutil.which("patch") is None:
        return  # the strict applier above still ran
    original, diff = tmp_path / "upstream.py", tmp_path / "patch.diff"
    original.write_text(upstream.source)
    diff.write_text(generated.diff)
    out = tmp_path / "out.py"
    subprocess.run(["patch", "--quiet", "-o", str(out), str(original), str(diff)], check=True)
    assert out.read_text() == generated.source


def test_header_records_version_and_command(patched):
    model, generated, _, _ = patched
    head = generated.source.split("\n\n")[0]
    source = f"transformers.models.{model}.modeling_{model}"
    assert (
        f"# Generated by loom.patchgen from {source} (transformers {transformers.__version__})."
        in head
    )
    assert f"#     loom-patchgen generate hfconfigs.{model} --diff\n" in head


def test_missing_symbol_names_module_version_and_near_names():
    config = PatchConfig("transformers.models.qwen3.modeling_qwen3", "p.py", "e", (4, 5))
    config.replace_class("Qwen3RMSNorn", replacement=ReferenceRMSNorm, description="typo")
    config.override_method(
        "Qwen3Attention.fwd", replacement=ReferenceRMSNorm.forward, description="typo"
    )
    with pytest.raises(PatchError) as error:
        generate(config, "cmd")
    message = str(error.value)
    where = f"transformers.models.qwen3.modeling_qwen3 (transformers {transformers.__version__})"
    assert f"replace_class('Qwen3RMSNorn'): {where} defines no class 'Qwen3RMSNorn'" in message
    assert "near names: Qwen3RMSNorm" in message
    assert (
        "class Qwen3Attention defines no method 'fwd'; near names: forward; it has: __init__, forward"
        in message
    )


def test_drift_check_on_a_real_module(config_module, tmp_path: Path, capsys):
    ref = config_module("from hfconfigs.qwen3 import config\n")
    assert main(["check", ref, "--fix"]) == 0
    [folder] = (tmp_path / "generated").iterdir()
    generated = folder / "patched_modeling_qwen3.py"
    generated.write_text(generated.read_text().replace("self.loom_tag =", "self.hand_edit ="))
    capsys.readouterr()
    assert main(["check", ref]) == 1
    out = capsys.readouterr().out
    assert '-        self.hand_edit = f"layer{layer_idx}"\n' in out
    assert '+        self.loom_tag = f"layer{layer_idx}"\n' in out
    assert main(["check", ref, "--fix"]) == 0
    assert main(["check", ref]) == 0
