"""``loom plan CONFIG``: what a run's config asks of each GPU, before it runs.

The model's size (exact, from its config), the per-GPU memory by component
(``loom.trainer.planner.memory``) against the device profile's memory, and tokens/s
predicted from the profile's bf16 peak at ``ASSUMED_MFU`` (the step's FLOPs as
``loom.trainer.flops`` counts them).
"""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

from loom.trainer.config import Config
from loom.trainer.errors import ConfigError
from loom.trainer.planner.hardware import DeviceProfile, resolve
from loom.trainer.planner.memory import GIB, Estimate, Setup, estimate
from loom.trainer.planner.size import ModelSize, count_parameters

ASSUMED_MFU = 0.4  # what Loom's dense steps reach on an H100/H200 (benchmarks/RESULTS.md)


def setup_of(config: Config, gpus: int) -> Setup:
    p = config.parallel
    if gpus % (p.dp_replicate * p.sp_size):
        raise ConfigError(
            f"--gpus {gpus} is not a multiple of parallel.dp_replicate x sp_size "
            f"({p.dp_replicate} x {p.sp_size})"
        )
    lora = config.lora
    rows, dp = config.global_rows(), gpus // p.sp_size
    micro = config.train.micro_batch_size
    # rows per step unknown (a token budget): assume accumulation, the larger peak
    accum = 2 if rows is None else max(rows // (dp * micro), 1)
    return Setup(
        seq=config.data.max_seq_len,
        micro=micro,
        accum=accum,
        fsdp=gpus // p.dp_replicate,
        sp=p.sp_size,
        activation_checkpointing=config.memory.activation_checkpointing,
        activation_offload=config.memory.activation_offload,
        mlp_tile=config.memory.mlp_tile,
        lora_rank=lora.rank,
        lora_targets=tuple(lora.targets) if lora.enabled else (),
        lora_quantize=lora.quantize == "nf4",
    )


def tokens_per_s(size: ModelSize, config, setup: Setup, device: DeviceProfile, gpus: int) -> float:
    """Per the whole run: 6 N flops a token (N: active parameters, the input embedding
    aside) plus causal attention over rows of ``seq`` tokens."""
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    embedding = text.vocab_size * text.hidden_size
    attention = 6 * text.num_hidden_layers * text.num_attention_heads * head_dim * setup.seq
    per_token = 6 * (size.active - embedding) + attention
    return ASSUMED_MFU * device.peak_flops * gpus / per_token


def plan(config: Config, gpus: int = 1, device: str | dict | None = None) -> str:
    """The plan's table, as text; ``device`` overrides the config's ``hardware``."""
    from loom.models.registry import load_config

    if gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {gpus}")
    profile = resolve(device, key="--device") if device else resolve(config.hardware)
    model_config = load_config(config.model.path)
    if config.lora.rank == "auto":
        from loom.trainer.planner.auto import lora_rank_for, with_lora_rank

        config, _ = with_lora_rank(config, lora_rank_for(model_config))
    size = count_parameters(model_config)
    setup = setup_of(config, gpus)
    result = estimate(model_config, setup)
    console = Console(record=True, width=100, file=io.StringIO())
    console.print(_size_line(size))
    console.print(_memory_table(result, profile))
    speed = tokens_per_s(size, model_config, setup, profile, gpus)
    console.print(
        f"{gpus} x {profile.name}: about {speed:,.0f} tokens/s at {ASSUMED_MFU:.0%} MFU "
        f"({profile.bf16_tflops:g} TFLOP/s bf16 each)"
    )
    return console.export_text()


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _size_line(size: ModelSize) -> str:
    parts = [f"model: {_count(size.total)} parameters ({size.category.value})"]
    if size.active != size.total:
        parts.append(f"{_count(size.active)} active")
    if size.vision:
        parts.append(f"vision tower {_count(size.vision)}")
    return ", ".join(parts)


def _memory_table(result: Estimate, profile: DeviceProfile) -> Table:
    table = Table(title="per-GPU memory (GiB)")
    table.add_column("component")
    table.add_column("GiB", justify="right")
    for name, value in result.components.items():
        table.add_row(name, f"{value / GIB:.2f}")
    fits = "fits" if result.peak <= profile.memory_bytes else "does NOT fit"
    table.add_row("step peak", f"{result.peak / GIB:.2f}", end_section=True)
    table.add_row(f"{profile.name} memory", f"{profile.memory_gib:.2f}")
    table.add_row("", fits)
    return table
