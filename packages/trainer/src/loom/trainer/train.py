"""The text trainer: one readable loop from config to HF export."""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from loom.dist.fsdp import apply_fsdp, mixed_precision
from loom.dist.mesh import ParallelState, destroy_parallel, init_parallel
from loom.trainer.config import Config, dump_config
from loom.trainer.data.collate import boundaries, stack_rows
from loom.trainer.data.loader import BatchLoader
from loom.trainer.data.packing import Row
from loom.trainer.data.samples import IGNORE_INDEX, tokenize_source
from loom.trainer.data.sources import load_source
from loom.trainer.errors import LoomError
from loom.trainer.export import export_hf
from loom.trainer.flops import flop_model, peak_flops, sum_sq_lengths
from loom.trainer.metrics import MetricsLog, plot_run, progress_bar
from loom.trainer.model import (
    build_model,
    decoder_layers,
    enable_activation_checkpointing,
    load_tokenizer,
)
from loom.trainer.optim import build_optimizer, build_scheduler


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
        [s.format == "text" for s in config.data.sources],
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


VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def varlen_kwargs(cu_seqlens: torch.Tensor, longest: int) -> dict:
    """Sample boundaries in the keywords HF passes through to the attention backend."""
    return dict(zip(VARLEN_KEYS, (cu_seqlens, cu_seqlens, longest, longest), strict=True))


def micro_step_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed token cross-entropy of one micro-batch (the caller normalises)."""
    boundaries = {k: batch[k] for k in VARLEN_KEYS if k in batch}
    logits = model(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], **boundaries
    ).logits
    return F.cross_entropy(
        logits.float().flatten(0, 1),
        batch["labels"].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def grad_norm_and_clip(model: nn.Module, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    loss_tokens: int


def forward_backward(
    model: nn.Module, micro: list[list[Row]], loss_tokens: int, parallel: ParallelState
) -> float:
    """Accumulate gradients of (summed token loss / ``loss_tokens``) over this rank's
    micro-batches; return the global mean loss."""
    loss_sum = torch.zeros((), device=parallel.device)
    for i, rows in enumerate(micro):
        batch = {k: v.to(parallel.device) for k, v in stack_rows(rows).items()}
        cu_seqlens, longest = boundaries(rows)
        batch |= varlen_kwargs(cu_seqlens.to(parallel.device), longest)
        model.set_requires_gradient_sync(i == len(micro) - 1)  # reduce once per step
        local = micro_step_loss(model, batch)
        # FSDP averages gradients over dp ranks; scaling by dp_size makes the result the
        # gradient of the global token mean whatever the number of ranks.
        (local * parallel.dp_size / max(loss_tokens, 1)).backward()
        loss_sum += local.detach()
    dist.all_reduce(loss_sum)
    return loss_sum.item() / max(loss_tokens, 1)


def should_skip(result: StepResult, policy: str, step: int) -> bool:
    """True to drop this update. Loss and grad norm are global, so every rank agrees."""
    if math.isfinite(result.loss) and math.isfinite(result.grad_norm):
        return False
    if policy == "skip":
        return True
    raise LoomError(
        f"step {step}: loss {result.loss} / grad norm {result.grad_norm} is not finite "
        "(train.nan_policy: stop); lower train.lr or set train.nan_policy: skip"
    )


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


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

    tokenizer = load_tokenizer(config.model.path)
    loader = build_loader(config, tokenizer, console)

    torch.manual_seed(cfg.seed)
    model = build_model(config.model.path, config.model.attn_implementation)
    flops = flop_model(model)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model, cfg.ac_every)
    model.to(parallel.device)
    apply_fsdp(
        model,
        decoder_layers(model),
        parallel.dp_mesh,
        mixed_precision(parallel.device),
        reshard_after_forward=config.parallel.reshard_after_forward,
        cpu_offload=config.parallel.cpu_offload,
    )
    optimizer = build_optimizer(
        model, cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay, parallel.device
    )
    scheduler = build_scheduler(
        optimizer, cfg.schedule, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio
    )
    peak = peak_flops(parallel.device, config.log.peak_tflops)
    log = None
    if main:
        log = MetricsLog(
            out, config.log.tensorboard, config.log.wandb_project, config.model_dump(mode="json")
        )

    seen_tokens, first_loss = 0, None
    with progress_bar(console) as bar:
        task = bar.add_task("train", total=cfg.steps, status="", visible=config.log.progress)
        for step in range(1, cfg.steps + 1):
            start = time.perf_counter()
            rows = loader.next_batch(rows_multiple=parallel.dp_size * cfg.micro_batch_size)
            # Every rank holds the whole global batch: count loss tokens without a collective.
            loss_tokens = sum(r.loss_tokens for r in rows)
            micro = rank_share(rows, parallel.dp_rank, parallel.dp_size, cfg.micro_batch_size)
            loss = forward_backward(model, micro, loss_tokens, parallel)
            result = StepResult(loss, grad_norm_and_clip(model, cfg.grad_clip), loss_tokens)
            lr = scheduler.get_last_lr()[0]
            skipped = should_skip(result, cfg.nan_policy, step)
            if not skipped:
                optimizer.step()
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - start
            step_tokens = len(rows) * config.data.max_seq_len
            seen_tokens += step_tokens
            step_flops = flops.step_flops(step_tokens, sum_sq_lengths([r.cu_seqlens for r in rows]))
            record = {
                "step": step,
                "loss": result.loss,
                "grad_norm": result.grad_norm,
                "lr": lr,
                "tokens": seen_tokens,
                "loss_tokens": loss_tokens,
                "tokens_per_s": step_tokens / elapsed,
                "mfu": step_flops / elapsed / (peak * parallel.world_size) if peak else None,
                "peak_memory_gb": peak_memory_gb(parallel.device),
                "step_time_s": elapsed,
                "epoch": loader.mixture.epoch,
                "skipped": skipped,
            }
            first_loss = result.loss if first_loss is None else first_loss
            if log:
                log.write(record)
            bar.update(task, advance=1, status=f"loss {result.loss:.4f}  lr {lr:.2e}")

    export_hf(model, tokenizer, out / "hf")
    if log:
        log.close()
        plot_run(out)
        console.print(f"done: loss {first_loss:.4f} -> {result.loss:.4f}; run directory {out}")
