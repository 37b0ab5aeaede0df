"""The planner's memory model against measured peaks: Loom's training step on one GPU for
each configuration (model shape x activation checkpointing x full / LoRA / QLoRA), its
``torch.cuda.max_memory_allocated`` next to ``loom.trainer.planner.memory.estimate``.

    python benchmarks/memory_model.py --shapes qwen3-0.6b,qwen3-1.7b --seq 4096 --out rows.jsonl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from shapes import SHAPES

from loom.trainer.config import LORA_TARGETS
from loom.trainer.planner.memory import GIB, Setup, estimate

HERE = Path(__file__).parent


def measure(shape: str, seq: int, ac: bool, lora: int, qlora: bool) -> dict:
    command = [sys.executable, str(HERE / "train_throughput.py"), "--shape", shape,
               "--seq", str(seq), "--systems", "loom", "--steps", "2", "--warmup", "1"]  # fmt: skip
    command += ["--ac"] if ac else []
    command += ["--lora-rank", str(lora)] if lora else []
    command += ["--qlora"] if qlora else []
    done = subprocess.run(command, capture_output=True, text=True)
    rows = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    return rows[-1] if rows else {"error": (done.stderr or done.stdout)[-400:]}


def main() -> None:
    from transformers import AutoConfig

    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="qwen3-0.6b,qwen3-1.7b")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    print("| shape | AC | training | predicted GiB | measured GiB | error |")
    print("| --- | --- | --- | --- | --- | --- |")
    for shape in args.shapes.split(","):
        config = AutoConfig.for_model(**SHAPES[shape])
        for ac in (False, True):
            for lora, qlora in ((0, False), (args.lora_rank, False), (args.lora_rank, True)):
                setup = Setup(seq=args.seq, activation_checkpointing=ac, lora_rank=lora,
                              lora_targets=tuple(LORA_TARGETS) if lora else (),
                              lora_quantize=qlora)  # fmt: skip
                predicted = estimate(config, setup)
                row = measure(shape, args.seq, ac, lora, qlora)
                row |= {"predicted_gib": predicted.peak / GIB,
                        "components_gib": {k: v / GIB for k, v in predicted.components.items()}}  # fmt: skip
                measured = row.get("peak_memory_gib")
                error = (
                    f"{(predicted.peak / GIB - measured) / measured:+.1%}"
                    if measured
                    else row.get("error", "")[-120:]
                )
                what = (f"QLoRA r{lora}" if qlora else f"LoRA r{lora}") if lora else "full"
                print(f"| {shape} | {'on' if ac else 'off'} | {what} | {predicted.peak / GIB:.1f} | "
                      f"{measured or float('nan'):.1f} | {error} |", flush=True)  # fmt: skip
                if args.out:
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
