"""Families without a Loom port train through their upstream class with upstream's numbers,
and everything Loom cannot train exactly is refused before a process starts, by name.

For each family in ``UPSTREAM_FAMILIES``: a toy checkpoint written by upstream's
``save_pretrained`` trains 12 steps through ``loom train`` (packed rows, two micro-batches
per step, clipping, AdamW) and, on the same rows, through a plain upstream loop
(``from_pretrained`` with eager attention, logits, cross-entropy, ``torch.optim.AdamW``). Every step's loss and
grad norm agree within 1e-5 relative, and the exported weights within a twentieth of one
update (lr / 20): Adam divides by the gradient's running size, so where a gradient is
at fp32 rounding level its update's size is rounding too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from loom.dist.mesh import destroy_parallel, init_parallel
from loom.models.registry import UPSTREAM_FAMILIES, eager_only_features
from loom.trainer.config import load_config
from loom.trainer.data.collate import stack_rows
from loom.trainer.run import build_loader

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples/tiny/train.yaml"
TOKENIZER = ROOT / "examples/tiny/model"
STEPS, MICRO, LR = 12, 2, 2e-3
COMMON = [
    "--data.max_seq_len", "64", "--train.steps", str(STEPS), "--train.global_batch_size", "4",
    "--train.micro_batch_size", str(MICRO), "--optim.lr", str(LR), "--optim.schedule",
    "constant", "--optim.warmup_steps", "0", "--optim.grad_clip", "0.5", "--log.progress",
    "false",
]  # fmt: skip


def loom_train(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "loom.trainer.cli", "train", str(CONFIG), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def toy_checkpoint(family: str, out: Path) -> Path:
    """Upstream's own ``save_pretrained`` of the family's toy, with the tiny tokenizer."""
    config = AutoConfig.from_pretrained(ROOT / "tests/toy_config" / f"{family}_toy")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(out)
    return out


def backend(family: str) -> str:
    config = AutoConfig.from_pretrained(ROOT / "tests/toy_config" / f"{family}_toy")
    return "eager" if eager_only_features(config) else "loom_sdpa"


def upstream_loop(run: Path) -> tuple[list[tuple[float, float]], dict[str, torch.Tensor]]:
    """The same rows through upstream's class and a plain loop; (loss, grad norm) per step
    and the trained weights."""
    config = load_config(run / "config.yaml")
    cfg = config.optim
    # upstream's eager attention is the reference whatever backend Loom ran
    model = AutoModelForCausalLM.from_pretrained(
        config.model.path, attn_implementation="eager", dtype=torch.float32
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    tokenizer = AutoTokenizer.from_pretrained(config.model.path)
    init_parallel()
    try:
        loader = build_loader(config, tokenizer, Console(quiet=True))
        records = []
        for _ in range(config.train.steps):
            rows = loader.next_batch(rows_multiple=MICRO)
            tokens = sum(r.loss_tokens for r in rows)
            total = 0.0
            for i in range(0, len(rows), MICRO):
                batch = stack_rows(rows[i : i + MICRO])
                logits = model(
                    input_ids=batch["input_ids"], position_ids=batch["position_ids"]
                ).logits
                loss = (
                    F.cross_entropy(
                        logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum"
                    )
                    / tokens
                )
                loss.backward()
                total += loss.item()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad()
            records.append((total, norm.item()))
    finally:
        destroy_parallel()
    return records, {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", UPSTREAM_FAMILIES)
def test_family_trains_like_upstream(family, tmp_path):
    model = toy_checkpoint(family, tmp_path / "model")
    run = tmp_path / "run"
    result = loom_train(
        *COMMON, "--model.path", str(model), "--model.attn_implementation", backend(family),
        "--train.output_dir", str(run),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    got = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    want, weights = upstream_loop(run)
    assert len(got) == len(want) == STEPS
    for record, (loss, norm) in zip(got, want, strict=True):
        assert record["loss"] == pytest.approx(loss, rel=1e-5), (record["step"], family)
        assert record["grad_norm"] == pytest.approx(norm, rel=1e-5), (record["step"], family)
    assert want[-1][0] < want[0][0] - 0.1  # it learned: the comparison is not of two flat lines
    exported = load_file(run / "hf/model.safetensors")
    for key, tensor in exported.items():
        torch.testing.assert_close(
            tensor, weights[key], rtol=0, atol=LR / 20, msg=lambda m, key=key: f"{key}: {m}"
        )


def _refused(tmp_path: Path, model: Path, *args: str) -> str:
    out = tmp_path / "refused"
    result = loom_train("--model.path", str(model), "--train.output_dir", str(out), *args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()  # refused before anything was written
    return result.stderr


def test_what_loom_cannot_train_exactly_is_refused_by_name(tmp_path):
    gemma2 = toy_checkpoint("gemma2", tmp_path / "gemma2")
    for attn in ("loom_sdpa", "loom_varlen", "sdpa"):
        err = _refused(tmp_path, gemma2, "--model.attn_implementation", attn)
        assert "'gemma2' uses attention logit softcapping" in err and attn in err, err
    gpt_oss = toy_checkpoint("gpt_oss", tmp_path / "gpt_oss")
    err = _refused(tmp_path, gpt_oss)
    assert "'gpt_oss' uses attention sinks" in err and "eager" in err, err

    unproven = tmp_path / "mistral"
    shutil.copytree(TOKENIZER, unproven)
    config = json.loads((unproven / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (unproven / "config.json").write_text(json.dumps(config))
    err = _refused(tmp_path, unproven)
    assert "model_type 'mistral' has no Loom port and is not among the upstream" in err, err

    phi3 = toy_checkpoint("phi3", tmp_path / "phi3")
    err = _refused(tmp_path, phi3, "--nproc", "2", "--parallel.sp_size", "2")
    assert "parallel.sp_size=2, but phi3 has no Loom port" in err, err


def test_every_family_has_its_toy():
    for family in UPSTREAM_FAMILIES:
        config = yaml.safe_load(
            (ROOT / "tests/toy_config" / f"{family}_toy/config.json").read_text()
        )
        assert config["model_type"] == family
