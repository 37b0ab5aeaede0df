"""Loom's kernels on one GPU: against their plain-torch references and Liger-Kernel.

    python benchmarks/kernels.py [--only peers,ce,rms,overhead] [--out rows.jsonl] [--json rows.json]
    python benchmarks/kernels.py --only peers [--tokens 16384]
    python benchmarks/kernels.py --only ce --ce-shapes "16384,2048,151936;4096,2048,151936" \\
        --ce-chunks "192:2048,4096"
    python benchmarks/kernels.py --only rms,overhead --rms-shapes 4096x2048,65536x128,4096x8192

Kernel families, picked with ``--only`` (comma-separated, run in that order; all four by
default). One failing case (peers) or family (the others) does not lose the rest.

- peers: forward + backward of one call at LLM sizes (``--tokens``), bf16, each op as the
  plain-torch reference, Liger-Kernel's counterpart and Loom: median ms over CUDA events
  (after warm-up) and the peak memory the call adds; rows ``op, system, ms, peak_mib``,
  printed as JSON. Liger has no fused MoE, so MoE compares Loom with HF's per-expert loop
  (the reference), and Loom's two grouped-GEMM backends with each other:
  torch._grouped_mm (what auto picks on CUDA bf16) and the Triton kernel, in the whole
  MoE and in the experts' two GEMMs alone.
- ce: fused linear cross-entropy, forward + backward, at (4096 tokens, hidden 2048,
  vocab 151936, bf16) by default, against unfused ``F.cross_entropy(h @ W.T)`` and the
  fp32-logits reference: median time, peak memory the call adds, error against fp64;
  ``--ce-chunks`` adds splits to time.
- rms: RMSNorm forward and backward on [4096, 2048] and [65536, 128] (Qwen3's per-head
  q/k norm), Triton against the reference: GPU kernel time (torch.profiler, inputs
  rotated past L2) and achieved bandwidth.
- overhead: host (CPU) time per call of each op on tiny CUDA tensors, so the GPU is
  never the bottleneck: 1000 calls, one synchronisation at the end.

``--out`` appends every row to a JSON-lines file; ``--json`` writes them as one JSON list.
The timing helpers are benchmarks/_timing.py's, which the other benchmarks share. (This
script merged the former kernels.py, now ``--only peers``, and kernels_bench.py, now
``--only ce,rms,overhead``.)
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import math
import pstats
import statistics
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

import loom.kernels as K

sys.path.insert(0, str(Path(__file__).parent))
from _timing import cuda_ms, cuda_ms_and_peak, kernel_us, peak_mib_added, wall_s

BF16 = torch.bfloat16
L2_DEFEAT_BYTES = 150e6  # H100 L2 is 50 MB
FAMILIES = ("peers", "ce", "rms", "overhead")


def leaf(*shape, scale=1.0, dtype=BF16):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype).requires_grad_()


# --- peers: the reference, Liger-Kernel and Loom at LLM sizes ------------------------------


def backward_of(make_out):
    def run():
        out = make_out()
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward() if out.dim() else out.backward()

    return run


def peer_cases(tokens: int):
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


def bench_peers(tokens: int) -> Iterator[dict]:
    for name, system, fn in peer_cases(tokens):
        try:
            ms, mib = cuda_ms_and_peak(backward_of(fn))
            row = {"op": name, "system": system, "ms": round(ms, 3), "peak_mib": round(mib, 1)}
        except Exception as err:  # one failing peer must not hide the others' numbers
            row = {"op": name, "system": system, "error": f"{type(err).__name__}: {err}"[:300]}
        print(json.dumps(row), flush=True)
        yield row
        torch.cuda.empty_cache()


# --- ce: fused linear cross-entropy, its splits and its error against fp64 -----------------


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def bench_ce(tokens: int, hidden: int, vocab: int, chunks: list[str]) -> Iterator[dict]:
    torch.manual_seed(0)
    h = leaf(tokens, hidden)
    w = leaf(vocab, hidden, scale=hidden**-0.5)
    labels = torch.randint(0, vocab, (tokens,), device="cuda")

    def unfused():
        return F.cross_entropy(h @ w.T, labels, reduction="sum")

    def reference():
        return K.linear_cross_entropy_reference(h, w, labels)

    variants = {"unfused F.cross_entropy(h @ W.T)": unfused, "reference (fp32 logits)": reference}
    variants["fused (default chunk)"] = lambda: K.fused_linear_cross_entropy(h, w, labels)
    for split in chunks:  # "CHUNK" or "CHUNK:VOCAB_BLOCK"
        chunk, _, block = split.partition(":")
        sizes = {"chunk_size": int(chunk), "vocab_block": int(block) if block else None}
        variants[f"fused chunk={split}"] = lambda sizes=sizes: K.fused_linear_cross_entropy(
            h, w, labels, **sizes
        )

    def fwd_bwd(fn):
        loss = fn()
        return (loss, *torch.autograd.grad(loss, (h, w)))

    # fp64 truth for the loss and gradients, a slice of tokens at a time.
    exact = _ce_fp64(h, w, labels)
    for name, fn in variants.items():
        got = fwd_bwd(fn)
        errors = [_rel_err(g, e) for g, e in zip(got, exact, strict=True)]
        del got
        ms = cuda_ms(lambda fn=fn: fwd_bwd(fn))
        peak = peak_mib_added(lambda fn=fn: fwd_bwd(fn))
        row = (
            {"op": "ce", "tokens": tokens, "variant": name, "ms": ms, "peak_extra_mib": peak,
             "rel_err_loss": errors[0], "rel_err_dh": errors[1], "rel_err_dw": errors[2]}
        )  # fmt: skip
        print(
            f"ce {tokens:5d} tok  {name:36s} {ms:8.2f} ms  peak +{peak:8.0f} MiB  "
            f"rel err loss {errors[0]:.1e} dh {errors[1]:.1e} dw {errors[2]:.1e}",
            flush=True,
        )
        yield row


def _ce_fp64(h, w, labels, block: int = 512):
    w64 = w.detach().double()
    loss, dh, dw = torch.zeros((), dtype=torch.float64, device="cuda"), [], torch.zeros_like(w64)
    for start in range(0, h.shape[0], block):
        hb = h.detach()[start : start + block].double()
        logits = hb @ w64.T
        loss += F.cross_entropy(logits, labels[start : start + block], reduction="sum")
        grad = torch.softmax(logits, -1)
        grad[torch.arange(grad.shape[0]), labels[start : start + block]] -= 1
        dh.append(grad @ w64)
        dw += grad.T @ hb
    return loss, torch.cat(dh), dw


# --- rms: RMSNorm kernel time and bandwidth -----------------------------------------------


def bench_rms(shapes: list[tuple[int, int]], configs: list[dict]) -> Iterator[dict]:
    for shape in shapes:
        yield from _bench_rms_shape(*shape, configs)


def _bench_rms_shape(n_rows: int, n_cols: int, configs: list[dict]) -> Iterator[dict]:
    torch.manual_seed(0)
    w = (1 + 0.1 * torch.randn(n_cols, device="cuda")).to(BF16).requires_grad_(True)
    nbytes = n_rows * n_cols * 2
    copies = max(2, math.ceil(L2_DEFEAT_BYTES / (2 * nbytes)))  # inputs L2 cannot hold
    xs = [leaf(n_rows, n_cols)]
    xs += [xs[0].detach().clone().requires_grad_(True) for _ in range(copies - 1)]
    dy = torch.randn(n_rows, n_cols, device="cuda").to(BF16)
    impls = [("reference", None)]
    impls += [(f"triton {json.dumps(c) if c else ''}".strip(), c) for c in configs]
    for name, config in impls:
        op = K.rms_norm_reference if config is None else K.rms_norm
        with _rms_config(config or {}):
            # Kernel time only: host launch overhead is the overhead family's to time.
            fwd, fwd_kernels = kernel_us([lambda x=x, op=op: op(x, w) for x in xs])
            ys = [op(x, w) for x in xs]
            bwd, bwd_kernels = kernel_us(
                [
                    lambda x=x, y=y: torch.autograd.grad(y, (x, w), dy, retain_graph=True)
                    for x, y in zip(xs, ys, strict=True)
                ]
            )
            del ys
        gbs = (2 * nbytes / fwd / 1e3, 3 * nbytes / bwd / 1e3)
        row = (
            {"op": "rms_norm", "shape": [n_rows, n_cols], "impl": name, "fwd_us": fwd,
             "bwd_us": bwd, "fwd_gbs": gbs[0], "bwd_gbs": gbs[1]}
        )  # fmt: skip
        print(
            f"rms [{n_rows:6d}, {n_cols:5d}] {name:44s} fwd {fwd:7.1f} us ({gbs[0]:5.0f} GB/s, "
            f"{fwd_kernels:.0f} kernels)  bwd {bwd:7.1f} us ({gbs[1]:5.0f} GB/s, "
            f"{bwd_kernels:.0f} kernels)",
            flush=True,
        )
        yield row


@contextlib.contextmanager
def _rms_config(config: dict):
    """Temporarily set _rms_norm_triton's tile constants ({} keeps the defaults)."""
    from loom.kernels import _rms_norm_triton as module

    saved = {key: getattr(module, key) for key in config}
    for key, value in config.items():
        setattr(module, key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(module, key, value)


# --- overhead: host time per call ---------------------------------------------------------


def _op_calls():
    """name -> (forward call, backward-able forward call) on tiny CUDA tensors."""
    torch.manual_seed(0)
    x, w = leaf(4, 128), leaf(128)
    gate, up = leaf(4, 256), leaf(4, 256)
    q, k = leaf(1, 4, 16, 128).transpose(1, 2), leaf(1, 4, 8, 128).transpose(1, 2)
    cos, sin = torch.randn(1, 4, 128, device="cuda"), torch.randn(1, 4, 128, device="cuda")
    h, lm = leaf(8, 64), leaf(256, 64)
    labels = torch.randint(0, 256, (8,), device="cuda")
    return {
        "rms_norm": lambda: K.rms_norm(x, w),
        "swiglu": lambda: K.swiglu(gate, up),
        "apply_rotary": lambda: K.apply_rotary(q, k, cos, sin),
        "fused_linear_cross_entropy": lambda: K.fused_linear_cross_entropy(h, lm, labels),
    }


def _host_us(fn, calls: int) -> float:
    return wall_s(fn, calls, warmup=20) * 1e6


def bench_overhead(calls: int, profile_path: str | None) -> Iterator[dict]:
    for name, fn in _op_calls().items():

        def fwd_bwd(fn=fn):
            out = fn()
            outs = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

        fwd = statistics.median(_host_us(fn, calls) for _ in range(3))
        both = statistics.median(_host_us(fwd_bwd, calls // 2) for _ in range(3))
        print(f"overhead {name:28s} fwd {fwd:7.1f} us/call   fwd+bwd {both:7.1f} us/call")
        yield {"op": name, "fwd_host_us": fwd, "fwd_bwd_host_us": both}
    # Pieces of the RMSNorm call, for where the time goes.
    from loom.kernels import _rms_norm_triton as kernels
    from loom.kernels import dispatch

    x, w = torch.randn(4, 128, device="cuda", dtype=BF16), torch.ones(128, device="cuda")
    pieces = {
        "rms_norm_forward launcher alone": lambda: kernels.rms_norm_forward(x, w, 1e-6, 0.0),
        "choose_backend": lambda: dispatch.choose_backend(x, w),
        "torch.empty_like": lambda: torch.empty_like(x),
    }
    for name, fn in pieces.items():
        us = statistics.median(_host_us(fn, calls) for _ in range(3))
        print(f"overhead   piece {name:34s} {us:7.1f} us/call")
        yield {"op": name, "host_us": us}
    if profile_path:
        fn = _op_calls()["rms_norm"]
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            out = fn()
            out.backward(torch.ones_like(out))
        torch.cuda.synchronize()
        profiler.disable()
        with open(profile_path, "w") as f:
            pstats.Stats(profiler, stream=f).sort_stats("tottime").print_stats(40)


def _as_list(configs) -> list[dict]:
    return configs if isinstance(configs, list) else [configs]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="families: peers (the reference, Liger-Kernel and Loom at LLM sizes), ce "
        "(fused CE splits, error against fp64), rms (RMSNorm kernel time), overhead "
        "(host time per call)",
    )
    parser.add_argument(
        "--only", default=",".join(FAMILIES), help="kernel families to run, comma-separated"
    )
    parser.add_argument("--tokens", type=int, default=16384, help="peers: tokens per call")
    parser.add_argument(
        "--ce-shapes", default="4096,2048,151936", help="ce: tokens,hidden,vocab[;tokens,...]"
    )
    parser.add_argument(
        "--ce-chunks",
        default="",
        help="ce: extra splits to time: tokens per chunk[:vocabulary rows per block], e.g. 512,1024:4096",
    )
    parser.add_argument("--rms-shapes", default="4096x2048,65536x128", help="rms: ROWSxCOLS,...")
    parser.add_argument(
        "--rms-configs", default="{}", help="rms: JSON list of _rms_norm_triton constant overrides"
    )
    parser.add_argument("--calls", type=int, default=1000, help="overhead: calls per timing")
    parser.add_argument(
        "--profile", default=None, help="overhead: write a cProfile of rms_norm here"
    )
    parser.add_argument("--out", type=Path, help="append every row to this JSON-lines file")
    parser.add_argument("--json", default=None, help="write every row here as one JSON list")
    args = parser.parse_args()
    only = [name for name in args.only.split(",") if name]
    unknown = sorted(set(only) - set(FAMILIES))
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)} (families: {', '.join(FAMILIES)})")
    import triton

    print(
        f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}"
        f"\nloom.kernels from {K.__file__}",
        file=sys.stderr,
        flush=True,
    )
    families = {
        "peers": lambda: bench_peers(args.tokens),
        "overhead": lambda: bench_overhead(args.calls, args.profile),
        "rms": lambda: bench_rms(
            [tuple(int(n) for n in s.split("x")) for s in args.rms_shapes.split(",")],
            _as_list(json.loads(args.rms_configs)),
        ),
        "ce": lambda: (
            row
            for shape in args.ce_shapes.split(";")
            for row in bench_ce(
                *(int(n) for n in shape.split(",")),
                [c for c in args.ce_chunks.split(",") if c],
            )
        ),
    }
    rows = []
    for name in only:
        try:
            for row in families[name]():
                rows.append(row)
                if args.out:  # as it comes: a run cut short keeps the rows it measured
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
        except Exception:  # one failing family must not lose the others' numbers
            traceback.print_exc()
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
