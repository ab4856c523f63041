"""Which model module an ONNX node came from: the name LoRA adapters and the quantization report use for a layer.

From, in this order: the node's ``pkg.torch.onnx.name_scopes`` metadata, else its ``namespace`` (torch's default
exporter renames each Linear weight ``val_N`` and records the module only there, e.g.
``[..., 'hf.model.layers.0.self_attn.q_proj', 'linear']``: the last scope is the node itself); the weight
initializer's name without ``.weight`` where the exporter kept it; the legacy exporter's node name scope
(``/blocks.0/up/MatMul``).
"""

from __future__ import annotations

import ast

import onnx


def module_path(node: onnx.NodeProto, initializer: str = "") -> str | None:
    meta = {p.key: p.value for p in node.metadata_props}
    try:
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
    except (ValueError, SyntaxError):
        scopes = []
    if isinstance(scopes, list) and len(scopes) >= 2 and isinstance(scopes[-2], str) and scopes[-2]:
        return scopes[-2]  # the last scope is the node itself, the one before it the module that ran it
    namespace = meta.get("namespace", "").split("/")
    if len(namespace) >= 2 and namespace[-2].split(": ")[0]:
        return namespace[-2].split(": ")[0]  # "<module path>: <class>/.../<node>: <op>"
    if initializer.endswith(".weight"):
        return initializer[: -len(".weight")]
    parts = node.name.split("/")
    if node.name.startswith("/") and len(parts) > 2:
        return ".".join(parts[1:-1])
    return None
