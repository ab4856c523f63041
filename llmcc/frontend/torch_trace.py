"""torch.nn.Module -> ONNX, with torch's default (dynamo) exporter and symbolic batch/sequence dims."""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import tempfile
import warnings

import onnx

from llmcc.errors import ImportFailure


def _input_names(module, count: int) -> list[str]:
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in params[:count]]
    except (TypeError, ValueError):
        names = []
    return names + [f"input_{i}" for i in range(len(names), count)]


def _dynamic_shapes(example_inputs) -> tuple:
    """Dim 0 of every tensor is 'batch' and dim 1 'sequence': the layout of token ids, masks and hidden states.
    A dim whose example size is 0 or 1 stays static: torch.export specializes such a dim and then refuses the whole
    dynamic export (a batch-1 example would otherwise fall back to a fully static graph)."""
    shapes = []
    for x in example_inputs:
        dims = {}
        shape = tuple(getattr(x, "shape", ()))
        for axis, name in ((0, "batch"), (1, "sequence")):
            if len(shape) > axis and shape[axis] >= 2:
                dims[axis] = name
        shapes.append(dims)
    return tuple(shapes)


def trace(module, example_inputs, *, dynamic: bool = True) -> onnx.ModelProto:
    """Export ``module`` called on ``example_inputs`` to ONNX; symbolic batch and sequence dims when it allows."""
    import torch

    if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    if not example_inputs:
        raise ImportFailure("compiling a torch module needs example_inputs=(tensor, ...)")
    module = module.eval()
    names = _input_names(module, len(example_inputs))
    attempts = [_dynamic_shapes(example_inputs), None] if dynamic else [None]
    last_error = None
    for shapes in attempts:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), \
                contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            try:
                program = torch.onnx.export(module, tuple(example_inputs), dynamo=True, dynamic_shapes=shapes,
                                            input_names=names, verbose=False)
                path = os.path.join(tmp, "model.onnx")
                program.save(path)
                return onnx.load(path)
            except Exception as exc:  # torch.export's errors are pages long; keep the summary line
                last_error = exc
    text = [ln for ln in str(last_error).splitlines() if ln.strip()]
    summary = next((ln for ln in text if "Error" in ln and "exception summary" not in ln.lower()), text[0] if text
                   else type(last_error).__name__)
    raise ImportFailure(f"cannot trace {type(module).__name__} to ONNX: {summary.strip()[:300]}")
