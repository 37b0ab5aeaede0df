"""The planner against the GPU: predicted vs measured peak memory, and train.auto's choice
vs the fastest setting found by hand.

    python benchmarks/memory_model.py --shapes qwen3-0.6b,qwen3-1.7b --seq 4096 \
        --rows 4 --out rows.jsonl

For each shape and each way of training (full, LoRA, QLoRA) one process builds Loom's
port from random weights, as the trainer does (``train_throughput.py``'s loom path:
FSDP2 at world size 1, bf16 compute, the fused loss), and steps it under every setting
a user would try by hand: activation checkpointing off and on x ``--micro`` rows per
forward, ``--rows`` rows of ``--seq`` tokens per optimizer step (accumulated). Each
setting gets a warm-up step and ``--steps`` timed ones; its peak is
``torch.cuda.max_memory_allocated`` over them (reset before), next to
``loom.trainer.planner.memory.estimate`` for the same setting. Settings run from the
least memory to the most; a setting that runs out of memory is recorded as such and the
larger micro-batches of its kind are skipped.

train.auto's choice is ``loom.trainer.planner.auto.choose`` for a config of the same
shape, rows and training, on this device's profile: the table says which setting it
took, whether that setting ran, and its tokens/s against the fastest setting measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from shapes import SHAPES

HERE = Path(__file__).parent
ROOT = HERE.parent
MODES = ("full", "lora", "qlora")


def child(args) -> None:
    """One shape and mode: every setting, one JSON line each."""
    import gc

    import numpy as np
    from _timing import peak_gib, wall_s
    from train_throughput import loom_lora, random_model

    from loom.dist.mesh import init_parallel
    from loom.trainer.config import OptimConfig
    from loom.trainer.data.packing import build_row
    from loom.trainer.data.samples import shift_labels
    from loom.trainer.model import decoder_layers
    from loom.trainer.optim import build_optimizer
    from loom.trainer.parallelize import enable_activation_checkpointing, shard_model
    from loom.trainer.train import forward_backward

    device = torch.device("cuda")
    if args.memory_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib * 2**30 / total))
    torch.manual_seed(0)
    model = random_model(args.shape, device, loom=True)
    if args.mode != "full":
        loom_lora(model, args.lora_rank, qlora=args.mode == "qlora")
    parallel = init_parallel()
    enable_activation_checkpointing(model)
    shard_model(model, parallel)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-5), device=parallel.device)
    vocab = SHAPES[args.shape]["vocab_size"]

    def rows_of(micro: int):
        tokens = torch.randint(0, vocab, (micro, args.seq)).numpy()
        labels = [np.asarray(shift_labels(list(ids), [True] * len(ids))) for ids in tokens]
        return [
            build_row([(ids, lab)], args.seq, 0) for ids, lab in zip(tokens, labels, strict=True)
        ]

    def step(micro_rows, accum: int):
        loss_tokens = sum(r.loss_tokens for r in micro_rows) * accum
        forward_backward(model, [micro_rows] * accum, loss_tokens, parallel)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    micros = [m for m in (1, 2, 4, 8) if args.rows % m == 0]
    for ac in (True, False):
        for layer in decoder_layers(model):
            layer.gradient_checkpointing = ac
        for micro in micros:
            row = {"shape": args.shape, "mode": args.mode, "seq": args.seq, "ac": ac,
                   "micro": micro, "accum": args.rows // micro}  # fmt: skip
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                rows, accum = rows_of(micro), args.rows // micro
                times = [wall_s(lambda r=rows, a=accum: step(r, a)) for _ in range(1 + args.steps)]
                row |= {"peak_gib": peak_gib(),
                        "tokens_per_s": args.rows * args.seq * args.steps / sum(times[1:])}  # fmt: skip
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                row |= {"oom": True}
            print("ROW " + json.dumps(row), flush=True)
            if row.get("oom"):
                break


def auto_choice(
    shape: str, seq: int, rows: int, mode: str, lora_rank: int, memory_gib: float | None
) -> dict:
    """What train.auto picks for this run on this device (its profile detected; its
    memory ``memory_gib`` where capped)."""
    import dataclasses

    from transformers import AutoConfig

    from loom.trainer.config import Config
    from loom.trainer.errors import ConfigError
    from loom.trainer.planner.auto import choose
    from loom.trainer.planner.hardware import resolve

    model_config = AutoConfig.for_model(**SHAPES[shape])
    with tempfile.TemporaryDirectory() as tmp:
        lora = {"rank": lora_rank, "quantize": "nf4" if mode == "qlora" else "none"}
        config = Config.model_validate({
            "model": {"path": tmp}, "data": {"path": str(ROOT / "examples/tiny/corpus.jsonl"),
                                             "max_seq_len": seq},
            "train": {"output_dir": tmp, "steps": 1, "global_batch_size": rows, "auto": True},
            **({"lora": lora} if mode != "full" else {}),
        })  # fmt: skip
        try:
            profile = resolve("auto")
            if memory_gib:
                profile = dataclasses.replace(profile, memory_gib=memory_gib)
            chosen = choose(config, 1, profile, model_config).config
        except ConfigError as err:
            return {"ac": None, "offload": None, "micro": None, "error": str(err)}
    return {"ac": chosen.memory.activation_checkpointing,
            "offload": chosen.memory.activation_offload,
            "micro": chosen.train.micro_batch_size}  # fmt: skip


def predicted_gib(shape: str, row: dict, lora_rank: int) -> tuple[float, dict]:
    from transformers import AutoConfig

    from loom.trainer.config import LORA_TARGETS
    from loom.trainer.planner.memory import GIB, Setup, estimate

    lora = row["mode"] != "full"
    setup = Setup(seq=row["seq"], micro=row["micro"], accum=row["accum"],
                  activation_checkpointing=row["ac"],
                  lora_rank=lora_rank if lora else 0,
                  lora_targets=tuple(LORA_TARGETS) if lora else (),
                  lora_quantize=row["mode"] == "qlora")  # fmt: skip
    result = estimate(AutoConfig.for_model(**SHAPES[shape]), setup)
    return result.peak / GIB, {k: round(v / GIB, 3) for k, v in result.components.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="qwen3-0.6b,qwen3-1.7b")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=4, help="rows per optimizer step")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per setting")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--memory-gib", type=float, help="cap the GPU (and auto's profile)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--shape", help=argparse.SUPPRESS)  # the child's
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.shape:
        child(args)
        return
    print(
        "| shape | training | AC | micro | predicted GiB | measured GiB | error | tokens/s | auto |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for shape in args.shapes.split(","):
        for mode in args.modes.split(","):
            command = [sys.executable, __file__, "--shape", shape, "--mode", mode,
                       "--seq", str(args.seq), "--rows", str(args.rows),
                       "--steps", str(args.steps), "--lora-rank", str(args.lora_rank)]  # fmt: skip
            command += ["--memory-gib", str(args.memory_gib)] if args.memory_gib else []
            done = subprocess.run(command, capture_output=True, text=True)
            rows = [json.loads(x[4:]) for x in done.stdout.splitlines() if x.startswith("ROW ")]
            if done.returncode:
                print(f"| {shape} | {mode} | error: {done.stderr.strip()[-300:]} |", flush=True)
            auto = auto_choice(shape, args.seq, args.rows, mode, args.lora_rank, args.memory_gib)
            ran = [r for r in rows if "tokens_per_s" in r]
            best = max((r["tokens_per_s"] for r in ran), default=0)
            for row in rows:
                row["memory_gib"] = args.memory_gib
                row["predicted_gib"], row["components_gib"] = predicted_gib(
                    shape, row, args.lora_rank
                )
                row["auto"] = (row["ac"], row["micro"]) == (auto["ac"], auto["micro"])
                row["best_tokens_per_s"] = best
                measured = row.get("peak_gib")
                error = (
                    f"{(row['predicted_gib'] - measured) / measured:+.1%}" if measured else "OOM"
                )
                speed = f"{row['tokens_per_s']:,.0f}" if measured else ""
                mark = (
                    f"auto ({row.get('tokens_per_s', 0) / best:.0%} of best)" if row["auto"] else ""
                )
                print(f"| {shape} | {mode} | {'on' if row['ac'] else 'off'} | {row['micro']} | "
                      f"{row['predicted_gib']:.2f} | {measured or float('nan'):.2f} | {error} | "
                      f"{speed} | {mark} |", flush=True)  # fmt: skip
                if args.out:
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
            if auto["offload"] or not any(r["auto"] for r in rows):
                print(f"| {shape} | {mode} | auto chose {auto}: not in the grid |", flush=True)


if __name__ == "__main__":
    main()
