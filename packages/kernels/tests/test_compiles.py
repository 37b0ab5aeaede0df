"""The interpreter runs kernels as Python, so it cannot catch what only Triton's compiler
rejects (type promotion, constexpr misuse). Compile every kernel for sm_90 in a fresh
process (this one loaded them interpreted on CPU); no GPU is needed."""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loom.kernels import dispatch


def _compiler_api_supported() -> bool:
    if not dispatch.triton_available():
        return False
    from triton.compiler import ASTSource

    # Triton < 3.3 keyed constants differently; the GPU machines run newer releases.
    return "constexprs" in inspect.signature(ASTSource).parameters


@pytest.mark.skipif(not _compiler_api_supported(), reason="needs triton >= 3.3")
def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # really compile, and leave no cache behind
    script = Path(__file__).with_name("compile_kernels.py")
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert result.stdout.count(": ok") == 24
