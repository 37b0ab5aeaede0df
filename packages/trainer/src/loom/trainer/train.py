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
from loom.trainer.data import (
    IGNORE_INDEX,
    global_batches,
    load_texts,
    pack,
    rank_micro_batches,
    tokenize,
)
from loom.trainer.export import export_hf
from loom.trainer.metrics import MetricsLog, plot_loss, progress_bar, read_metrics
from loom.trainer.model import build_model, decoder_layers, load_tokenizer
from loom.trainer.schedule import warmup_cosine


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
    accum = config.check_world(parallel.dp_size)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(config, out / "config.yaml")

    tokenizer = load_tokenizer(config.model.path, config.model.trust_remote_code)
    texts = load_texts(config.data.path, config.data.text_field)
    rows = pack(tokenize(texts, tokenizer), tokenizer.eos_token_id, config.data.max_seq_len)
    console.print(f"data: {len(texts)} documents -> {len(rows)} rows of {config.data.max_seq_len}")

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
    batches = global_batches(len(rows), cfg.global_batch_size, cfg.seed)
    seen_tokens = 0
    with progress_bar(console) as bar:
        task = bar.add_task("train", total=cfg.steps, status="")
        for step in range(1, cfg.steps + 1):
            start = time.perf_counter()
            batch = next(batches)
            # Every rank sees the whole global batch's labels: count without a collective.
            loss_tokens = int((rows.labels[batch] != IGNORE_INDEX).sum())
            micro = rank_micro_batches(
                rows, batch, parallel.dp_rank, parallel.dp_size, cfg.micro_batch_size
            )
            loss_sum = torch.zeros((), device=parallel.device)
            for i, mb in enumerate(micro):
                mb = {k: v.to(parallel.device) for k, v in mb.items()}
                model.set_requires_gradient_sync(i == accum - 1)
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
            loss = loss_sum.item() / loss_tokens
            elapsed = time.perf_counter() - start
            step_tokens = rows.input_ids[batch].size
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
