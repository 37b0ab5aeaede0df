"""The text trainer: one readable loop from config to HF export."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from loom.dist.fsdp import apply_fsdp, mixed_precision
from loom.dist.mesh import ParallelState, destroy_parallel, init_parallel
from loom.trainer.config import Config, dump_config
from loom.trainer.data.collate import stack_rows
from loom.trainer.data.loader import BatchLoader
from loom.trainer.data.packing import Row
from loom.trainer.data.samples import IGNORE_INDEX, tokenize_source
from loom.trainer.data.sources import load_source
from loom.trainer.export import export_hf
from loom.trainer.metrics import MetricsLog, plot_loss, progress_bar, read_metrics
from loom.trainer.model import build_model, decoder_layers, load_tokenizer
from loom.trainer.schedule import warmup_cosine


def build_loader(config: Config, tokenizer, console: Console) -> BatchLoader:
    """Read and tokenize every source; rank 0 first, so the others reuse its cache."""
    tables = []
    for rank_turn in (True, False):
        if rank_turn == (dist.get_rank() == 0):
            for source in config.data.sources:
                records, dropped = load_source(
                    source.path, source.format, source.column, config.data.strict
                )
                if dropped:
                    console.print(f"[yellow]{source.path}: skipped {dropped} bad records")
                samples = tokenize_source(
                    records, tokenizer, source.format, source.column, config.data.max_seq_len
                )
                console.print(
                    f"data: {source.path}: {len(records)} records -> {len(samples)} samples"
                )
                tables.append(samples)
        dist.barrier()
    train = config.train
    unit = "samples" if train.batch_unit == "samples" else "rows"
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    return BatchLoader(
        tables,
        [s.weight for s in config.data.sources],
        train.seed,
        config.data.max_seq_len,
        pad_id,
        config.global_rows() or train.global_batch_size,
        unit,
    )


def rank_share(rows: list[Row], dp_rank: int, dp_size: int, micro: int) -> list[list[Row]]:
    """This rank's contiguous share of the global batch, in micro-batches of ``micro`` rows."""
    per_rank = len(rows) // dp_size
    mine = rows[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    return [mine[i : i + micro] for i in range(0, len(mine), micro)]


def micro_step_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed token cross-entropy of one micro-batch (the caller normalises)."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    return F.cross_entropy(
        logits.float().flatten(0, 1),
        batch["labels"].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def grad_norm_and_clip(model: nn.Module, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _quiet_libraries() -> None:
    # Their per-call progress bars and notices would bury Loom's own progress bar.
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def train(config: Config) -> None:
    """Train ``config`` on the processes of the current launch (one, or torchrun's)."""
    _quiet_libraries()
    parallel = init_parallel(config.parallel.dp_replicate, config.parallel.dp_shard)
    try:
        _train(config, parallel)
    finally:
        destroy_parallel()


def _train(config: Config, parallel: ParallelState) -> None:
    cfg, out = config.train, config.train.output_dir
    main = parallel.rank == 0
    console = Console(stderr=True, quiet=not main)
    config.check_world(parallel.dp_size)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(config, out / "config.yaml")

    tokenizer = load_tokenizer(config.model.path, config.model.trust_remote_code)
    loader = build_loader(config, tokenizer, console)

    torch.manual_seed(cfg.seed)
    model = build_model(config.model.path, config.model.trust_remote_code).to(parallel.device)
    apply_fsdp(
        model,
        decoder_layers(model),
        parallel.dp_mesh,
        mixed_precision(parallel.device),
        reshard_after_forward=config.parallel.reshard_after_forward,
        cpu_offload=config.parallel.cpu_offload,
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)

    log = MetricsLog(out / "metrics.jsonl") if main else None
    seen_tokens = 0
    with progress_bar(console) as bar:
        task = bar.add_task("train", total=cfg.steps, status="")
        for step in range(1, cfg.steps + 1):
            start = time.perf_counter()
            rows = loader.next_batch(rows_multiple=parallel.dp_size * cfg.micro_batch_size)
            # Every rank holds the whole global batch: count loss tokens without a collective.
            loss_tokens = sum(r.loss_tokens for r in rows)
            micro = rank_share(rows, parallel.dp_rank, parallel.dp_size, cfg.micro_batch_size)
            loss_sum = torch.zeros((), device=parallel.device)
            for i, rows_mb in enumerate(micro):
                mb = {k: v.to(parallel.device) for k, v in stack_rows(rows_mb).items()}
                model.set_requires_gradient_sync(i == len(micro) - 1)
                local = micro_step_loss(model, mb)
                # FSDP averages gradients over dp ranks; scale so the result is the
                # gradient of (sum of token losses / tokens in the global batch).
                (local * parallel.dp_size / loss_tokens).backward()
                loss_sum += local.detach()
            grad_norm = grad_norm_and_clip(model, cfg.grad_clip)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dist.all_reduce(loss_sum)
            loss = loss_sum.item() / max(loss_tokens, 1)
            elapsed = time.perf_counter() - start
            step_tokens = len(rows) * config.data.max_seq_len
            seen_tokens += step_tokens
            if log:
                log.write(
                    {
                        "step": step,
                        "loss": loss,
                        "grad_norm": grad_norm,
                        "lr": lr,
                        "tokens": seen_tokens,
                        "loss_tokens": loss_tokens,
                        "tokens_per_s": step_tokens / elapsed,
                        "step_time_s": elapsed,
                    }
                )
            bar.update(task, advance=1, status=f"loss {loss:.4f}  lr {lr:.2e}")

    export_hf(model, tokenizer, out / "hf")
    if log:
        log.close()
        records = read_metrics(out / "metrics.jsonl")
        plot_loss(records, out / "loss.png")
        console.print(
            f"done: loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}; run directory {out}"
        )
