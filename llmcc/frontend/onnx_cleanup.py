"""Pre-import clean-up of ONNX graphs, before TVM sees them.

Kept small on purpose: the graph stays as the exporter wrote it, except where TVM's importer needs help.
"""

from __future__ import annotations

import onnx


def clean_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with shapes inferred, so the importer sees ranks of intermediate values."""
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        return model
