"""LoRA through ``loom train`` (peft on the port, FSDP2, CPU gloo): world 2 trains as
world 1; checkpoints hold the adapters only and resume exactly; ``hf/`` holds the adapter
as peft loads it and ``hf/merged`` the merged model, which upstream loads and which gives
what peft's own merge of the adapter gives; the frozen base never moves; bad targets are
one ``error:`` line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples/tiny"
LORA = ["--lora.rank", "4", "--lora.alpha", "8", "--optim.lr", "1e-2",
        "--optim.schedule", "constant", "--log.progress", "false"]  # fmt: skip


def loom(*args) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "loom.trainer.cli", *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The tiny example's model with seeded random weights, as upstream saves them."""
    model = tmp_path_factory.mktemp("base") / "model"
    shutil.copytree(TINY / "model", model)
    torch.manual_seed(0)
    upstream = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    upstream.save_pretrained(model, max_shard_size="100KB")
    return model


def train(out: Path, base: Path, nproc: int = 1, steps: int = 4, *extra) -> list[dict]:
    done = loom(
        "train", TINY / "train.yaml", "--model.path", base, "--train.output_dir", out,
        "--train.steps", steps, "--nproc", nproc, *LORA, *extra,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(base, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("single") / "run"
    records = train(out, base, 1, 4, "--checkpoint.every", "2", "--lora.merge_on_export", "true")
    return out, records


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [[], ["--parallel.sp_size", "2", "--memory.activation_checkpointing", "true"]],
    ids=["dp2", "sp2-checkpointed"],
)
def test_world_2_trains_as_world_1(base, single, tmp_path, layout):
    one_dir, one = single
    two = train(tmp_path / "two", base, 2, 4, "--lora.merge_on_export", "true", *layout)
    for want, got in zip(one, two, strict=True):
        for key in ("loss", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (key, want, got)
    want, got = (load_file(d / "hf/adapter_model.safetensors") for d in (one_dir, tmp_path / "two"))
    assert (
        want.keys() == got.keys() and len(want) == 2 * 7 * 2
    )  # A, B x 7 layers x 2 decoder layers
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)
    assert any(float(t.abs().max()) > 0 for k, t in want.items() if "lora_B" in k)  # trained
    # the merge adds each rank's part of the update into its shard of the base weight
    want, got = (load_file(d / "hf/merged/model.safetensors") for d in (one_dir, tmp_path / "two"))
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_checkpoint_holds_the_adapters_and_resumes_exactly(base, single, tmp_path):
    one_dir, one = single
    keys = FileSystemReader(one_dir / "checkpoints/step_4").read_metadata().state_dict_metadata
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)
    out = tmp_path / "resumed"
    train(out, base, 1, 2, "--checkpoint.every", "2")
    resumed = train(out, base, 1, 4, "--checkpoint.every", "2")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for want, got in zip(one, resumed, strict=True):
        assert (got["loss"], got["grad_norm"]) == (want["loss"], want["grad_norm"]), got
    want, got = (load_file(d / "hf/adapter_model.safetensors") for d in (one_dir, out))
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_merged_export_is_peft_merge_and_the_base_is_frozen(base, single):
    from peft import PeftModel

    out, _ = single
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    source = AutoModelForCausalLM.from_pretrained(base)
    original = {k: v.clone() for k, v in source.state_dict().items()}
    with_adapter = PeftModel.from_pretrained(source, out / "hf")
    merged, info = AutoModelForCausalLM.from_pretrained(out / "hf/merged", output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        want, got = with_adapter(input_ids=ids).logits, merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    peft_merged = with_adapter.merge_and_unload().state_dict()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, peft_merged[key], rtol=1e-6, atol=1e-6, msg=key)
        if not any(
            f".{t}." in key
            for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        ):
            assert torch.equal(value, original[key]), key  # embeddings, norms: frozen


BAD = {
    "lm_head": (["--lora.targets", '["lm_head"]'], r"lora: .*only the decoder layers' linear layers"),
    "unknown": (["--lora.targets", '["qkv"]'], r"lora.targets \['qkv'\]: no linear layer has these names"),
    "qlora-on-cpu": (["--lora.quantize", "nf4"], r"lora.quantize: nf4 \(QLoRA\) runs on a CUDA GPU only"),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD))
def test_bad_lora_settings_are_one_error_line(case, base, tmp_path):
    if case == "qlora-on-cpu" and torch.cuda.is_available():
        pytest.skip("the refusal is the CPU's; test_qlora_trains_on_the_gpu covers CUDA")
    import re

    extra, expected = BAD[case]
    done = loom("train", TINY / "train.yaml", "--model.path", base, "--train.output_dir",
                tmp_path / "run", "--train.steps", "1", *LORA, *extra)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(expected, errors[0]), done.stderr[-2000:]


@pytest.fixture(scope="module")
def moe_base(tmp_path_factory) -> Path:
    """A qwen3_moe toy (experts stacked in Loom, Hub layout on disk) with the example's
    tokenizer and seeded random weights."""
    model = tmp_path_factory.mktemp("moe") / "model"
    shutil.copytree(TINY / "model", model)
    toy = json.loads((ROOT / "tests/toy_config/qwen3_moe_toy/config.json").read_text())
    toy["vocab_size"] = AutoConfig.from_pretrained(TINY / "model").vocab_size
    (model / "config.json").write_text(json.dumps(toy))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).save_pretrained(model)
    return model


@pytest.mark.slow
def test_moe_adapters_leave_the_experts_alone_under_expert_parallelism(moe_base, tmp_path):
    """Adapters on attention and the dense layer's MLP only (the experts are not linear
    layers); ep 2 trains as one process; the merged export keeps every expert weight."""
    merge = ["--lora.merge_on_export", "true"]
    one = train(tmp_path / "one", moe_base, 1, 3, *merge)
    two = train(tmp_path / "two", moe_base, 2, 3, "--parallel.ep_size", "2", *merge)
    for want, got in zip(one, two, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    adapter = load_file(tmp_path / "one/hf/adapter_model.safetensors")
    assert adapter and not any("experts" in k for k in adapter)
    source = AutoModelForCausalLM.from_pretrained(moe_base).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "two/hf/merged").state_dict()
    experts = [k for k in source if ".experts." in k]
    assert experts and all(torch.equal(merged[k], source[k]) for k in experts)


@pytest.fixture(scope="module")
def nf4_base(tmp_path_factory) -> Path:
    """The tiny example widened so every projection is whole NF4 groups (64 x 256)."""
    model = tmp_path_factory.mktemp("nf4") / "model"
    shutil.copytree(TINY / "model", model)
    config = json.loads((model / "config.json").read_text())
    config |= {"hidden_size": 128, "intermediate_size": 256, "num_key_value_heads": 4,
               "head_dim": 32}  # fmt: skip
    (model / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).save_pretrained(model)
    return model


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA runs on CUDA only")
def test_qlora_trains_on_the_gpu(nf4_base, tmp_path):
    """QLoRA follows LoRA on the same base within NF4's rounding, learns, keeps only the
    adapters in its checkpoints, resumes to the same numbers, and its merged export
    (the dequantized base plus the update) loads in upstream."""
    lora = train(tmp_path / "lora", nf4_base, 1, 6)
    nf4 = ["--lora.quantize", "nf4", "--checkpoint.every", "3", "--lora.merge_on_export", "true"]
    qlora = train(tmp_path / "qlora", nf4_base, 1, 6, *nf4)
    assert qlora[0]["loss"] == pytest.approx(lora[0]["loss"], rel=0.02)
    assert qlora[-1]["loss"] < qlora[0]["loss"] - 0.5, qlora
    keys = FileSystemReader(tmp_path / "qlora/checkpoints/step_6").read_metadata()
    model_keys = [k for k in keys.state_dict_metadata if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)
    train(tmp_path / "resumed", nf4_base, 1, 3, *nf4)
    resumed = train(tmp_path / "resumed", nf4_base, 1, 6, *nf4)
    for want, got in zip(qlora[3:], resumed[3:], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4), (want, got)
    merged, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "qlora/hf/merged", output_loading_info=True
    )
    assert not any(info.values()), info
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(merged(input_ids=ids).logits).all()
