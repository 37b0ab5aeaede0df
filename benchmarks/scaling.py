"""How Loom's training step scales over the GPUs of one machine, through the `loom` CLI.

    # tokens/s per GPU, scaling efficiency against one GPU, peak memory
    python benchmarks/scaling.py throughput --shape qwen3-1.7b --seq 8192 \\
        --layouts 1 4 8 8:sp_size=2 --out scaling.jsonl
    python benchmarks/scaling.py throughput --shape qwen3-moe-12l --seq 4096 \\
        --layouts 1 8 8:ep_size=2 8:ep_size=4 8:ep_size=8
    # the longest sequence under sequence parallelism
    python benchmarks/scaling.py maxlen --shape qwen3-1.7b --layouts 1 4:sp_size=4 8:sp_size=8
    # loss curves of every layout from the same seed and global batch, one PNG
    python benchmarks/scaling.py agreement --shape qwen3-1.7b --seq 8192 --steps 20 \\
        --layouts 8 8:sp_size=2 --plot scaling-loss.png

A layout is ``PROCESSES[:key=value,...]`` with keys of the config's ``parallel`` section
(``8:sp_size=2`` is fsdp 4 x sp 2 on eight GPUs). Each run is ``loom train`` on a model
directory written from the shape (random init, no hub) with the tiny example's tokenizer,
over a generated corpus; numbers come from its metrics.jsonl. Throughput is weak
scaling: ``--rows`` rows of ``--seq`` tokens per data-parallel rank per step, so the
work per GPU stays fixed; tokens/s is the median step after ``--warmup``. The agreement
run keeps one global batch for every layout. ``--shape toy`` (the two-layer tiny example)
runs anywhere, CPU processes with gloo included.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from max_seq_len import search
from shapes import SHAPES

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples/tiny/model"
TOY_MOE = ROOT / "tests/toy_config/qwen3_moe_toy/config.json"  # 8 experts, top 3


def parse_layout(text: str) -> tuple[int, dict[str, int]]:
    procs, _, rest = text.partition(":")
    keys = dict(kv.split("=") for kv in rest.split(",") if kv)
    return int(procs), {k: int(v) for k, v in keys.items()}


def dp_size(procs: int, keys: dict[str, int]) -> int:
    return procs // keys.get("sp_size", 1)


def model_dir(shape: str, out: Path) -> Path:
    """The shape's config with the tiny example's tokenizer (ids below 384 fit any vocab)."""
    model = out / "model"
    shutil.copytree(TINY, model, dirs_exist_ok=True)
    if shape == "toy-moe":
        config = json.loads(TOY_MOE.read_text())
        config["vocab_size"] = json.loads((TINY / "config.json").read_text())["vocab_size"]
        (model / "config.json").write_text(json.dumps(config))
    elif shape != "toy":
        config = {**SHAPES[shape], "torch_dtype": "float32", "bos_token_id": 0, "eos_token_id": 0}
        (model / "config.json").write_text(json.dumps(config))
    return model


def corpus(path: Path, tokens: int, seed: int = 0) -> Path:
    """Lines of random words, about ``tokens`` tokens in all (the tiny tokenizer gives
    about one token per three characters)."""
    rng = random.Random(seed)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(500)]  # fmt: skip
    with path.open("w") as f:
        written = 0
        while written < tokens * 3:
            line = " ".join(rng.choices(words, k=rng.randint(50, 400)))
            f.write(json.dumps({"text": line}) + "\n")
            written += len(line)
    return path


def train(
    work: Path, model: Path, data: Path, layout: str, seq: int, rows: int, steps: int, extra=()
) -> tuple[int, list[dict]]:
    """``loom train`` under ``layout``: (exit status, metrics records)."""
    procs, keys = parse_layout(layout)
    out = work / f"run-{layout.replace(':', '-').replace(',', '-').replace('=', '')}"
    shutil.rmtree(out, ignore_errors=True)
    config = {
        "model": {"path": str(model)},
        "data": {"path": str(data), "max_seq_len": seq},
        "train": {
            "output_dir": str(out), "steps": steps, "global_batch_size": rows,
            "micro_batch_size": 1, "seed": 0,
        },
        "optim": {"lr": 1e-4, "warmup_steps": 0, "schedule": "constant"},
        "parallel": keys,
        "checkpoint": {"every": 0, "keep_last": 1},
        "log": {"progress": False},
    }  # fmt: skip
    path = work / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "loom.trainer.cli", "train", str(path), "--nproc", str(procs)]
    done = subprocess.run([*command, *extra], cwd=ROOT, capture_output=True, text=True)
    metrics = out / "metrics.jsonl"
    records = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    if done.returncode:
        print(f"{layout}: exit {done.returncode}: {done.stderr.strip()[-1500:]}", file=sys.stderr)
    return done.returncode, [r for r in records if "loss" in r]


def throughput(args, work: Path, model: Path) -> list[dict]:
    rows_out = []
    for layout in args.layouts:
        procs, keys = parse_layout(layout)
        rows = args.rows * dp_size(procs, keys)
        data = corpus(work / "corpus.jsonl", rows * args.seq * (args.steps + 2))
        status, records = train(work, model, data, layout, args.seq, rows, args.steps, args.extra)
        timed = records[args.warmup :]
        row = {"layout": layout, "processes": procs, "shape": args.shape, "seq": args.seq}
        if status or not timed:
            rows_out.append({**row, "error": f"exit {status}"})
            continue
        total = statistics.median(r["tokens_per_s"] for r in timed)
        row |= {
            "tokens_per_s": total,
            "tokens_per_s_per_gpu": total / procs,
            "mfu": statistics.median(r["mfu"] for r in timed) if timed[0].get("mfu") else None,
            "peak_memory_gb": max(r["peak_memory_gb"] for r in timed),
        }
        rows_out.append(row)
    base = next((r for r in rows_out if r.get("processes") == 1 and "error" not in r), None)
    for r in rows_out:
        if base and "error" not in r:
            r["efficiency"] = r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
    return rows_out


def maxlen(args, work: Path, model: Path) -> list[dict]:
    rows_out = []
    for layout in args.layouts:
        seq, probes = search(
            lambda seq, layout=layout: maxlen_probe(args, work, model, layout, seq),
            args.low, args.high, args.granularity, args.memory_gib,
        )  # fmt: skip
        rows_out.append(
            {"layout": layout, "shape": args.shape, "max_seq_len": seq, "probes": probes}
        )
    return rows_out


def maxlen_probe(args, work: Path, model: Path, layout: str, seq: int) -> dict | None:
    """Two steps at ``seq`` with activation checkpointing, one row per data-parallel rank."""
    dp = dp_size(*parse_layout(layout))
    data = corpus(work / "corpus.jsonl", seq * dp * 4)
    extra = ["--memory.activation_checkpointing", "true", *args.extra]
    status, records = train(work, model, data, layout, seq, dp, 2, extra)
    if status or len(records) < 2:
        return None  # out of memory, or another failure: printed by train()
    return {"peak_memory_gib": records[-1]["peak_memory_gb"]}


def agreement(args, work: Path, model: Path) -> list[dict]:
    rows = args.rows * max(dp_size(*parse_layout(x)) for x in args.layouts)
    data = corpus(work / "corpus.jsonl", rows * args.seq * (args.steps + 2))
    curves = {}
    for layout in args.layouts:
        status, records = train(work, model, data, layout, args.seq, rows, args.steps, args.extra)
        if status:
            raise SystemExit(f"layout {layout} failed (exit {status})")
        curves[layout] = [r["loss"] for r in records]
    reference = curves[args.layouts[0]]
    out = []
    for layout, losses in curves.items():
        deviation = max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True))
        row = {"layout": layout, "shape": args.shape, "seq": args.seq, "rows": rows}
        out.append(row | {"losses": losses, "max_rel_deviation": deviation})
    if args.plot:
        plot(curves, args.plot, f"{args.shape}, seq {args.seq}, {rows} rows per step")
    return out


def plot(curves: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (layout, losses), style in zip(curves.items(), ["-", "--", ":", "-."] * 4, strict=False):
        ax.plot(range(1, len(losses) + 1), losses, style, label=layout)
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend(title="processes:parallel")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["throughput", "maxlen", "agreement"])
    parser.add_argument(
        "--shape", default="qwen3-1.7b", choices=["toy", "toy-moe", *sorted(SHAPES)]
    )
    parser.add_argument("--layouts", nargs="+", default=["1", "2"])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--rows", type=int, default=1, help="rows per data-parallel rank")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--low", type=int, default=16384)
    parser.add_argument("--high", type=int, default=1048576)
    parser.add_argument("--granularity", type=int, default=16384)
    parser.add_argument("--memory-gib", type=float, help="GPU memory, for maxlen's prediction")
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--out", type=Path)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.extra = argv[cut + 1 :]  # after --: more `loom train` overrides
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = model_dir(args.shape, work)
        rows = {"throughput": throughput, "maxlen": maxlen, "agreement": agreement}[args.mode](
            args, work, model
        )
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.out:
        with args.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    if any("error" in r for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
