#!/usr/bin/env bash
# Download, here, the wheels the GPU machine lacks (it has torch, transformers, triton,
# pyarrow, ... but no network). They land in .whl/ (git-ignored), which a device run
# carries and installs with scripts/device_env.sh. torchtitan (a benchmark peer) and the
# modules its model and parallelize path import; its other requirements are not imported.
# torchao: QLoRA's NF4 tensor. fla-core: Gated DeltaNet's Triton kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
  manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
  libcst==1.9.0 liger-kernel==0.8.5 \
  torchtitan==0.3.0 spmd_types==0.2.3 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 \
  typing-extensions==4.16.0 torchao==0.18.0 fla-core==0.6.0
ls .whl
