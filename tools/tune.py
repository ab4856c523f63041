#!/usr/bin/env python3
"""Tune a model's kernels into a llmcc tuning database: ``llmcc tune`` (same flags), for generating shipped ones.

    python tools/tune.py MODEL.onnx --target cpu --trials 64 --db tuning/
    python tools/tune.py llama --target cpu --trials 200 --db tuning/ --compare   # a zoo model; time rule vs tuned

See ``llmcc tune --help`` and llmcc.tuning.tune.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    from llmcc.cli import main as llmcc_main

    return llmcc_main(["tune", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
