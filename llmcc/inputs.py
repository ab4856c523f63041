"""Random inputs for a model signature: symbolic dims bound to concrete sizes, values that the graph accepts.

Token-id inputs are drawn below the vocabulary size read off the graph (the Gather that consumes them); masks are
0/1 with at least one 1 per row; position ids count up; float inputs are standard normal.
"""

from __future__ import annotations

import numpy as np
import onnx

from llmcc.frontend.onnx_import import TensorSpec

# Three settings of the symbolic dims: small, odd and longer, so a bug that depends on one size shows.
BATCH_SIZES = (1, 2, 1)
SEQ_LENS = (1, 7, 33)


def dim_settings(inputs: list[TensorSpec], count: int = 3) -> list[dict[str, int]]:
    """``count`` bindings of every symbolic dim name to a size."""
    names = sorted({d for spec in inputs for d in spec.shape if isinstance(d, str)})
    if not names:
        return [{}]
    settings = []
    for i in range(count):
        binding = {}
        for name in names:
            if "batch" in name.lower():
                binding[name] = BATCH_SIZES[i % len(BATCH_SIZES)]
            else:
                binding[name] = SEQ_LENS[i % len(SEQ_LENS)]
        settings.append(binding)
    return settings


def index_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """Input name -> exclusive upper bound for inputs used as indices into an initializer: Gather's indices, and
    RotaryEmbedding's position_ids (rows of its cos/sin caches)."""
    sizes = {i.name: list(i.dims) for i in model.graph.initializer}
    bounds: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2:
            table, index = node.input[0], node.input[1]
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        elif node.op_type == "RotaryEmbedding" and len(node.input) == 4 and node.input[3]:
            table, index, axis = node.input[1], node.input[3], 0
        else:
            continue
        dims = sizes.get(table)
        if dims:
            bound = dims[axis]
            bounds[index] = min(bounds.get(index, bound), bound)
    return bounds


def random_inputs(inputs: list[TensorSpec], dims: dict[str, int], rng: np.random.Generator,
                  bounds: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    bounds = bounds or {}
    out = {}
    for spec in inputs:
        shape = tuple(dims.get(d, 1) if isinstance(d, str) else int(d) for d in spec.shape)
        name = spec.name.lower()
        if spec.dtype.startswith("int"):
            if "mask" in name:
                arr = (rng.random(shape) > 0.3).astype(spec.dtype)
                if arr.ndim >= 1:
                    arr[..., 0] = 1
            elif "position" in name and len(shape) >= 1:
                arr = np.broadcast_to(np.arange(shape[-1]), shape).astype(spec.dtype)
            elif "token_type" in name:
                arr = np.zeros(shape, spec.dtype)
            else:
                arr = rng.integers(0, bounds.get(spec.name, 100), size=shape).astype(spec.dtype)
        elif spec.dtype == "bool":
            arr = rng.random(shape) > 0.3
        else:
            arr = rng.standard_normal(shape).astype(spec.dtype)
        out[spec.name] = np.ascontiguousarray(arr)
    return out
