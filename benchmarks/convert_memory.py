"""Peak host memory of ``loom convert dcp-to-hf`` against the checkpoint's size and its
largest tensor (CPU; any machine with a few GiB free).

    uv run python benchmarks/convert_memory.py --out /tmp/convert-bench

Builds a Qwen3-shaped model of about 0.8B parameters (3 GiB in fp32) from random
weights, saves it as HF safetensors, converts it to a Loom checkpoint (``hf-to-dcp``),
then runs ``dcp-to-hf`` under ``/usr/bin/time -v`` at two output shard sizes and reports
its maximum resident set size next to the baseline of a process that only imports torch
and transformers.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {  # about 0.8B parameters; the embedding (and tied head) is the largest tensor
    "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936,
    "hidden_size": 1536, "intermediate_size": 4608, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_key_value_heads": 4, "head_dim": 128,
    "tie_word_embeddings": True, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "torch_dtype": "float32",
}  # fmt: skip


def max_rss_mib(command: list[str]) -> float:
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    kib = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    return int(kib[1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--save-world", type=int, default=1, help="hf-to-dcp processes: DCP chunks per tensor"
    )
    args = parser.parse_args()
    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    hf = out / "hf"
    hf.mkdir(parents=True)
    shutil.copy(ROOT / "examples/tiny/model/tokenizer.json", hf)
    shutil.copy(ROOT / "examples/tiny/model/tokenizer_config.json", hf)
    (hf / "config.json").write_text(json.dumps(SHAPE))
    make = (
        "import torch, transformers as t; torch.manual_seed(0); "
        f"c = t.AutoConfig.from_pretrained('{hf}'); "
        f"t.AutoModelForCausalLM.from_config(c).save_pretrained('{hf}', max_shard_size='1GB')"
    )
    subprocess.run([sys.executable, "-c", make], check=True)
    loom = [sys.executable, "-m", "loom.trainer.cli", "convert"]
    subprocess.run(
        [*loom, "hf-to-dcp", hf, out / "dcp", "--nproc", str(args.save_world)],
        check=True,
        capture_output=True,
    )
    size = sum(f.stat().st_size for f in (out / "dcp").glob("*.distcp")) / 2**20
    largest = SHAPE["vocab_size"] * SHAPE["hidden_size"] * 4 / 2**20
    base = max_rss_mib([sys.executable, "-c", "import torch, transformers, loom.trainer.cli"])
    print(
        f"checkpoint {size:,.0f} MiB saved at world {args.save_world}; largest tensor "
        f"{largest:,.0f} MiB; baseline {base:,.0f} MiB"
    )
    for shard in ("500MB", "5GiB"):
        dst = out / f"back-{shard}"
        peak = max_rss_mib([*loom, "dcp-to-hf", out / "dcp", dst, "--model", hf,
                            "--max-shard-size", shard])  # fmt: skip
        files = len(list(dst.glob("*.safetensors")))
        print(f"dcp-to-hf --max-shard-size {shard}: {files} files, peak RSS {peak:,.0f} MiB "
              f"({peak - base:,.0f} above the baseline)")  # fmt: skip


if __name__ == "__main__":
    main()
