"""The `edgessm` custom ops in ONNX Runtime: each custom node is rewritten into its standard-op
lowering (``edgessm.export.lowering``) when a plugin-mode graph is opened.

Why a rewrite and not a custom-op kernel (docs/export.md, "Custom ops in ONNX Runtime"):
onnxruntime-extensions' Python ops only register in the ``ai.onnx.contrib`` domain, reject
float16 ("Type float16 not supported by python customops api") and return outputs through
Python lists (about 0.4 s per million floats, measured); a compiled kernel library would need
ONNX Runtime's C API headers, which the pip wheel does not ship and CI cannot fetch. The rewrite
needs no extra package, runs at the speed of the portable graphs, and still checks the plugin
graph against the op contract, since every lowering reads its inputs in contract order.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import ModelProto, TensorProto, helper

from edgessm.export.builder import DOMAIN, GraphBuilder
from edgessm.export.lowering import Node, lower
from edgessm.export.onnx_export import DEFAULT_CHUNK_MAMBA1, DEFAULT_CHUNK_MAMBA2
from edgessm.export.schemas import OP_SPECS, register_schemas

Shape = list[int | str | None]


def _known_types(model: ModelProto) -> dict[str, tuple[int, Shape]]:
    """Element type and shape of every tensor of the main graph, after ONNX shape inference."""
    register_schemas()
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    known: dict[str, tuple[int, Shape]] = {}
    graph = inferred.graph
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        t = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim] \
            if t.HasField("shape") else None
        known[vi.name] = (t.elem_type, shape)
    for init in graph.initializer:
        known[init.name] = (init.data_type, list(init.dims))
    return known


def _io_dtype(op_type: str, inputs: list[str], known: dict[str, tuple[int, Shape]], attrs: dict) -> int:
    """The activation dtype of a node: ``out_dtype`` (Quant* ops), else the type of its first input typed "T"."""
    if "out_dtype" in attrs:
        return int(attrs["out_dtype"])
    for (_, type_str), name in zip(OP_SPECS[op_type].inputs, inputs):
        if type_str == "T" and name in known:
            return known[name][0]
    return TensorProto.FLOAT


def lower_custom_ops(model: ModelProto, chunk_mamba1: int = DEFAULT_CHUNK_MAMBA1,
                     chunk_mamba2: int = DEFAULT_CHUNK_MAMBA2) -> ModelProto:
    """A copy of ``model`` with every `edgessm` node replaced by standard ONNX nodes."""
    known = _known_types(model)
    out = ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    taken = {n for node in graph.node for n in [*node.input, *node.output, node.name]}
    taken |= {t.name for t in graph.initializer} | {v.name for v in graph.input}
    b = GraphBuilder("ort_lowered", taken=taken)
    chunks = {"SelectiveScan": chunk_mamba1, "SSDScan": chunk_mamba2, "QuantSelectiveScan": chunk_mamba1,
              "QuantSSDScan": chunk_mamba2}
    for node in model.graph.node:
        if node.domain != DOMAIN:
            b.nodes.append(node)
            continue
        if node.op_type not in OP_SPECS:
            raise ValueError(f"node {node.name}: unknown edgessm op {node.op_type!r} (known: {sorted(OP_SPECS)})")
        inputs, outputs = list(node.input), list(node.output)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        shapes = [known.get(i, (0, None))[1] for i in inputs]
        with b.scope(node.name or node.op_type):
            lower(b, Node(node.op_type, inputs, outputs, attrs, shapes, _io_dtype(node.op_type, inputs, known, attrs)),
                  chunks.get(node.op_type))
    del graph.node[:]
    graph.node.extend(b.nodes)
    graph.initializer.extend(b.initializers)
    opsets = [o for o in out.opset_import if o.domain != DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(opsets)
    return out


def load_for_ort(path: str | Path, chunk_mamba1: int = DEFAULT_CHUNK_MAMBA1,
                 chunk_mamba2: int = DEFAULT_CHUNK_MAMBA2) -> bytes:
    """The serialized graph at ``path`` with custom ops lowered; external weights stay on disk
    (open it with ``session.model_external_initializers_file_folder_path`` set to its folder)."""
    model = onnx.load(str(path), load_external_data=False)
    return lower_custom_ops(model, chunk_mamba1, chunk_mamba2).SerializeToString()
