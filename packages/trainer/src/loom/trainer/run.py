"""Everything one run trains with, built from the config: the ``Run``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import torch.distributed as dist
from rich.console import Console
from torch import nn

from loom.dist.mesh import ParallelState
from loom.models.registry import is_vision_language, load_config
from loom.trainer.checkpointing import resume
from loom.trainer.config import Config, DataConfig, SourceConfig, dump_config
from loom.trainer.data.loader import BatchLoader
from loom.trainer.data.multimodal import VlmSource, load_processor
from loom.trainer.data.samples import check_vocab, tokenize_source
from loom.trainer.data.sources import load_source
from loom.trainer.data.streaming import StreamSource, stream_shards
from loom.trainer.errors import ConfigError
from loom.trainer.flops import FlopModel, flop_model, peak_flops
from loom.trainer.metrics import MetricsLog
from loom.trainer.model import load_tokenizer
from loom.trainer.optim import build_optimizer, build_scheduler
from loom.trainer.parallelize import build_parallel_model


@dataclass(kw_only=True)
class Run:
    config: Config
    parallel: ParallelState
    console: Console
    tokenizer: object
    loader: BatchLoader
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    flops: FlopModel
    peak_flops: float | None
    log: MetricsLog | None  # rank 0 only
    processor: object = None  # a vision-language model's (tokenizer + image processor)
    step: int = 0  # optimizer steps done
    tokens: int = 0  # tokens seen

    @property
    def out(self) -> Path:
        return self.config.train.output_dir


def build_loader(config: Config, tokenizer, console: Console, vision=None) -> BatchLoader:
    """Read and tokenize every in-memory source (rank 0 first, so the others reuse its
    cache); streaming sources only find their shards here. ``vision``: a vision-language
    model's ``(processor, model config)``: its chat sources may hold images."""
    data, train = config.data, config.train
    sources: dict[int, datasets.Dataset | StreamSource | VlmSource] = {}
    for i, source in enumerate(data.sources):
        if vision is not None and source.format == "chat":
            if source.streaming:
                raise ConfigError(
                    f"data.sources[{i}].streaming: chat with images is read in memory only "
                    "(streaming it is not supported yet); set streaming: false"
                )
            sources[i] = VlmSource(
                source.path, source.column, *vision, data.max_seq_len, data.strict
            )
            console.print(f"data: {source.path}: {len(sources[i])} conversations with images")
    for rank_turn in (True, False):
        if rank_turn == (dist.get_rank() == 0):
            for i, source in enumerate(data.sources):
                if not source.streaming and i not in sources:
                    sources[i] = _load_in_memory(source, tokenizer, data, console)
        dist.barrier()
    for i, source in enumerate(data.sources):
        if source.streaming:
            sources[i] = _stream(source, (train.seed, i), tokenizer, data, console)
    unit = "samples" if train.batch_unit == "samples" else "rows"
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    return BatchLoader(
        [sources[i] for i in range(len(data.sources))],
        weights=[s.weight for s in data.sources],
        splittable=[s.format == "text" for s in data.sources],
        seed=train.seed,
        row_len=data.max_seq_len,
        pad_id=pad_id,
        batch_size=config.global_rows() or train.global_batch_size,
        unit=unit,
        vision=vision is not None,
    )


def _load_in_memory(
    source: SourceConfig, tokenizer, data: DataConfig, console: Console
) -> datasets.Dataset:
    records, dropped = load_source(source.path, source.format, source.column, data.strict)
    if dropped:
        console.print(f"{source.path}: skipped {dropped} bad records", style="yellow")
    samples = tokenize_source(records, tokenizer, source.format, source.column, data.max_seq_len)
    console.print(f"data: {source.path}: {len(records)} records -> {len(samples)} samples")
    return samples


def _stream(
    source: SourceConfig, seed: tuple[int, int], tokenizer, data: DataConfig, console: Console
) -> StreamSource:
    shards = stream_shards(source.path)
    console.print(
        f"data: {source.path}: streaming {len(shards)} shard(s), "
        f"shuffle buffer {source.shuffle_buffer} samples"
    )
    return StreamSource(
        shards,
        tokenizer,
        fmt=source.format,
        field=source.column,
        max_len=data.max_seq_len,
        strict=data.strict,
        shuffle_buffer=source.shuffle_buffer,
        seed=seed,
        warn=lambda message: console.print(message, style="yellow", markup=False),
    )


def build_run(config: Config, parallel: ParallelState) -> Run:
    out, main = config.train.output_dir, parallel.rank == 0
    console = Console(stderr=True, quiet=not main)
    config.check_world(parallel.dp_size)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(config, out / "config.yaml")
    model_config = load_config(config.model.path)
    processor, vision = None, None
    if is_vision_language(model_config):
        processor = load_processor(config.model.path)
        vision = (processor, model_config)
        tokenizer = processor.tokenizer
    else:
        tokenizer = load_tokenizer(config.model.path)
    check_vocab(tokenizer, config.model.path)
    loader = build_loader(config, tokenizer, console, vision)
    model = build_parallel_model(config, parallel)
    optimizer = build_optimizer(model, config.optim, device=parallel.device)
    run = Run(
        config=config,
        parallel=parallel,
        console=console,
        tokenizer=tokenizer,
        loader=loader,
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, config.optim, steps=config.train.steps),
        flops=flop_model(model),
        peak_flops=peak_flops(parallel.device, config.log.peak_tflops),
        log=None,
        processor=processor,
    )
    resume(run)
    if main:
        run.log = MetricsLog(
            out,
            tensorboard=config.log.tensorboard,
            wandb_project=config.log.wandb_project,
            config=config.model_dump(mode="json"),
        )
    return run
