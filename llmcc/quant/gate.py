"""The accuracy gate: which layers take the scheme, which stay at higher precision, and what error that costs.

Works on the ONNX model with onnxruntime as the float32 reference, before anything is compiled:

1. Find the layers: MatMul / Gemm nodes whose weight is a 2-D float32 initializer, and embedding tables (Gather
   from a 2-D float32 initializer; quantized per row) unless ``quantize_embeddings`` is off. The output head (a
   matmul onto the vocabulary that reaches an output without passing another matmul) is a layer unless
   ``quantize_head`` is off. Under w8a8 (w4a8) a table starts at int8 (int4): a lookup has no activations to round.
2. Sensitivity: for each layer alone, swap its weight for the quantized-then-dequantized one and measure the outputs'
   relative error vs float32 on the calibration inputs.
3. With every layer quantized, measure again. While the error exceeds the budget, move the most sensitive layer one
   step up its scheme's fallback chain (w4a8 -> int4 -> int8 -> fp16 -> none; w8a8 -> int8) and re-measure.

The plan maps each layer's weight (by a fingerprint of its matmul-oriented ``[K, N]`` values, which is how the
``quantize_weights`` pass finds the same weight in Relax) to the format it gets. The compiled module is then checked
twice: against onnxruntime on the "simulated" model (the plan's dequantized weights in place: the kernels must match
it to float32 precision), and against float32 (its error must be within the budget).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from llmcc.errors import InputError, LlmccError
from llmcc.frontend.onnx_names import module_path
from llmcc.kernels.dequant_matmul import INT8_ACTIVATION_KINDS, WeightFormat, dequantize, quantize
from llmcc.quant.schemes import SCHEMES, QuantScheme
from llmcc.verify import ort_session


@dataclass
class Layer:
    name: str               # module path from the exporter's metadata, else the node name
    node: str               # ONNX node name
    initializer: str
    transposed: bool        # the initializer is [N, K]: Gemm transB, or an embedding table [V, H]
    shape: tuple[int, int]  # [K, N] as the matmul reads it (an embedding table: [H, V], one scale per row)
    is_head: bool = False
    kind: str = "matmul"    # or "embedding" (Gather from the table)
    via_transpose: bool = False  # MatMul(x, Transpose(initializer)): a tied output head, as GPT-2 exports it

    @property
    def input_index(self) -> int:
        return 0 if self.kind == "embedding" else 1

    def matmul_weight(self, inits: dict) -> np.ndarray:
        w = numpy_helper.to_array(inits[self.initializer]).astype(np.float32)
        return np.ascontiguousarray(w.T) if self.transposed else w


@dataclass
class LayerPlan:
    layer: Layer
    scheme: str                # the scheme this layer ends up with ("none": float32)
    sensitivity: float = 0.0   # output error with only this layer quantized: at the requested scheme, or the
    #                            weight-only scheme an embedding table takes under w8a8 / w4a8
    reason: str = ""           # why it is not at the requested scheme
    fingerprint: str = ""      # of the [K, N] float32 weight: how quantize_weights finds it in Relax


@dataclass
class QuantPlan:
    scheme: QuantScheme
    max_error: float
    layers: list[LayerPlan]
    estimated_error: float = 0.0         # onnxruntime, plan's weights in place, calibration inputs
    calibration: list = field(default_factory=list, repr=False)  # the feeds
    skipped: list = field(default_factory=list)  # [{"name", "reason"}] weights that are not layers
    simulator: object = field(default=None, repr=False)
    calibration_source: str = "random inputs"

    def formats(self) -> dict[str, tuple[str, WeightFormat]]:
        """fingerprint -> (layer name, weight format) for every layer that is quantized."""
        return {lp.fingerprint: (lp.layer.name, SCHEMES[lp.scheme].weight)
                for lp in self.layers if SCHEMES[lp.scheme].weight is not None}


def fingerprint(w: np.ndarray) -> str:
    w = np.ascontiguousarray(w, dtype=np.float32)
    return hashlib.sha1(repr(w.shape).encode() + w.tobytes()).hexdigest()


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def find_layers(proto: onnx.ModelProto, quantize_head: bool = True,
                quantize_embeddings: bool = True) -> tuple[list[Layer], list[dict]]:
    """(layers, skipped): matmuls with a constant 2-D float32 weight and embedding tables, and the weights left
    alone with why."""
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    layers, skipped = [], []
    for node in graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[0] in inits:
            init = inits[node.input[0]]
            if len(init.dims) != 2 or init.data_type != onnx.TensorProto.FLOAT or _attr(node, "axis", 0) != 0:
                continue
            name = module_path(node, init.name) or node.name
            if not quantize_embeddings:
                skipped.append({"name": name, "reason": "embedding table: kept float32 (quantize_embeddings off)"})
                continue
            layers.append(Layer(name, node.name, init.name, True, (int(init.dims[1]), int(init.dims[0])),
                                kind="embedding"))
            continue
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        source = producer.get(node.input[1])
        if (node.op_type == "MatMul" and node.input[1] not in inits and source is not None
                and source.op_type == "Transpose" and source.input[0] in inits
                and list(_attr(source, "perm", [1, 0])) == [1, 0]):
            init = inits[source.input[0]]
            if len(init.dims) == 2 and init.data_type == onnx.TensorProto.FLOAT:
                layers.append(Layer(module_path(node, init.name) or node.name, node.name, init.name, True,
                                    (int(init.dims[1]), int(init.dims[0])), via_transpose=True))
            continue
        if node.input[1] not in inits:
            continue
        init = inits[node.input[1]]
        if len(init.dims) != 2 or init.data_type != onnx.TensorProto.FLOAT:
            continue
        transposed = False
        if node.op_type == "Gemm":
            if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0:
                skipped.append({"name": node.name, "reason": "Gemm with transA or alpha != 1"})
                continue
            transposed = bool(_attr(node, "transB", 0))
        k, n = (init.dims[1], init.dims[0]) if transposed else (init.dims[0], init.dims[1])
        layers.append(Layer(module_path(node, init.name) or node.name, node.name, init.name, transposed,
                            (int(k), int(n))))
    _mark_heads(proto, layers, inits)
    if not quantize_head:
        for layer in [x for x in layers if x.is_head]:
            skipped.append({"name": layer.name, "reason": "output head: kept float32 (quantize_head off)"})
        layers = [x for x in layers if not x.is_head]
    return layers, skipped


def _mark_heads(proto, layers, inits) -> None:
    """A head projects onto the vocabulary (N = an embedding table's rows) and reaches a graph output without
    passing another matmul."""
    vocab = {int(inits[n.input[0]].dims[0]) for n in proto.graph.node
             if n.op_type == "Gather" and n.input and n.input[0] in inits and inits[n.input[0]].dims}
    producer = {out: node for node in proto.graph.node for out in node.output}
    reached, stack, seen = set(), [o.name for o in proto.graph.output], set()
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("MatMul", "Gemm"):
            reached.add(node.name)
            continue
        stack.extend(node.input)
    for layer in layers:
        layer.is_head = layer.kind == "matmul" and layer.node in reached and layer.shape[1] in vocab


# ----------------------------------------------------------------------------------------- measuring


class _Simulator:
    """onnxruntime on the model with some layers' weights replaced by their dequantized values."""

    def __init__(self, proto: onnx.ModelProto, layers: list[Layer], feeds: list[dict]):
        self.proto, self.feeds = proto, feeds
        self.inits = {i.name: i for i in proto.graph.initializer}
        self.weights = {layer.node: layer.matmul_weight(self.inits) for layer in layers}
        self.dequantized: dict = {}
        self.reference = [ort_session(proto).run(None, feed) for feed in feeds]

    def dequantized_weight(self, layer: Layer, scheme: str) -> np.ndarray:
        key = (layer.node, scheme)
        if key not in self.dequantized:
            fmt = SCHEMES[scheme].weight
            self.dequantized[key] = dequantize(quantize(self.weights[layer.node], fmt), fmt)
        return self.dequantized[key]

    def model(self, assignment: dict[str, tuple[Layer, str]]) -> onnx.ModelProto:
        """A copy of the model where each layer in ``assignment`` (node -> (layer, scheme)) reads its own new
        initializer holding the dequantized weight (a weight shared with another node stays as it was there), and a
        w8a8 or w4a8 matmul reads its activations through the per-token fake quantization its kernel does."""
        sim = onnx.ModelProto()
        sim.CopyFrom(self.proto)
        nodes = {n.name: n for n in sim.graph.node}
        before: dict[str, list] = {}
        for node_name, (layer, scheme) in assignment.items():
            fmt = SCHEMES[scheme].weight
            if fmt is None:
                continue
            w = self.dequantized_weight(layer, scheme)
            w = np.ascontiguousarray(w.T) if layer.transposed and not layer.via_transpose else w
            new_name = f"{layer.initializer}__llmcc_{scheme}_{node_name}"
            sim.graph.initializer.append(numpy_helper.from_array(w, new_name))
            nodes[node_name].input[layer.input_index] = new_name
            if fmt.kind in INT8_ACTIVATION_KINDS and layer.kind == "matmul":
                before[node_name] = _fake_quantize_rows(sim, nodes[node_name], f"{node_name}__llmcc_{fmt.kind}")
        if before:
            ordered = []
            for node in sim.graph.node:
                ordered.extend(before.get(node.name, []))
                ordered.append(node)
            del sim.graph.node[:]
            sim.graph.node.extend(ordered)
        return sim

    def error(self, assignment) -> float:
        from llmcc.verify import relative_error

        session = ort_session(self.model(assignment))
        worst = 0.0
        for feed, ref in zip(self.feeds, self.reference):
            for got, want in zip(session.run(None, feed), ref):
                if np.issubdtype(np.asarray(want).dtype, np.floating):
                    worst = max(worst, relative_error(got, want))
        return worst


def _fake_quantize_rows(model: onnx.ModelProto, node: onnx.NodeProto, prefix: str) -> list:
    """Nodes computing ``llmcc.kernels.w8a8_matmul.quantize_rows_reference`` on ``node``'s first input, in float
    (q * s), rewired into ``node``; the constants go into ``model``'s initializers."""
    from onnx import helper

    from llmcc.frontend.onnx_import import model_opset
    from llmcc.kernels.w8a8_matmul import INT8_MAX, TINY

    x, n = node.input[0], lambda name: f"{prefix}_{name}"
    model.graph.initializer.extend([numpy_helper.from_array(np.array(INT8_MAX, np.float32), n("int8_max")),
                                    numpy_helper.from_array(np.array(TINY, np.float32), n("tiny"))])
    if model_opset(model) >= 18:
        model.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), n("axes")))
        reduce = helper.make_node("ReduceMax", [n("abs"), n("axes")], [n("amax")], keepdims=1, name=n("amax"))
    else:
        reduce = helper.make_node("ReduceMax", [n("abs")], [n("amax")], axes=[-1], keepdims=1, name=n("amax"))
    nodes = [helper.make_node("Abs", [x], [n("abs")], name=n("abs")), reduce,
             helper.make_node("Div", [n("amax"), n("int8_max")], [n("step")], name=n("step")),
             helper.make_node("Max", [n("step"), n("tiny")], [n("scale")], name=n("scale")),
             helper.make_node("Div", [x, n("scale")], [n("scaled")], name=n("scaled")),
             helper.make_node("Round", [n("scaled")], [n("q")], name=n("q")),
             helper.make_node("Mul", [n("q"), n("scale")], [n("x")], name=n("x"))]
    node.input[0] = n("x")
    return nodes


# Random calibration inputs come from this seed unless the caller gives one: the plan (which layers stay wider) is
# decided on them, and a fresh draw per compile gave the same model a different artifact each time (all-MiniLM-L6-v2
# at w8a8: 15 or 24 of 39 layers kept wider, 98 or 131 ms, on two runs of tools/bench_quant.py)
CALIBRATION_SEED = 0


def calibration_feeds(proto: onnx.ModelProto, calib: str | Path | None, seed: int) -> list[dict]:
    """The calibration inputs: the user's .npz (one array per model input), or random inputs at two sizes drawn
    from ``seed``."""
    from llmcc.frontend.onnx_import import graph_signature
    from llmcc.inputs import dim_settings, index_bounds, random_inputs

    inputs, _ = graph_signature(proto)
    if calib is None:
        rng = np.random.default_rng(seed)
        bounds = index_bounds(proto)
        settings = dim_settings(inputs)
        # two sizes of the symbolic dims (the larger ones); a fully static model has just the one
        return [random_inputs(inputs, dims, rng, bounds) for dims in (settings[1:] or settings)]
    path = Path(calib)
    try:
        data = np.load(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"--calib {path}: cannot read it as .npz ({exc})") from None
    feed = {}
    for spec in inputs:
        if spec.name not in data.files:
            raise InputError(f"--calib {path}: no array for model input '{spec.name}' (it has: "
                             f"{', '.join(data.files) or 'nothing'})")
        arr = data[spec.name]
        if str(arr.dtype) != spec.dtype or arr.ndim != len(spec.shape):
            raise InputError(f"--calib {path}: '{spec.name}' is {arr.dtype} rank {arr.ndim}; the model wants "
                             f"{spec.dtype} rank {len(spec.shape)}")
        feed[spec.name] = arr
    return [feed]


def plan(proto: onnx.ModelProto, scheme: QuantScheme, *, max_error: float | None = None, calib=None,
         quantize_head: bool = True, quantize_embeddings: bool = True, seed: int | None = None) -> QuantPlan:
    """Decide each layer's format so the outputs stay within ``max_error`` of float32 (see the module doc)."""
    budget = scheme.max_error if max_error is None else float(max_error)
    if not budget > 0:
        raise LlmccError(f"--max-error {max_error}: must be a positive relative error")
    layers, skipped = find_layers(proto, quantize_head, quantize_embeddings)
    seed = CALIBRATION_SEED if seed is None else seed
    feeds = calibration_feeds(proto, calib, seed)
    result = QuantPlan(scheme, budget, [], calibration=feeds, skipped=skipped,
                       calibration_source=str(calib) if calib is not None else
                       f"random inputs, seed {seed}")
    if not layers:
        return result
    sim = _Simulator(proto, layers, feeds)
    for layer in layers:
        why = scheme.weight.check(*layer.shape)
        chosen = scheme.name
        while SCHEMES[chosen].weight is not None and SCHEMES[chosen].weight.check(*layer.shape):
            chosen = SCHEMES[chosen].fallback  # the first scheme up the chain that can store it (w4a8 -> int4 -> int8)
        measured = scheme.name if why is None else None
        if why is None and layer.kind == "embedding" and scheme.weight.kind in INT8_ACTIVATION_KINDS:
            # a lookup has no activations to round: the table goes straight to the weight-only scheme that stores it
            # the same way, or the gate's first step for it (w8a8 -> int8) would change nothing
            chosen = measured = scheme.fallback
            why = f"embedding table: a lookup has no activations to quantize, so {scheme.name} stores it as {chosen}"
        lp = LayerPlan(layer, chosen, reason=why or "", fingerprint=fingerprint(sim.weights[layer.node]))
        if measured is not None:
            lp.sensitivity = sim.error({layer.node: (layer, measured)})
        result.layers.append(lp)

    def assignment():
        return {lp.layer.node: (lp.layer, lp.scheme) for lp in result.layers}

    # layers with the same weight (a tied embedding and output head) are stored once, so they move together
    tied: dict[str, list] = {}
    for lp in result.layers:
        tied.setdefault(lp.fingerprint, []).append(lp)
    for group in tied.values():
        if len(group) > 1:
            highest = next((lp.scheme for lp in group if lp.scheme != scheme.name), scheme.name)
            for lp in group:
                lp.scheme = highest

    error = sim.error(assignment())
    # one step up the fallback chain at a time, most sensitive first, and every layer one step before any two
    steps = {lp.layer.node: 0 for lp in result.layers}
    while error > budget:
        movable = [lp for lp in result.layers if SCHEMES[lp.scheme].fallback is not None]
        if not movable:
            raise LlmccError(f"--quant {scheme.name}: cannot meet --max-error {budget:g}: error {error:.3g} even "
                             f"with every layer at float32")
        chosen = min(movable, key=lambda lp: (steps[lp.layer.node], -lp.sensitivity))
        fallback = SCHEMES[chosen.scheme].fallback
        for lp in tied[chosen.fingerprint]:
            steps[lp.layer.node] += 1
            lp.scheme = fallback
            lp.reason = (f"kept at {lp.scheme}: among the most sensitive layers (output error "
                         f"{chosen.sensitivity:.3g} with only {chosen.layer.name} quantized)")
        error = sim.error(assignment())
    if all(SCHEMES[lp.scheme].weight is None for lp in result.layers):
        least = min(result.layers, key=lambda lp: lp.sensitivity)
        raise LlmccError(f"--quant {scheme.name}: no layer can be quantized within --max-error {budget:g} (the least "
                         f"sensitive, {least.layer.name}, alone gives {least.sensitivity:.3g}); raise --max-error or "
                         f"choose a wider scheme")
    result.estimated_error = error
    result.simulator = sim
    return result


# A w8a8 (or w4a8) layer rounds activations that earlier kernels computed. Its kernels sum in int32, in another
# order than onnxruntime's float matmuls, so an activation within float rounding of a half step can round the other
# way: one int8 step (1/127 of its row's largest value) on one element. On the 4096-wide GEMV chain one such flip
# moved the output by 4.2e-4 relative (tools/bench_quant.py); through a deep model the steps add up (verify_tolerance).
# An indexing or scale bug is off by far more, and the error vs float32 (measure) still holds the gate's budget.
W8A8_VERIFY_TOLERANCE = 5e-3


def verify_tolerance(p: QuantPlan) -> float | None:
    """The tolerance of checking the compiled module against ``simulated_model``: None (the dtype's own) unless a
    layer quantizes its activations (w8a8, w4a8). Then an activation that lands within float32 rounding of a step
    boundary rounds one way in the kernels and the other in onnxruntime's simulation, and the step it moves carries
    through every later layer: on all-MiniLM-L6-v2 with every layer w8a8 the module was 0.037 from the simulation
    (with the TE kernels as with the AVX2 ones, each bit-exact on its own inputs), the size of the quantization
    noise itself. So the tolerance is W8A8_VERIFY_TOLERANCE or the plan's own error vs float32, whichever is larger:
    a kernel that computes something else is off by far more, and the module's error vs float32 is checked against
    --max-error after this anyway."""
    rounded = any(SCHEMES[lp.scheme].weight is not None and SCHEMES[lp.scheme].weight.kind in INT8_ACTIVATION_KINDS
                  for lp in p.layers)
    return max(W8A8_VERIFY_TOLERANCE, p.estimated_error) if rounded else None


def simulated_model(p: QuantPlan, quantized_fingerprints: set[str]) -> onnx.ModelProto:
    """The float model with the dequantized weights of the layers the compiler really quantized."""
    return p.simulator.model({lp.layer.node: (lp.layer, lp.scheme) for lp in p.layers
                              if lp.fingerprint in quantized_fingerprints})


def measure(module, p: QuantPlan) -> float:
    """The compiled module's output error vs float32 (onnxruntime) on the calibration inputs."""
    from llmcc.verify import relative_error

    worst = 0.0
    for feed, ref in zip(p.calibration, p.simulator.reference):
        got = module.run(**feed)
        for spec, want in zip(module.outputs, ref):
            if np.issubdtype(np.asarray(want).dtype, np.floating):
                worst = max(worst, relative_error(got[spec.name], want))
    return worst


def report(p: QuantPlan, measured_error: float | None, quantized: dict[str, int]) -> dict:
    """The report's "quant" section. ``quantized``: fingerprint -> stored bytes, for the layers the pass rewrote."""
    layers, fp32_bytes, stored, counted = [], 0, 0, set()
    for lp in p.layers:
        k, n = lp.layer.shape
        done = lp.fingerprint in quantized
        if lp.fingerprint not in counted:  # a tied embedding and head are stored once
            counted.add(lp.fingerprint)
            fp32_bytes += 4 * k * n
            stored += quantized.get(lp.fingerprint, 4 * k * n)
        entry = {"name": lp.layer.name, "scheme": lp.scheme if done else "none", "error": lp.sensitivity,
                 "shape": [k, n]}
        if lp.reason or (not done and lp.scheme != "none"):
            entry["reason"] = lp.reason or "not found in the lowered graph"
        layers.append(entry)
    return {"scheme": p.scheme.name, "error": measured_error, "estimated_error": p.estimated_error,
            "max_error": p.max_error, "layers": layers, "skipped": p.skipped,
            "weight_bytes": {"float32": fp32_bytes, "stored": stored,
                             "ratio": round(stored / fp32_bytes, 4) if fp32_bytes else None},
            "calibration": f"{p.calibration_source} ({len(p.calibration)} feeds)",
            "error_metric": "max over outputs and calibration inputs of ||y - y_fp32|| / ||y_fp32||"}


