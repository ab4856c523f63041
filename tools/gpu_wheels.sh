#!/usr/bin/env bash
# Prepare what tools/gpu_check.py needs on a lent GPU machine (the device tool's H200: Python 3.12 with torch,
# transformers, onnx, onnxruntime and triton already installed, no network).
#
# It lacks TVM. apache-tvm's wheel (~100 MB) is larger than one device call may carry (64 MiB), so this script
# downloads the wheels into .whl/ (git-ignored) and splits them into two halves, .whl/a and .whl/b, each under 60 MB.
# On the device, within one warm lease:
#   call 1, carry [".whl/a"]:  bash tools/gpu_install.sh
#   call 2, carry [".whl/b"]:  bash tools/gpu_install.sh && python3 tools/gpu_check.py --out $OUT
# gpu_install.sh stashes each half in /root/llmcc-whl, and installs once both are there.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl/dl .whl/a .whl/b
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl/dl \
  apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1
tvm=$(ls .whl/dl/apache_tvm-*.whl)
split -b 55m -d "$tvm" ".whl/a/$(basename "$tvm").part"
mv .whl/a/*.part01 .whl/b/ 2>/dev/null || true
mv .whl/dl/apache_tvm_ffi-*.whl .whl/b/
rm -rf .whl/dl
du -sh .whl/a .whl/b
