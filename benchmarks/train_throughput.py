"""Training throughput of Loom and the tools people use instead, side by side.

    python benchmarks/train_throughput.py --shape qwen3-1.7b --seq 4096 \
        --systems hf,liger,loom --out results.jsonl

Each system runs in its own process (clean CUDA memory statistics) on the same shape,
sequence length and random tokens: ``--accum`` micro-batches of ``--micro`` rows of
``--seq`` tokens per optimizer step (gradients accumulated over the micro-batches),
AdamW, bf16. The same tokens per step can be split differently (``--accum 4`` or
``--micro 4``); each system is free to take the split that runs fastest within the memory
cap, as its users would.
tokens/s is the median over the steps after ``--warmup``; MFU uses the causal count
of ``loom.trainer.flops`` (6*N + 6*L*H*d*T per token); peak memory is
``torch.cuda.max_memory_allocated``.

- hf: plain transformers + PyTorch: fp32 weights, bf16 autocast, SDPA, fused AdamW
  (MoE: transformers' default experts implementation).
- hf-eager: the same with transformers' per-expert loop (``experts_implementation="eager"``).
- liger: the same with Liger-Kernel's patches for the model family applied first.
- torchtitan: torchtitan's own Qwen3, ``parallelize_qwen3`` (FSDP2 bf16 params / fp32
  reduce, per-block compile with ``--compile``, full AC with ``--ac``), its cross-entropy
  and fused AdamW (``peers/torchtitan_step.py`` says which code path and why); its causal
  SDPA attention module (its FlexAttention default autotunes for minutes per shape).
- ``--lora-rank R``: hf is HF + peft (the base in bf16, fp32 adapters, autocast); loom is
  the trainer's LoRA (the frozen base in bf16; ``--qlora``: in NF4).
- loom: Loom's port of the model (fused kernels, fused linear cross-entropy,
  loom_sdpa attention) through the trainer's code path (FSDP2 bf16 params / fp32
  reduce, its loss normalisation, its optimizer), at world size 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import peak_gib, wall_s
from shapes import SHAPES


def random_model(shape: str, device: torch.device, loom: bool, experts: str | None = None):
    """Upstream's class for the peers (``experts``: HF v5's MoE experts implementation,
    None for its default); Loom's port (loom_sdpa attention) for Loom."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**SHAPES[shape])
    with device:
        if loom:
            from loom.models import build_model

            return build_model(config, attn_implementation="loom_sdpa", dtype=torch.float32)
        extra = {"experts_implementation": experts} if experts else {}
        return AutoModelForCausalLM.from_config(
            config, attn_implementation="sdpa", dtype=torch.float32, **extra
        )


def hf_peft(model, rank: int, qlora: bool = False):
    """HF + peft as its users run LoRA: the base loaded in bf16 and frozen, adapters on the
    attention and MLP projections (fp32, peft's default), bf16 autocast."""
    from peft import LoraConfig, get_peft_model

    if qlora:
        raise SystemExit("hf: no QLoRA peer here (bitsandbytes is not in the GPU image)")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model.to(torch.bfloat16)
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))


def loom_lora(model, rank: int, qlora: bool = False):
    """The trainer's LoRA: adapters (fp32), the frozen base in bf16 or, QLoRA, NF4."""
    from loom.trainer.config import LoraConfig
    from loom.trainer.lora import apply_lora, quantize_base, store_frozen

    apply_lora(model, LoraConfig(rank=rank, alpha=2 * rank))
    store_frozen(model, torch.bfloat16)
    if qlora:
        quantize_base(model)
    return model


def hf_step_fn(model, tokens, accum: int):
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=True)

    def step(tokens=tokens):
        for _ in range(accum):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=tokens, labels=tokens).loss / accum
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def loom_step_fn(
    model,
    tokens,
    activation_checkpointing: bool,
    accum: int = 1,
    compile: bool = False,
    offload: bool = False,
    mlp_tile: int = 0,
    progress: Path | None = None,
):
    import numpy as np

    from loom.dist.mesh import init_parallel
    from loom.trainer.config import OptimConfig
    from loom.trainer.data.packing import build_row
    from loom.trainer.data.samples import shift_labels
    from loom.trainer.memory import offload_checkpointed_inputs, tile_mlps
    from loom.trainer.optim import build_optimizer
    from loom.trainer.parallelize import (
        compile_decoder_layers,
        enable_activation_checkpointing,
        shard_model,
    )
    from loom.trainer.train import forward_backward

    parallel = init_parallel()
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    if offload:
        offload_checkpointed_inputs(model)
    if mlp_tile:
        tile_mlps(model, mlp_tile)
    if compile:
        compile_decoder_layers(model)
    shard_model(model, parallel)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-5), device=parallel.device)

    def rows_of(tokens):
        rows = []
        for ids in tokens.cpu().numpy():
            labels = np.asarray(shift_labels(list(ids), [True] * len(ids)))
            rows.append(build_row([(ids, labels)], len(ids), 0))
        return rows

    cached = {tokens.shape[-1]: rows_of(tokens)}

    def step(tokens=tokens):
        rows = cached.get(tokens.shape[-1]) or rows_of(tokens)
        loss_tokens = sum(r.loss_tokens for r in rows) * accum
        loss = forward_backward(model, [rows] * accum, loss_tokens, parallel)
        if progress:
            note(progress, f"seq {tokens.shape[-1]}: forward and backward done")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def note(path: Path, what: str) -> None:
    """One line of progress (a long step can outlast the caller's time limit)."""
    torch.cuda.synchronize()
    with path.open("a") as f:
        f.write(f"{time.strftime('%H:%M:%S')} {what}; peak {peak_gib():.2f} GiB\n")


def run_one(args) -> dict:
    from loom.trainer.flops import flop_model

    device = torch.device("cuda")
    if args.memory_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib * 2**30 / total))
    torch.manual_seed(0)
    if args.system == "torchtitan":
        step, fm = torchtitan_step(args)
        return run_steps(args, step, fm, random_tokens(args, device))
    experts = "eager" if args.system == "hf-eager" else None
    model = random_model(args.shape, device, loom=args.system == "loom", experts=experts)
    fm = flop_model(model)
    if args.lora_rank:
        lora = loom_lora if args.system == "loom" else hf_peft
        model = lora(model, args.lora_rank, args.qlora)
    tokens = random_tokens(args, device)
    if args.system == "liger":
        import liger_kernel.transformers as liger

        getattr(liger, f"apply_liger_kernel_to_{model.config.model_type}")(model=model)
    if args.system != "loom" and args.ac:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.system == "loom":
        step = loom_step_fn(
            model, tokens, args.ac, args.accum, args.compile, args.offload, args.mlp_tile,
            args.progress,
        )  # fmt: skip
    else:
        step = hf_step_fn(model, tokens, args.accum)
    return run_steps(args, step, fm, tokens)


def random_tokens(args, device: torch.device) -> torch.Tensor:
    vocab = SHAPES[args.shape]["vocab_size"]
    return torch.randint(0, vocab, (args.micro, args.seq), device=device)


def torchtitan_step(args):
    """torchtitan's step, and the flop model of the same shape (read off HF's class)."""
    from peers.torchtitan_step import torchtitan_step_fn
    from transformers import AutoConfig, AutoModelForCausalLM

    from loom.trainer.flops import flop_model

    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**SHAPES[args.shape]))
    step = torchtitan_step_fn(
        SHAPES[args.shape], args.seq, args.micro, args.accum, args.compile, args.ac
    )
    return step, flop_model(hf)


def run_steps(args, step, fm, tokens) -> dict:
    from loom.trainer.flops import peak_flops

    device = tokens.device
    # Warm-up at a short length still allocates the optimizer state: the timed steps
    # then meet the memory of a later step at a fraction of a long warm-up's cost.
    short = tokens[:, : args.warmup_seq] if args.warmup_seq else tokens
    times = []
    for i in range(args.warmup + args.steps):
        seconds = wall_s(lambda i=i: step(short if i < args.warmup else tokens))
        if i >= args.warmup:
            times.append(seconds)
        if args.progress:
            note(args.progress, f"step {i} done in {seconds:.1f} s")
    seconds = statistics.median(times)
    rows = args.micro * args.accum
    flops = fm.step_flops(args.seq, args.seq**2) * rows
    return {
        "system": args.system,
        "shape": args.shape,
        "seq": args.seq,
        "accum": args.accum,
        "micro": args.micro,
        "activation_checkpointing": args.ac,
        "compile": args.compile,
        **({"lora_rank": args.lora_rank} if args.lora_rank else {}),
        **({"qlora": True} if args.qlora else {}),
        **({"offload": True} if args.offload else {}),
        **({"mlp_tile": args.mlp_tile} if args.mlp_tile else {}),
        **({"warmup_seq": args.warmup_seq} if args.warmup_seq else {}),
        "tokens_per_s": args.seq * rows / seconds,
        "mfu": flops / seconds / peak_flops(device, None),
        "peak_memory_gib": peak_gib(),
        "device_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30,
        "step_s": seconds,
        **(compile_stats() if args.compile else {}),
    }


def compile_stats() -> dict:
    from torch._dynamo.utils import counters

    return {
        "compiled_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="qwen3-1.7b", choices=sorted(SHAPES))
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--systems", default="hf,liger,loom")
    parser.add_argument("--system", help=argparse.SUPPRESS)  # set for the child processes
    parser.add_argument("--ac", action="store_true", help="activation checkpointing")
    parser.add_argument("--compile", action="store_true", help="loom: torch.compile the layers")
    parser.add_argument(
        "--offload", action="store_true", help="loom: checkpointed inputs in host memory"
    )
    parser.add_argument("--mlp-tile", type=int, default=0, help="loom: tokens per MLP tile")
    parser.add_argument(
        "--warmup-seq", type=int, default=0, help="warm-up steps at this length (0: --seq)"
    )
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA (hf: + peft) of this rank")
    parser.add_argument("--qlora", action="store_true", help="loom: the LoRA base in NF4")
    parser.add_argument("--micro", type=int, default=1, help="rows of --seq tokens per forward")
    parser.add_argument(
        "--memory-gib", type=float, help="cap this process's GPU memory (a smaller GPU's size)"
    )
    parser.add_argument("--progress", type=Path, help="append each phase's time to this file")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.system:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    rows = []
    for system in args.systems.split(","):
        command = [sys.executable, __file__, "--system", system, *sys.argv[1:]]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not lines:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            row = {
                "system": system,
                "shape": args.shape,
                "seq": args.seq,
                "error": " | ".join(tail),
            }
        else:
            row = json.loads(lines[0][len("RESULT ") :])
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with args.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
