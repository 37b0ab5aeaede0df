"""Compile every loom.kernels Triton kernel for sm_90 without a GPU (run by
test_compiles.py in a fresh process, TRITON_INTERPRET unset). Arguments not named as
pointers or floats are 32-bit ints."""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from loom.kernels import _grouped_mm_triton as gmm
from loom.kernels import _linear_cross_entropy_triton as ce
from loom.kernels import _rms_norm_triton as rms
from loom.kernels import _rotary_triton as rope
from loom.kernels import _swiglu_triton as swiglu

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(
    fn, dtype: str, floats=(), fp32_pointers=(), i64_pointers=(), i32_pointers=(), **constexprs
):
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in fp32_pointers:
            signature[name] = "*fp32"
        elif name in i64_pointers:
            signature[name] = "*i64"
        elif name in i32_pointers:
            signature[name] = "*i32"
        elif name.endswith("_ptr"):
            signature[name] = f"*{dtype}"
        else:
            signature[name] = "fp32" if name in floats else "i32"
    keyed = {(fn.arg_names.index(name),): value for name, value in constexprs.items()}
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=keyed), target=TARGET)
    print(f"{fn.__name__} {dtype} {constexprs}: ok")


def main() -> None:
    for dtype in ("fp32", "bf16"):
        norm = {"floats": ("eps", "offset"), "fp32_pointers": ("rstd_ptr", "dw_partial_ptr")}
        compile_kernel(rms._rms_norm_fwd_kernel, dtype, **norm, BLOCK_ROWS=32, BLOCK_COLS=128)
        compile_kernel(rms._rms_norm_bwd_kernel, dtype, **norm, BLOCK_ROWS=1, BLOCK_COLS=4096)
        ce_args = {
            "floats": ("label_smoothing", "z_loss", "softcap"),
            "fp32_pointers": ("loss_ptr", "lse_ptr"),
            "i64_pointers": ("labels_ptr",),
        }
        for softcap in (False, True):
            compile_kernel(
                ce._ce_loss_grad_kernel, dtype, **ce_args, BLOCK=16384, HAS_SOFTCAP=softcap
            )
            compile_kernel(
                ce._ce_grad_block_kernel, dtype, **ce_args, BLOCK=2048, HAS_SOFTCAP=softcap
            )
        precision = "ieee" if dtype == "fp32" else "tf32"
        compile_kernel(
            gmm._grouped_matmul_kernel, dtype, i32_pointers=("group_ends_ptr",),
            BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, BLOCK_E=64, INPUT_PRECISION=precision,
            UPCAST=False,
        )  # fmt: skip
        compile_kernel(
            gmm._grouped_weight_grad_kernel, dtype, i32_pointers=("group_ends_ptr",),
            BLOCK_N=128, BLOCK_K=128, BLOCK_M=64, INPUT_PRECISION=precision, UPCAST=False,
        )  # fmt: skip
        compile_kernel(swiglu._swiglu_fwd_kernel, dtype, BLOCK=1024)
        compile_kernel(swiglu._swiglu_bwd_kernel, dtype, BLOCK=1024)
        for block_pass, backward in ((0, False), (32, True)):
            compile_kernel(
                rope._rotary_kernel, dtype, fp32_pointers=("cos_ptr", "sin_ptr"),
                BLOCK_Q_HEADS=32, BLOCK_K_HEADS=8, BLOCK_HALF=64, BLOCK_PASS=block_pass,
                BACKWARD=backward,
            )  # fmt: skip


if __name__ == "__main__":
    main()
