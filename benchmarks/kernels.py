"""Each Loom kernel against its plain-torch reference and Liger-Kernel's counterpart.

    python benchmarks/kernels.py [--tokens 16384] [--out kernels.jsonl]

Forward + backward of one call at LLM sizes, bf16: median milliseconds over CUDA
events (after warm-up) and the peak memory the call adds. Liger has no fused MoE, so
MoE compares Loom with HF's per-expert loop (the reference), and Loom's two grouped-GEMM
backends with each other: torch._grouped_mm (what auto picks on CUDA bf16) and the
Triton kernel, in the whole MoE and in the experts' two GEMMs alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

import loom.kernels as K

BF16 = torch.bfloat16


def measure(fn, iters: int = 10) -> tuple[float, float]:
    """(median ms, peak MiB added) of ``fn()``, which runs forward and backward."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20


def leaf(*shape, scale=1.0, dtype=BF16):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype).requires_grad_()


def backward_of(make_out):
    def run():
        out = make_out()
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward() if out.dim() else out.backward()

    return run


def cases(tokens: int):
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.rope import LigerRopeFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    for hidden in (2048, 4096):
        h, w = leaf(tokens, hidden), leaf(151936, hidden, scale=hidden**-0.5)
        y = torch.randint(0, 151936, (tokens,), device="cuda")
        name = f"linear_cross_entropy t{tokens} h{hidden} v151936"
        yield (
            name,
            "reference",
            lambda h=h, w=w, y=y: F.cross_entropy((h @ w.T).float(), y, reduction="sum"),
        )
        yield (
            name,
            "liger",
            lambda h=h, w=w, y=y: LigerFusedLinearCrossEntropyFunction.apply(
                h, w, y, None, None, -100, 0.0, 0.0, "sum"
            ),
        )
        yield name, "loom", lambda h=h, w=w, y=y: K.fused_linear_cross_entropy(h, w, y)
        x, g = leaf(tokens, hidden), leaf(hidden)
        name = f"rms_norm [{tokens}, {hidden}]"
        yield name, "reference", lambda x=x, g=g: K.rms_norm(x, g, backend="torch")
        yield name, "liger", lambda x=x, g=g: LigerRMSNormFunction.apply(x, g, 1e-6)
        yield name, "loom", lambda x=x, g=g: K.rms_norm(x, g)
    a, b = leaf(tokens, 8192), leaf(tokens, 8192)
    name = f"swiglu [{tokens}, 8192]"
    # In an MLP gate and up are projection outputs, whose memory both Liger's and Loom's
    # backward reuse; every system gets the same fresh copies (Loom leaves leaves alone).
    yield name, "reference", lambda: K.swiglu(a * 1, b * 1, backend="torch")
    yield name, "liger", lambda: LigerSiLUMulFunction.apply(a * 1, b * 1)
    yield name, "loom", lambda: K.swiglu(a * 1, b * 1)
    q, k = leaf(1, 32, tokens, 128), leaf(1, 8, tokens, 128)
    angle = torch.randn(1, tokens, 128, device="cuda")
    cos, sin = angle.cos().to(BF16), angle.sin().to(BF16)
    name = f"rotary q[1,32,{tokens},128] k[1,8,{tokens},128]"
    yield (
        name,
        "reference",
        lambda: torch.cat([t.flatten() for t in K.apply_rotary(q, k, cos, sin, backend="torch")]),
    )
    yield (
        name,
        "liger",
        lambda: torch.cat([t.flatten() for t in LigerRopeFunction.apply(q, k, cos, sin)]),
    )
    yield name, "loom", lambda: torch.cat([t.flatten() for t in K.apply_rotary(q, k, cos, sin)])
    x = leaf(tokens, 2048)
    weights, experts = torch.rand(tokens, 64, device="cuda").topk(8, dim=-1)
    weights = weights.softmax(-1).requires_grad_()
    gate_up, down = leaf(64, 1536, 2048, scale=2048**-0.5), leaf(64, 2048, 768, scale=768**-0.5)
    name = f"moe t{tokens} h2048 64 experts top-8 inter 768"
    args = (x, weights, experts, gate_up, down)
    yield name, "reference", lambda: K.fused_moe_reference(*args)
    yield name, "loom", lambda: K.fused_moe_forward(*args)
    yield name, "loom triton grouped_mm", lambda: K.fused_moe_forward(*args, backend="triton")
    # The experts' GEMMs alone over the same routing: [tokens * 8, 2048] rows by expert.
    expert_ids = torch.arange(64, device="cuda")
    ends = torch.searchsorted(experts.reshape(-1).sort().values, expert_ids, right=True)
    ends = ends.to(torch.int32)
    rows = leaf(tokens * 8, 2048)
    name = f"grouped_mm gate_up + swiglu + down [{tokens * 8}, 2048] 64 experts inter 768"
    for backend in ("grouped_mm", "triton"):
        yield (
            name,
            backend,
            lambda b=backend: K.grouped_mm(
                K.swiglu(*K.grouped_mm(rows, gate_up, ends, backend=b).chunk(2, dim=-1)),
                down,
                ends,
                backend=b,
            ),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    for name, system, fn in cases(args.tokens):
        try:
            ms, mib = measure(backward_of(fn))
            row = {"op": name, "system": system, "ms": round(ms, 3), "peak_mib": round(mib, 1)}
        except Exception as err:  # one failing peer must not hide the others' numbers
            row = {"op": name, "system": system, "error": f"{type(err).__name__}: {err}"[:300]}
        print(json.dumps(row), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
