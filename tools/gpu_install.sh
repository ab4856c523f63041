#!/usr/bin/env bash
# On the lent GPU machine: stash the carried half of .whl (see tools/gpu_payload.sh); once both halves are stashed,
# unpack TVM and install apache-tvm-ffi into /tmp/site (the caller puts it on PYTHONPATH).
set -euo pipefail
cd "$(dirname "$0")/.."
stash=/root/llmcc-whl
mkdir -p "$stash"
for half in .whl/a .whl/b; do [ -d "$half" ] && cp "$half"/* "$stash"/; done
if [ -f "$stash"/tvm.tar.xz.part00 ] && [ -f "$stash"/tvm.tar.xz.part01 ] && ls "$stash"/apache_tvm_ffi-*.whl >/dev/null 2>&1; then
  mkdir -p /tmp/site
  cat "$stash"/tvm.tar.xz.part0* | xz -d | tar -C /tmp/site -xf -
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$stash"/apache_tvm_ffi-*.whl
  echo "installed TVM into /tmp/site: export PYTHONPATH=/tmp/site"
else
  echo "stashed $(ls "$stash" | wc -l) file(s); carry the other half next"
fi
