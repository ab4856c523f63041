#!/usr/bin/env bash
# On the lent GPU machine: stash the carried half of .whl (see tools/gpu_wheels.sh); once both halves are stashed,
# join apache-tvm's wheel and install TVM into /tmp/site (put on PYTHONPATH by tools/gpu_check.py's caller).
set -euo pipefail
cd "$(dirname "$0")/.."
stash=/root/llmcc-whl
mkdir -p "$stash"
for half in .whl/a .whl/b; do [ -d "$half" ] && cp "$half"/* "$stash"/; done
if ls "$stash"/*.part00 >/dev/null 2>&1 && ls "$stash"/*.part01 >/dev/null 2>&1 && ls "$stash"/apache_tvm_ffi-*.whl >/dev/null 2>&1; then
  part=$(ls "$stash"/*.part00); wheel=${part%.part00}
  cat "$wheel".part0* > "$wheel"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$wheel" "$stash"/apache_tvm_ffi-*.whl
  echo "installed TVM into /tmp/site: export PYTHONPATH=/tmp/site"
else
  echo "stashed $(ls "$stash" | wc -l) file(s); carry the other half next"
fi
