"""LoRA adapters merged into the model's weights at compile time, so an adapter costs nothing at run time.

An adapter is a folder as PEFT's ``save_pretrained`` writes it: ``adapter_config.json`` (peft_type "LORA", r,
lora_alpha, use_rslora, rank_pattern, alpha_pattern, ...) and ``adapter_model.safetensors`` (or
``adapter_model.bin``) holding ``<module>.lora_A.weight`` [r, in] and ``<module>.lora_B.weight`` [out, r] for every
adapted layer. PEFT's LoRA layer computes ``base(x) + scale * (x A^T) B^T``, so merging adds ``scale * B @ A`` (in
nn.Linear's [out, in] layout) to the layer's weight, with scale = lora_alpha / r (rslora: lora_alpha / sqrt(r)) times
the user's scale. Several adapters add up. The merge is done in fp32 on a copy of the ONNX model, before import (so
before quantization); the user's model is never modified.

Where an adapted layer's weight is in the ONNX graph. Every MatMul or Gemm whose second operand is a 2-D float
initializer, directly or through a Transpose, is a *weight site*. Its module path comes from, in this order:

1. the node's ``pkg.torch.onnx.name_scopes`` metadata, else its ``namespace``: torch's default (dynamo) exporter folds
   each Linear's transposed weight into a constant named like ``val_112`` and records the module that ran the op
   only there (``[..., 'hf.model.layers.0.self_attn.q_proj', 'linear']``);
2. the initializer's name without ``.weight``, where the exporter kept it (GPT-2's Conv1D becomes a Gemm on
   ``hf.transformer.h.0.attn.c_attn.weight``);
3. the node's name scope from torch's legacy exporter (``/blocks.0/up/MatMul``).

An adapter's module path (PEFT's ``base_model.model.`` removed) matches a site when one path is a dotted suffix of
the other, so a wrapper's prefix does not matter (``hf.model.layers.0...`` in the graph, ``model.layers.0...`` in the
adapter); the longest match wins and a tie is an error.

The layout of the weight comes from the graph, not from the adapter: a MatMul's or a Gemm's (transB=0) weight is
[in, out], a Gemm's with transB=1 is [out, in], a Transpose in between flips it. So GPT-2's Conv1D
(``fan_in_fan_out``: stored [in, out]) needs no special case: its lora_A is still [r, in] and its lora_B [out, r].
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from llmcc.frontend.onnx_names import module_path
from llmcc.errors import LoraError

PEFT_PREFIX = "base_model.model."
_MATRIX_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
# adapter_config.json fields whose adapters are not plain LoRA: merging their A and B would compute something else.
_UNMERGEABLE = {
    "use_dora": "DoRA (use_dora) rescales the merged weight by a learned magnitude",
    "lora_bias": "lora_bias adds a bias to lora_B",
    "use_qalora": "QALoRA (use_qalora) pools its input",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) depends on the input tokens",
    "layer_replication": "layer_replication changes the model's layers",
    "target_parameters": "target_parameters adapts raw parameters, not layers",
}
_LISTED = 8  # names listed in an error before "... and N more"


# ---------------------------------------------------------------------------------------------------------------------
# Reading adapters.


@dataclass(frozen=True)
class LoraModule:
    """One adapted layer of an adapter."""

    key: str  # the layer's module path in the adapter, PEFT's "base_model.model." removed
    a: np.ndarray = field(repr=False)  # lora_A.weight [r, in], float32
    b: np.ndarray = field(repr=False)  # lora_B.weight [out, r], float32
    scale: float  # lora_alpha / r (rslora: / sqrt(r)) times the user's scale

    def delta(self) -> np.ndarray:
        """The weight update in nn.Linear's [out, in] layout, fp32."""
        return np.float32(self.scale) * (self.b @ self.a)


@dataclass(frozen=True)
class LoraAdapter:
    path: Path
    scale: float  # the user's scale (1.0 unless given)
    modules: tuple[LoraModule, ...] = field(repr=False)


def parse_spec(spec) -> tuple[Path, float]:
    """``"path"``, ``"path:scale"`` (the text after the last ':' is the scale when it is a number), a Path, or a
    ``(path, scale)`` pair -> (folder, scale)."""
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        path, scale = spec
    elif isinstance(spec, str):
        path, scale = spec, 1.0
        head, sep, tail = spec.rpartition(":")
        if sep and head:
            try:
                path, scale = head, float(tail)
            except ValueError:
                pass  # a ':' in the folder name
    elif isinstance(spec, os.PathLike):
        path, scale = spec, 1.0
    else:
        raise LoraError(f"LoRA adapter {spec!r}: expected a folder path, 'PATH:SCALE' or (path, scale)")
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise LoraError(f"LoRA adapter {path}: scale {scale!r} is not a number") from None
    if not math.isfinite(scale):
        raise LoraError(f"LoRA adapter {path}: scale {scale} is not finite")
    return Path(path), scale


def read_adapters(specs) -> list[LoraAdapter]:
    """``llmcc.compile``'s ``lora=``: None, one spec (see parse_spec) or a list of them."""
    if specs is None:
        return []
    single = isinstance(specs, (str, os.PathLike)) or (
        isinstance(specs, tuple) and len(specs) == 2 and isinstance(specs[1], (int, float)))
    return [read_adapter(s) for s in ([specs] if single else specs)]


def read_adapter(spec) -> LoraAdapter:
    """Read and check a PEFT LoRA folder; every problem is a LoraError naming the folder and the culprit."""
    path, user_scale = parse_spec(spec)
    if not path.exists():
        hint = " (the text after its last ':' is not a number, so it is no scale)" if ":" in path.name else ""
        raise LoraError(f"{path}: no such LoRA adapter folder{hint}")
    if not path.is_dir():
        raise LoraError(f"{path}: a LoRA adapter is a folder (adapter_config.json and adapter_model.safetensors)")
    config = _read_config(path)
    tensors = _read_tensors(path)

    pairs: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    others = []
    for key, value in tensors.items():
        m = _MATRIX_KEY.match(key)
        if m is None:
            others.append(key)
            continue
        pairs[m["module"].removeprefix(PEFT_PREFIX)][m["which"]] = value
    if others:
        what = ("LoRA on embeddings (lora_embedding_A/B)" if any("lora_embedding_" in k for k in others) else
                "whole tensors (modules_to_save, trainable tokens)")
        raise LoraError(f"{path}: cannot merge {what}: {_listing(others)}; llmcc merges lora_A/lora_B matrices only")
    if not pairs:
        raise LoraError(f"{path}: the adapter holds no lora_A/lora_B weights")

    modules = []
    for key, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise LoraError(f"{path}: '{key}' has no {missing}.weight")
        a, b = ab["A"], ab["B"]
        r = int(_pattern_value(config.get("rank_pattern"), key, config["r"]))
        alpha = float(_pattern_value(config.get("alpha_pattern"), key, config["lora_alpha"]))
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
            raise LoraError(f"{path}: '{key}' has lora_A {list(a.shape)} and lora_B {list(b.shape)}, but rank r={r} "
                            f"in adapter_config.json needs lora_A [{r}, in] and lora_B [out, {r}]")
        scale = (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r) * user_scale
        modules.append(LoraModule(key, a, b, scale))
    return LoraAdapter(path, user_scale, tuple(modules))


def _read_config(path: Path) -> dict:
    file = path / "adapter_config.json"
    if not file.exists():
        raise LoraError(f"{path}: not a PEFT adapter folder (no adapter_config.json)")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraError(f"{file}: not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise LoraError(f"{file}: expected a JSON object")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise LoraError(f"{path}: PEFT type {peft_type!r} is not supported; llmcc merges LoRA adapters "
                        f"(peft_type 'LORA') into the weights, and only those")
    for name, why in _UNMERGEABLE.items():
        if config.get(name):
            raise LoraError(f"{path}: cannot merge this adapter: {why}; llmcc merges plain LoRA adapters")
    for name in ("r", "lora_alpha"):
        if not isinstance(config.get(name), (int, float)) or config[name] <= 0:
            raise LoraError(f"{file}: '{name}' must be a positive number, not {config.get(name)!r}")
    return config


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    import torch

    safetensors_file, bin_file = path / "adapter_model.safetensors", path / "adapter_model.bin"
    if safetensors_file.exists():
        file = safetensors_file

        def load():
            from safetensors.torch import load_file

            return load_file(str(file))
    elif bin_file.exists():
        file = bin_file

        def load():
            return torch.load(str(file), map_location="cpu", weights_only=True)
    else:
        raise LoraError(f"{path}: no adapter_model.safetensors or adapter_model.bin")
    try:
        tensors = load()
    except Exception as exc:  # safetensors and pickle raise many kinds for a damaged file
        lines = str(exc).strip().splitlines()
        raise LoraError(f"{file}: cannot read ({type(exc).__name__}: {lines[0] if lines else ''})") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise LoraError(f"{file}: expected a mapping of tensor names to tensors")
    return {k: v.detach().to(torch.float32).numpy() for k, v in tensors.items()}


def _pattern_value(patterns, key: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first pattern that matches the end of the module path."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _listing(names) -> str:
    names = list(names)
    more = f" ... and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more


# ---------------------------------------------------------------------------------------------------------------------
# Weight sites in the ONNX graph.


@dataclass
class WeightSite:
    """An initializer used as a matmul weight by one module: what a LoRA delta is added to."""

    module: str  # the module path the graph records for the consuming node
    initializer: str
    transposed: bool  # stored [out, in] (nn.Linear's layout) rather than [in, out]
    out_in_shape: tuple[int, int]  # the weight's shape in nn.Linear's [out, in] layout
    uses: list[tuple[int, int]] = field(default_factory=list)  # (node index, input index) reading the initializer


def weight_sites(model: onnx.ModelProto) -> list[WeightSite]:
    """Every MatMul/Gemm weight in the top-level graph whose module path is known, one site per (module, weight)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    sites: dict[tuple[str, str, bool], WeightSite] = {}
    for i, node in enumerate(graph.node):
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        transposed = node.op_type == "Gemm" and attrs.get("transB", 0) == 1
        name, use = node.input[1], (i, 1)
        if name not in inits and name in producer:  # a weight transposed by its own node
            j = producer[name]
            t = graph.node[j]
            perm = [list(a.ints) for a in t.attribute if a.name == "perm"]
            if t.op_type == "Transpose" and t.input[0] in inits and perm in ([], [[1, 0]]):
                name, use, transposed = t.input[0], (j, 0), not transposed
        init = inits.get(name)
        if init is None or init.data_type not in _FLOAT_TYPES or len(init.dims) != 2:
            continue
        module = module_path(node, name)
        if module is None:
            continue
        rows, cols = init.dims
        site = sites.setdefault((module, name, transposed),
                                WeightSite(module, name, transposed, (rows, cols) if transposed else (cols, rows)))
        site.uses.append(use)
    return list(sites.values())


def _match(key: str, modules: dict[str, list[WeightSite]], adapter: Path) -> str | None:
    """The graph module whose path and ``key`` share the longest dotted suffix that is all of one of them."""
    wanted = key.split(".")
    best, found = 0, []
    for module in modules:
        path = module.split(".")
        n = min(len(path), len(wanted))
        if path[-n:] == wanted[-n:]:
            if n > best:
                best, found = n, [module]
            elif n == best:
                found.append(module)
    if len(found) > 1:
        raise LoraError(f"{adapter}: adapter module '{key}' matches several weights of the ONNX graph equally well: "
                        f"{_listing(found)}")
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------------------------------
# Merging.


def merge_adapters(model: onnx.ModelProto, adapters: list[LoraAdapter]) -> tuple[onnx.ModelProto, list[dict]]:
    """A copy of ``model`` with every adapter's deltas added to its weights, and one report entry per adapter."""
    sites = weight_sites(model)
    modules: dict[str, list[WeightSite]] = defaultdict(list)
    for site in sites:
        modules[site.module].append(site)
    deltas: dict[int, np.ndarray] = {}  # id(site) -> summed delta in [out, in]
    report = []
    for adapter in adapters:
        claimed: dict[str, str] = {}  # graph module -> adapter key
        unmatched = []
        for lora in adapter.modules:
            target = _match(lora.key, modules, adapter.path)
            if target is None:
                unmatched.append(lora.key)
                continue
            if target in claimed:
                raise LoraError(f"{adapter.path}: adapter modules '{claimed[target]}' and '{lora.key}' both match "
                                f"'{target}' in the ONNX graph")
            claimed[target] = lora.key
            delta = lora.delta()
            for site in modules[target]:
                if delta.shape != site.out_in_shape:
                    raise LoraError(
                        f"{adapter.path}: '{lora.key}' gives a {list(delta.shape)} update (lora_B @ lora_A, [out, in]) "
                        f"but ONNX initializer '{site.initializer}' of '{site.module}' is {list(site.out_in_shape)} "
                        f"as [out, in]")
                deltas[id(site)] = deltas.get(id(site), 0) + delta
        if unmatched:
            known = _listing(sorted(modules)[:3]) if modules else "none"
            raise LoraError(f"{adapter.path}: {len(unmatched)} adapter module(s) match no weight of the ONNX graph: "
                            f"{_listing(unmatched)} (the graph's matmul weights are at e.g. {known})")
        report.append({"path": str(adapter.path), "scale": adapter.scale, "merged_weights": len(claimed)})
    return _apply(model, [(s, deltas[id(s)]) for s in sites if id(s) in deltas]), report


def _name_uses(graph) -> Counter:
    """How often each name is read: node inputs (subgraphs included) and graph outputs."""
    uses = Counter(out.name for out in graph.output)
    for node in graph.node:
        uses.update(n for n in node.input if n)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                uses.update(_name_uses(sub))
    return uses


def _apply(model: onnx.ModelProto, updates: list[tuple[WeightSite, np.ndarray]]) -> onnx.ModelProto:
    merged = onnx.ModelProto()
    merged.CopyFrom(model)
    graph = merged.graph
    inits = {t.name: t for t in graph.initializer}
    uses_left = _name_uses(graph)
    taken = set(inits) | {n for node in graph.node for n in node.output} | {i.name for i in graph.input}
    for site, delta in updates:
        init = inits[site.initializer]
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise LoraError(f"ONNX initializer '{init.name}' is stored in an external file that was not loaded; "
                            f"load the model with its external data")
        weight = numpy_helper.to_array(init)
        new = (weight.astype(np.float32) + (delta if site.transposed else delta.T)).astype(weight.dtype)
        if uses_left[init.name] > len(site.uses):  # read elsewhere too (tied weights): the module gets its own copy
            name = _fresh_name(f"{init.name}.lora", taken)
            graph.initializer.append(numpy_helper.from_array(new, name))
            for node_index, input_index in site.uses:
                graph.node[node_index].input[input_index] = name
            uses_left[init.name] -= len(site.uses)
        else:
            init.CopyFrom(numpy_helper.from_array(new, init.name))
    return merged


def _fresh_name(base: str, taken: set[str]) -> str:
    name, n = base, 1
    while name in taken:
        name, n = f"{base}{n}", n + 1
    taken.add(name)
    return name
