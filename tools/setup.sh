#!/usr/bin/env bash
# Set up ./.venv with llmcc, its pinned dependencies and the test/zoo extras. Safe to run again: it reinstalls only
# when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.llmcc-setup
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # torch first and pinned: on our machines 2.13.0 is a CPU wheel on local disk; an unpinned torch would pull a
  # multi-GB CUDA build. pyproject's range admits it, so the next step keeps it.
  .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
  echo "$want" > "$stamp"
fi
