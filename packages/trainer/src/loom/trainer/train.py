"""The text trainer: one readable loop from config to HF export."""

from __future__ import annotations

import math
import os
import resource
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from loom.dist.clip import clip_grad_norm_
from loom.dist.mesh import ParallelState, destroy_parallel, init_parallel
from loom.dist.ulysses import slice_input
from loom.trainer.checkpointing import StopRequest, save
from loom.trainer.config import Config
from loom.trainer.data.collate import VisionTokens, boundaries, stack_rows, vision_inputs
from loom.trainer.data.packing import MEDIA, Row
from loom.trainer.data.samples import IGNORE_INDEX
from loom.trainer.errors import Interrupted, LoomError
from loom.trainer.export import export_hf
from loom.trainer.flops import sum_sq_lengths
from loom.trainer.metrics import plot_run, progress_bar
from loom.trainer.run import Run, build_run


def rank_share(rows: list[Row], dp_rank: int, dp_size: int, micro: int) -> list[list[Row]]:
    """This rank's contiguous share of the global batch, in micro-batches of ``micro`` rows."""
    per_rank = len(rows) // dp_size
    mine = rows[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    return [mine[i : i + micro] for i in range(0, len(mine), micro)]


VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
VISION_KEYS = (*(k for keys in MEDIA.values() for k in keys), "vision_slices", "vision_shards")


def varlen_kwargs(cu_seqlens: torch.Tensor, longest: int) -> dict:
    """Sample boundaries in the keywords HF passes through to the attention backend."""
    return dict(zip(VARLEN_KEYS, (cu_seqlens, cu_seqlens, longest, longest), strict=True))


def micro_step_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], num_items: float, micro_batches: int
):
    """The micro-batch's summed token cross-entropy divided by ``num_items``, plus a MoE
    port's router aux loss over ``micro_batches`` (so a step's aux loss is the mean over
    every micro-batch of every rank): what this rank backpropagates.

    A Loom port computes it inside its forward with the fused linear cross-entropy (no
    logits); an upstream model returns logits and the loss is taken from them here.
    """
    keys = ("input_ids", "position_ids", *VARLEN_KEYS, *VISION_KEYS)
    inputs = {k: batch[k] for k in keys if k in batch}
    if getattr(model, "loom_port", False):
        if hasattr(model.config, "router_aux_loss_coef"):
            inputs["aux_loss_scale"] = 1 / micro_batches
        out = model(**inputs, shift_labels=batch["labels"], num_items_in_batch=num_items)
        return out.loss
    logits = model(**inputs).logits
    total = F.cross_entropy(
        logits.float().flatten(0, 1),
        batch["labels"].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total / num_items


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    loss_tokens: int
    stop: bool = False  # a rank was asked to stop (SIGTERM / SIGINT)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """The fused AdamW skips an update on the device when its ``found_inf`` is set, so the
    step need not wait for the GPU to decide; other implementations cannot."""
    return bool(optimizer.defaults.get("fused"))


def reduce_and_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    local_loss: torch.Tensor,
    stop_flag: torch.Tensor,
    max_norm: float,
) -> tuple[StepResult, bool]:
    """Everything after backward, with one host-device synchronization: the loss and the
    stop flag are summed over the ranks in one collective, the gradient clipped and (with
    the fused optimizer) a non-finite update skipped on the device, then the three numbers
    the host needs are read at once. Also returns whether the optimizer has stepped."""
    reduced = torch.stack([local_loss, stop_flag])
    dist.all_reduce(reduced)
    norm = clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    on_device = skips_on_device(optimizer)
    if on_device:
        finite = torch.isfinite(reduced[0]) & torch.isfinite(norm)
        optimizer.found_inf = (~finite).float()
        optimizer.step()
    loss, stopping, grad_norm = torch.stack([reduced[0], reduced[1], norm]).tolist()
    return StepResult(loss, grad_norm, 0, stopping > 0), on_device


def to_device(
    rows: list[Row], device: torch.device, sp_group, tokens: VisionTokens | None = None
) -> dict[str, torch.Tensor]:
    """A micro-batch's tensors on ``device``: this SP rank's slice of ``[rows, seq]``
    (boundaries stay whole-row; a vision-language model's patches stay whole). Copied from pinned memory without waiting: a copy from
    pageable memory would make the host wait for the GPU to finish the work queued
    before it, once per tensor."""
    pin = device.type == "cuda"

    def move(t: torch.Tensor) -> torch.Tensor:
        return (t.pin_memory() if pin else t).to(device, non_blocking=pin)

    batch = {k: slice_input(move(v), v.dim() - 1, sp_group) for k, v in stack_rows(rows).items()}
    cu_seqlens, longest = boundaries(rows)
    batch |= varlen_kwargs(move(cu_seqlens), longest)
    if rows[0].vision is not None:
        sp_rank, sp_size = dist.get_rank(sp_group), dist.get_world_size(sp_group)
        vision = vision_inputs(rows, tokens, sp_rank, sp_size)
        if vision:
            vision["vision_slices"] = {k: move(v) for k, v in vision["vision_slices"].items()}
            batch |= {k: move(v) if isinstance(v, torch.Tensor) else v for k, v in vision.items()}
    return batch


def forward_backward(
    model: nn.Module, micro: list[list[Row]], loss_tokens: int, parallel: ParallelState
) -> torch.Tensor:
    """Accumulate gradients of the global token-mean loss over this rank's micro-batches;
    return this rank's share of that loss, on the device (not reduced: the step reduces it
    together with the stop flag, in one collective).

    FSDP averages gradients over all dp x sp ranks, so each rank backpropagates its
    summed token loss divided by ``loss_tokens / fsdp_size``: the average is then the
    gradient of (all tokens' loss / ``loss_tokens``), whatever the layout.
    """
    num_items = max(loss_tokens, 1) / parallel.fsdp_size
    total = torch.zeros((), device=parallel.device)
    tokens = VisionTokens.of(model.config)
    batches = [to_device(rows, parallel.device, parallel.sp_group, tokens) for rows in micro]
    for i, batch in enumerate(batches):
        last = i == len(micro) - 1
        model.set_requires_gradient_sync(last)  # reduce once per step
        if parallel.fsdp_size == 1:
            # One rank holds whole parameters anyway: keep the gathered copy for the next
            # micro-batch instead of gathering it again (resharded after the last, so the
            # optimizer's update reaches the next step's copy).
            model.set_reshard_after_backward(last)
        loss = micro_step_loss(model, batch, num_items, len(micro))
        loss.backward()
        total += loss.detach()
    return total / parallel.fsdp_size


def should_skip(result: StepResult, policy: str, step: int) -> bool:
    """True to drop this update. Loss and grad norm are global, so every rank agrees."""
    if math.isfinite(result.loss) and math.isfinite(result.grad_norm):
        return False
    if policy == "skip":
        return True
    raise LoomError(
        f"step {step}: loss {result.loss} / grad norm {result.grad_norm} is not finite "
        "(train.nan_policy: stop); lower optim.lr or set train.nan_policy: skip"
    )


def check_learns(result: StepResult, step: int) -> None:
    """Stop when the first step's gradient is exactly zero: nothing can learn (a model whose
    weights or buffers did not load, everything frozen, every label ignored)."""
    if step == 1 and result.grad_norm == 0.0:
        raise LoomError(
            f"step 1: the gradient norm is exactly 0 (loss {result.loss:.6g}, "
            f"{result.loss_tokens} loss tokens): nothing can learn; check that model.path's "
            "weights load and that the data has tokens to predict"
        )


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _fault_injection(step: int) -> None:
    # For the resume tests: die as abruptly as a lost machine right after ``step``.
    if os.environ.get("LOOM_TEST_KILL_AFTER_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


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
    if config.train.auto:
        config = auto_config(config)
    elif config.lora.rank == "auto":
        config = auto_lora_rank(config)
    p = config.parallel
    parallel = init_parallel(p.dp_replicate, p.dp_shard, p.sp_size, p.ep_size)
    try:
        _train(config, parallel)
    finally:
        destroy_parallel()


def auto_config(config: Config) -> Config:
    """``train.auto``: the config with the settings that fit this launch's GPUs (every
    rank computes the same), printed by rank 0."""
    from loom.models.registry import load_config
    from loom.trainer.planner.auto import choose
    from loom.trainer.planner.hardware import resolve

    world = int(os.environ.get("WORLD_SIZE", "1"))
    choice = choose(config, world, resolve(config.hardware), load_config(config.model.path))
    if os.environ.get("RANK", "0") == "0":
        chosen = ", ".join(f"{k} {v}" for k, v in choice.changes.items()) or "the config as it is"
        print(f"train.auto: {chosen} (predicted peak {choice.estimate.peak / 2**30:.1f} GiB a GPU)")
    return choice.config


def auto_lora_rank(config: Config) -> Config:
    """``lora.rank: auto`` without ``train.auto``: the rank for the model's size."""
    from loom.models.registry import load_config
    from loom.trainer.planner.auto import lora_rank_for, with_lora_rank

    config, changes = with_lora_rank(config, lora_rank_for(load_config(config.model.path)))
    if os.environ.get("RANK", "0") == "0":
        print("lora.rank auto: " + ", ".join(f"{k} {v}" for k, v in changes.items()))
    return config


def train_step(run: Run, stop: StopRequest) -> tuple[dict, bool]:
    """One optimizer step over the next global batch; returns its metrics record and
    whether a rank was asked to stop."""
    cfg, parallel = run.config.train, run.parallel
    start = time.perf_counter()
    rows = run.loader.next_batch(rows_multiple=parallel.dp_size * cfg.micro_batch_size)
    # Every rank holds the whole global batch: count loss tokens without a collective.
    loss_tokens = sum(r.loss_tokens for r in rows)
    micro = rank_share(rows, parallel.dp_rank, parallel.dp_size, cfg.micro_batch_size)
    local_loss = forward_backward(run.model, micro, loss_tokens, parallel)
    lr = run.scheduler.get_last_lr()[0]
    result, updated = reduce_and_update(
        run.model, run.optimizer, local_loss, stop.flag(parallel.device), run.config.optim.grad_clip
    )
    result.loss_tokens = loss_tokens
    check_learns(result, run.step + 1)
    skipped = should_skip(result, cfg.nan_policy, run.step + 1)
    if not skipped:
        if not updated:
            run.optimizer.step()
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    run.step += 1
    step_tokens = len(rows) * run.config.data.max_seq_len
    run.tokens += step_tokens
    flops = run.flops.step_flops(step_tokens, sum_sq_lengths([r.cu_seqlens for r in rows]))
    peak = run.peak_flops * parallel.world_size if run.peak_flops else None
    record = {
        "step": run.step,
        "loss": result.loss,
        "grad_norm": result.grad_norm,
        "lr": lr,
        "tokens": run.tokens,
        "loss_tokens": loss_tokens,
        "tokens_per_s": step_tokens / elapsed,
        "mfu": flops / elapsed / peak if peak else None,
        "peak_memory_gb": peak_memory_gb(parallel.device),
        "step_time_s": elapsed,
        "epoch": run.loader.epoch,
        "skipped": skipped,
    }
    if run.loader.streams:
        record["skipped_records"] = run.loader.skipped_records
    if rows[0].vision is not None:
        record |= vision_metrics(rows, VisionTokens.of(run.model.config), step_tokens)
    return record, result.stop


def vision_metrics(rows: list[Row], tokens: VisionTokens, step_tokens: int) -> dict:
    """A vision-language step's tokens split: image and video placeholders (the vision
    tower's features), text (the rest, padding excluded), and the images and videos."""
    image = sum(int((r.input_ids == tokens.image).sum()) for r in rows)
    video = sum(int((r.input_ids == tokens.video).sum()) for r in rows)
    return {
        "images": sum(len(r.vision.image_grid_thw) for r in rows),
        "videos": sum(len(r.vision.video_grid_thw) for r in rows),
        "image_tokens": image,
        "video_tokens": video,
        "text_tokens": step_tokens - image - video - sum(r.padding for r in rows),
    }


def _train(config: Config, parallel: ParallelState) -> None:
    run = build_run(config, parallel)
    total, every = config.train.steps, config.checkpoint.every
    stop, first = StopRequest(), None
    try:
        with progress_bar(run.console) as bar:
            task = bar.add_task(
                "train", total=total, completed=run.step, status="", visible=config.log.progress
            )
            while run.step < total:
                record, stopping = train_step(run, stop)
                first = first or record
                logged = run.step % config.log.every == 0 or run.step == total or stopping
                if run.log and logged:
                    run.log.write(record)
                bar.update(
                    task, advance=1, status=f"loss {record['loss']:.4f}  lr {record['lr']:.2e}"
                )
                _fault_injection(run.step)
                if stopping or (every and run.step % every == 0):
                    path = save(run)
                if stopping:
                    raise Interrupted(f"saved {path}; run the same command to resume")
    finally:
        stop.restore()
    tokenizer = run.processor or run.tokenizer
    export_hf(run.model, tokenizer, run.out / "hf", run.config.model.path, run.config.lora)
    if run.log:
        run.log.close()
        plot_run(run.out)
        if first:
            summary = f"loss {first['loss']:.4f} -> {record['loss']:.4f}; "
            run.console.print(f"done: {summary}run directory {run.out}")
