"""Vision-language training: Loom against plain HF on the same multimodal batch.

    python benchmarks/vlm_throughput.py --shape qwen3-vl-2b --images 4 --text 4096 \
        --systems hf,loom --out results.jsonl
    python benchmarks/vlm_throughput.py --shape qwen3-vl-2b --images 4 --find-max \
        --start 16384 --systems hf,loom --out results.jsonl

Random weights (the published config's sizes, ``shapes.py``) and random data: each row
holds ``--images`` images of ``--image-size`` pixels, then ``--text`` random text tokens
(loss on the text only); ``--rows`` rows per forward, one forward per optimizer step.
Each system runs in its own process (clean CUDA memory statistics).

- hf: upstream's class, fp32 weights, bf16 autocast, SDPA (text and vision), fused
  AdamW; it computes its 3-D positions itself from the grids.
- loom: Loom's port through the trainer's code path (FSDP2 bf16 params / fp32 reduce,
  loom_sdpa text attention, sdpa vision attention, fused linear cross-entropy, its
  optimizer); positions from the data pipeline's ``mrope_positions``.

Vision and text time are taken apart with CUDA events: the vision tower's forward (its
forward hooks) and its backward (from the moment the last gradient of its outputs
arrives to the moment its patch embedding's arrives); text is the rest of the step (the
optimizer step and FSDP's gradient reduction included). tokens/s counts every token of the row
(image placeholders included). ``--find-max`` doubles ``--text`` from ``--start`` with
activation checkpointing until a step fails (each length in its own process) and reports
the longest that trained.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import peak_gib
from shapes import SHAPES

ROOT = Path(__file__).resolve().parents[1]


def model_config(shape: str):
    from transformers import AutoConfig

    if shape == "toy":  # a CPU smoke test of this script
        return AutoConfig.from_pretrained(ROOT / "tests/toy_config/qwen3_vl_toy")
    return AutoConfig.for_model(**SHAPES[shape])


def make_rows(config, args, seed: int = 0) -> list[tuple]:
    """``args.rows`` rows of (ids, labels for HF, labels shifted for Loom, pixels, grids)."""
    from loom.trainer.data.samples import IGNORE_INDEX, shift_labels

    vision = config.vision_config
    patch, merge = vision.patch_size, vision.spatial_merge_size
    side = args.image_size // patch
    width = vision.in_channels * vision.temporal_patch_size * patch**2
    per_image = side * side // merge**2
    vocab = min(config.text_config.vocab_size, config.vision_start_token_id)
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(args.rows):
        image = [config.vision_start_token_id, *[config.image_token_id] * per_image]
        image.append(config.vision_end_token_id)
        text = rng.integers(0, vocab, args.text).tolist()
        ids = np.asarray(image * args.images + text, dtype=np.int64)
        is_text = np.arange(len(ids)) >= len(image) * args.images
        hf_labels = np.where(is_text, ids, IGNORE_INDEX)
        loom_labels = np.asarray(shift_labels(ids.tolist(), is_text.tolist()), dtype=np.int64)
        pixels = rng.standard_normal((args.images * side * side, width), dtype=np.float32)
        grids = np.asarray([[1, side, side]] * args.images, dtype=np.int64)
        rows.append((ids, hf_labels, loom_labels, pixels, grids))
    return rows


class VisionTimer:
    """CUDA events around the vision tower's forward and its backward, summed over the
    step's micro-batches (``reset`` before each step)."""

    def __init__(self, visual: torch.nn.Module, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: dict[str, list] = {}
        visual.register_forward_pre_hook(lambda *_: self.mark("forward_start"))
        visual.register_forward_hook(self._after_forward)
        # The patch embedding is the tower's first module, so its gradient arrives last:
        # the tower's backward ends there (before the optimizer, and before the gradient
        # reduction FSDP runs after the whole backward).
        visual.patch_embed.register_full_backward_pre_hook(lambda *_: self.mark("backward_end"))

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.setdefault(name, []).append(event)
        else:
            self.marks.setdefault(name, []).append(time.perf_counter())

    def reset(self) -> None:
        self.marks = {}

    def _after_forward(self, module, inputs, output) -> None:
        self.mark("forward_end")
        for tensor in _tensors(output):
            if tensor.requires_grad:
                tensor.register_hook(self._backward_started)

    def _backward_started(self, grad) -> None:
        # the first of the outputs' gradients starts this forward's backward
        if len(self.marks.get("backward_start", [])) < len(self.marks["forward_end"]):
            self.mark("backward_start")

    def seconds(self, a: str, b: str) -> float:
        pairs = zip(self.marks[a], self.marks[b], strict=True)
        if self.cuda:
            return sum(x.elapsed_time(y) for x, y in pairs) / 1e3
        return sum(y - x for x, y in pairs)


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, list | tuple):
        return [t for item in output for t in _tensors(item)]
    return []


def hf_step(config, rows, device, ac: bool, accum: int = 1):
    from transformers import AutoModelForImageTextToText

    with device:
        model = AutoModelForImageTextToText.from_config(
            config, attn_implementation="sdpa", dtype=torch.float32
        )
    if ac:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    batch = {
        "input_ids": torch.from_numpy(np.stack([r[0] for r in rows])).to(device),
        "labels": torch.from_numpy(np.stack([r[1] for r in rows])).to(device),
        "pixel_values": torch.from_numpy(np.concatenate([r[3] for r in rows])).to(device),
        "image_grid_thw": torch.from_numpy(np.concatenate([r[4] for r in rows])).to(device),
    }
    # what the processor returns beside input_ids (v5 reads the placeholders from it)
    batch["mm_token_type_ids"] = (batch["input_ids"] == config.image_token_id).long()
    timer = VisionTimer(model.model.visual, device)

    def step():
        for _ in range(accum):  # the same micro-batch again: a step of ``accum`` of them
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(**batch).loss / accum
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step, timer


def loom_step(config, rows, device, ac: bool, compile: bool = False, accum: int = 1):
    from loom.dist.mesh import init_parallel
    from loom.models import build_model
    from loom.models.vlm_positions import mrope_positions
    from loom.trainer.config import OptimConfig
    from loom.trainer.data.packing import Vision, build_row
    from loom.trainer.optim import build_optimizer
    from loom.trainer.parallelize import (
        compile_decoder_layers,
        enable_activation_checkpointing,
        shard_model,
    )
    from loom.trainer.train import forward_backward

    parallel = init_parallel()
    with device:
        model = build_model(config, attn_implementation="loom_sdpa", dtype=torch.float32)
    if ac:
        enable_activation_checkpointing(model)
    if compile:
        compile_decoder_layers(model)
    shard_model(model, parallel)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-5), device=parallel.device)
    packed = []
    for ids, _, labels, pixels, grids in rows:
        mrope = mrope_positions(
            ids, grids, None, image_token_id=config.image_token_id,
            video_token_id=config.video_token_id,
            spatial_merge_size=config.vision_config.spatial_merge_size,
        )  # fmt: skip
        packed.append(build_row([(ids, labels, Vision(mrope, pixels, grids))], len(ids), 0))
    loss_tokens = sum(r.loss_tokens for r in packed)
    timer = VisionTimer(model.model.visual, device)

    def step():
        loss = forward_backward(model, [packed] * accum, loss_tokens * accum, parallel)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step, timer


def run_one(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = model_config(args.shape)
    config.use_cache = False
    rows = make_rows(config, args)
    if args.system == "loom":
        step, timer = loom_step(config, rows, device, args.ac, args.compile, args.accum)
    else:
        step, timer = hf_step(config, rows, device, args.ac, args.accum)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    steps, vision = [], []
    for i in range(args.warmup + args.steps):
        sync()
        timer.reset()
        start = time.perf_counter()
        step()
        sync()
        if i >= args.warmup:
            steps.append(time.perf_counter() - start)
            vision.append(
                timer.seconds("forward_start", "forward_end")
                + timer.seconds("backward_start", "backward_end")
            )
    seconds, vision_s = statistics.median(steps), statistics.median(vision)
    tokens = sum(len(r[0]) for r in rows) * args.accum
    return {
        "system": args.system,
        "shape": args.shape,
        "rows": args.rows,
        "accum": args.accum,
        "images_per_row": args.images,
        "image_size": args.image_size,
        "text_tokens_per_row": args.text,
        "tokens_per_row": len(rows[0][0]),
        "activation_checkpointing": args.ac,
        "compile": args.compile and args.system == "loom",
        "tokens_per_s": tokens / seconds,
        "step_s": seconds,
        "vision_s": vision_s,
        "text_s": seconds - vision_s,
        "peak_memory_gib": peak_gib() if device.type == "cuda" else None,
    }


def child(args, system: str, extra: list[str]) -> dict:
    command = [sys.executable, __file__, "--system", system, *sys.argv[1:], *extra]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-2:]
        return {"system": system, "shape": args.shape, "error": " | ".join(tail)[-400:]}
    return json.loads(lines[0][len("RESULT ") :])


def find_max(args, system: str) -> dict:
    """The longest text (doubling from --start) one step of ``system`` trains with AC."""
    best, text, tried = None, args.start, []
    while text <= args.stop:
        row = child(args, system, ["--text", str(text), "--ac", "--steps", "1", "--warmup", "1"])
        tried.append({"text": text, "ok": "error" not in row, **({"error": row["error"]} if "error" in row else {})})  # fmt: skip
        if "error" in row:
            break
        best, text = row, text * 2
    return {"system": system, "shape": args.shape, "find_max": True, "longest": best,
            "tried": tried}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="qwen3-vl-2b", choices=[*sorted(SHAPES), "toy"])
    parser.add_argument("--systems", default="hf,loom")
    parser.add_argument("--system", help=argparse.SUPPRESS)  # set for the child processes
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, default=1, help="rows per forward")
    parser.add_argument("--accum", type=int, default=1, help="forwards per optimizer step")
    parser.add_argument("--images", type=int, default=4, help="images per row")
    parser.add_argument("--image-size", type=int, default=448, help="pixels per side")
    parser.add_argument("--text", type=int, default=4096, help="text tokens per row")
    parser.add_argument("--ac", action="store_true", help="activation checkpointing")
    parser.add_argument("--compile", action="store_true", help="loom: compile the text layers")
    parser.add_argument("--find-max", action="store_true")
    parser.add_argument("--start", type=int, default=16384, help="--find-max: first length")
    parser.add_argument("--stop", type=int, default=1 << 20, help="--find-max: last length")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.system:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    rows = []
    for system in args.systems.split(","):
        row = find_max(args, system) if args.find_max else child(args, system, [])
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with args.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
