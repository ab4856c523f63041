#!/usr/bin/env bash
# Prepare what tools/gpu_check.py needs on a lent GPU machine (the device tool's H200: Python 3.12 with torch,
# transformers, onnx, onnxruntime and triton already installed, no network). It lacks TVM.
#
# apache-tvm's wheel is ~100 MB (libtvm_compiler.so deflated), more than one device call may carry (64 MiB with the
# working tree). This script downloads the pinned wheels, unpacks TVM without what llmcc never loads (cutlass
# headers, the web runtime), packs it with xz (~66 MB) and splits that into two halves, .whl/a and .whl/b
# (git-ignored), the second with apache-tvm-ffi's cp312 wheel. On the device, within one warm lease (30 s idle):
#   call 1, carry [".whl/a"]:  bash tools/gpu_install.sh
#   call 2, carry [".whl/b"]:  bash tools/gpu_install.sh && PYTHONPATH=/tmp/site python3 tools/gpu_check.py ...
# gpu_install.sh stashes each half in /root/llmcc-whl and unpacks TVM once both are there.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl/dl .whl/site .whl/a .whl/b
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl/dl \
  apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1
python3 -m zipfile -e .whl/dl/apache_tvm-*.whl .whl/site
rm -rf .whl/site/tvm/3rdparty .whl/site/tvm/web
tar -C .whl/site -cf - . | xz -6 -T0 > .whl/tvm.tar.xz
split -n 2 -d .whl/tvm.tar.xz .whl/a/tvm.tar.xz.part
mv .whl/a/tvm.tar.xz.part01 .whl/b/
mv .whl/dl/apache_tvm_ffi-*.whl .whl/b/
rm -rf .whl/dl .whl/site .whl/tvm.tar.xz
du -sh .whl/a .whl/b
