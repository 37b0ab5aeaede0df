"""Micro-benchmarks of loom.kernels on one GPU: each op against its plain-torch reference.

    python benchmarks/kernels_bench.py [--only ce,rms,overhead] [--json out.json]

- ce: fused linear cross-entropy, forward + backward, at (4096 tokens, hidden 2048,
  vocab 151936, bf16) by default, against unfused ``F.cross_entropy(h @ W.T)`` and the
  fp32-logits reference: median time, peak memory the call adds, error against fp64.
- rms: RMSNorm forward and backward on [4096, 2048] and [65536, 128] (Qwen3's per-head
  q/k norm), Triton against the reference: median time and achieved bandwidth.
- overhead: host (CPU) time per call of each op on tiny CUDA tensors, so the GPU is
  never the bottleneck: 1000 calls, one synchronisation at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import math
import pstats
import statistics
import time
import traceback

import torch
import torch.nn.functional as F
import triton
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import loom.kernels as K

BF16 = torch.bfloat16
L2_DEFEAT_BYTES = 150e6  # H100 L2 is 50 MB


def _cuda_ms(fn, warmup: int = 2, iters: int = 10) -> float:
    """Median milliseconds of ``fn()`` between CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _peak_extra_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


# --- fused linear cross-entropy ---------------------------------------------------------


def bench_ce(tokens: int, hidden: int, vocab: int, chunks: list[str]) -> list[dict]:
    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, device="cuda").to(BF16).requires_grad_(True)
    w = (torch.randn(vocab, hidden, device="cuda") * hidden**-0.5).to(BF16).requires_grad_(True)
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
    rows = []
    for name, fn in variants.items():
        got = fwd_bwd(fn)
        errors = [_rel_err(g, e) for g, e in zip(got, exact, strict=True)]
        del got
        ms = _cuda_ms(lambda fn=fn: fwd_bwd(fn))
        peak = _peak_extra_mib(lambda fn=fn: fwd_bwd(fn))
        rows.append(
            {"op": "ce", "tokens": tokens, "variant": name, "ms": ms, "peak_extra_mib": peak,
             "rel_err_loss": errors[0], "rel_err_dh": errors[1], "rel_err_dw": errors[2]}
        )  # fmt: skip
        print(
            f"ce {tokens:5d} tok  {name:36s} {ms:8.2f} ms  peak +{peak:8.0f} MiB  "
            f"rel err loss {errors[0]:.1e} dh {errors[1]:.1e} dw {errors[2]:.1e}",
            flush=True,
        )
    return rows


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


# --- RMSNorm ------------------------------------------------------------------------------


def bench_rms(shapes: list[tuple[int, int]], configs: list[dict]) -> list[dict]:
    return [row for shape in shapes for row in _bench_rms_shape(*shape, configs)]


def _bench_rms_shape(n_rows: int, n_cols: int, configs: list[dict]) -> list[dict]:
    torch.manual_seed(0)
    w = (1 + 0.1 * torch.randn(n_cols, device="cuda")).to(BF16).requires_grad_(True)
    nbytes = n_rows * n_cols * 2
    copies = max(2, math.ceil(L2_DEFEAT_BYTES / (2 * nbytes)))  # inputs L2 cannot hold
    xs = [torch.randn(n_rows, n_cols, device="cuda").to(BF16).requires_grad_(True)]
    xs += [xs[0].detach().clone().requires_grad_(True) for _ in range(copies - 1)]
    dy = torch.randn(n_rows, n_cols, device="cuda").to(BF16)
    impls = [("reference", None)]
    impls += [(f"triton {json.dumps(c) if c else ''}".strip(), c) for c in configs]
    rows = []
    for name, config in impls:
        op = K.rms_norm_reference if config is None else K.rms_norm
        with _rms_config(config or {}):
            fwd, fwd_kernels = _kernel_us([lambda x=x, op=op: op(x, w) for x in xs])
            ys = [op(x, w) for x in xs]
            bwd, bwd_kernels = _kernel_us(
                [
                    lambda x=x, y=y: torch.autograd.grad(y, (x, w), dy, retain_graph=True)
                    for x, y in zip(xs, ys, strict=True)
                ]
            )
            del ys
        gbs = (2 * nbytes / fwd / 1e3, 3 * nbytes / bwd / 1e3)
        rows.append(
            {"op": "rms_norm", "shape": [n_rows, n_cols], "impl": name, "fwd_us": fwd,
             "bwd_us": bwd, "fwd_gbs": gbs[0], "bwd_gbs": gbs[1]}
        )  # fmt: skip
        print(
            f"rms [{n_rows:6d}, {n_cols:5d}] {name:44s} fwd {fwd:7.1f} us ({gbs[0]:5.0f} GB/s, "
            f"{fwd_kernels:.0f} kernels)  bwd {bwd:7.1f} us ({gbs[1]:5.0f} GB/s, "
            f"{bwd_kernels:.0f} kernels)",
            flush=True,
        )
    return rows


def _kernel_us(calls: list, repeat: int = 5) -> tuple[float, float]:
    """(GPU kernel time per call in us, kernels per call): the durations of the kernels
    ``calls`` launch, summed by torch.profiler, so host launch overhead (timed apart, in
    the overhead section) does not count; ``calls`` rotate over inputs L2 cannot hold."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeat):
            for call in calls:
                call()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    n = repeat * len(calls)
    if not kernels:  # older profilers keep device time on the CPU ops only
        total = sum(e.self_device_time_total for e in prof.key_averages())
        return total / n, float("nan")
    return sum(e.time_range.elapsed_us() for e in kernels) / n, len(kernels) / n


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


# --- host overhead ------------------------------------------------------------------------


def _op_calls():
    """name -> (forward call, backward-able forward call) on tiny CUDA tensors."""
    torch.manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, device="cuda").to(BF16).requires_grad_(True)

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
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def bench_overhead(calls: int, profile_path: str | None) -> list[dict]:
    rows = []
    for name, fn in _op_calls().items():

        def fwd_bwd(fn=fn):
            out = fn()
            outs = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

        fwd = statistics.median(_host_us(fn, calls) for _ in range(3))
        both = statistics.median(_host_us(fwd_bwd, calls // 2) for _ in range(3))
        rows.append({"op": name, "fwd_host_us": fwd, "fwd_bwd_host_us": both})
        print(f"overhead {name:28s} fwd {fwd:7.1f} us/call   fwd+bwd {both:7.1f} us/call")
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
        rows.append({"op": name, "host_us": us})
        print(f"overhead   piece {name:34s} {us:7.1f} us/call")
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
    return rows


def _as_list(configs) -> list[dict]:
    return configs if isinstance(configs, list) else [configs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="ce,rms,overhead")
    parser.add_argument(
        "--ce-shapes", default="4096,2048,151936", help="tokens,hidden,vocab[;tokens,...]"
    )
    parser.add_argument(
        "--ce-chunks",
        default="",
        help="extra splits to time: tokens per chunk[:vocabulary rows per block], e.g. 512,1024:4096",
    )
    parser.add_argument("--rms-shapes", default="4096x2048,65536x128")
    parser.add_argument(
        "--rms-configs", default="{}", help="JSON list of _rms_norm_triton constant overrides"
    )
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--profile", default=None, help="write a cProfile of rms_norm here")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"loom.kernels from {K.__file__}")
    only = args.only.split(",")
    sections = {
        "overhead": lambda: bench_overhead(args.calls, args.profile),
        "rms": lambda: bench_rms(
            [tuple(int(n) for n in s.split("x")) for s in args.rms_shapes.split(",")],
            _as_list(json.loads(args.rms_configs)),
        ),
        "ce": lambda: [
            row
            for shape in args.ce_shapes.split(";")
            for row in bench_ce(
                *(int(n) for n in shape.split(",")),
                [c for c in args.ce_chunks.split(",") if c],
            )
        ],
    }
    rows = []
    for name in only:
        try:
            rows += sections[name]()
        except Exception:  # one failing section must not lose the others' numbers
            traceback.print_exc()
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
