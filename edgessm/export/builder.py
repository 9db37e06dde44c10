"""A small deterministic ONNX graph builder.

Graphs are written node by node with ``onnx.helper``: every name comes from a scope prefix and a
counter, initializers are added in construction order, so the same model always serialises to
the same bytes. Scan bodies are built with a child builder that shares the counter.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from onnx import AttributeProto, GraphProto, NodeProto, TensorProto, helper, numpy_helper

DOMAIN = "edgessm"  # custom-op domain (docs/onnx_ops.md)


class GraphBuilder:
    """Collects nodes and initializers; ``op`` emits a node and returns its output name(s)."""

    def __init__(self, prefix: str = "", counter: Iterator[int] | None = None, taken: set[str] | None = None) -> None:
        self.nodes: list[NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._scope: list[str] = [prefix] if prefix else []
        self._counter = counter if counter is not None else itertools.count()
        self._taken = taken if taken is not None else set()
        self._consts: dict[tuple[str, bytes, tuple[int, ...]], str] = {}

    # ---- naming ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def fresh(self, hint: str) -> str:
        """A new unique tensor/node name under the current scope."""
        while True:
            name = "/".join([*self._scope, f"{hint}_{next(self._counter)}"])
            if name not in self._taken:
                self._taken.add(name)
                return name

    def child(self, hint: str) -> GraphBuilder:
        """A builder for a subgraph body (Scan); names stay unique across both graphs."""
        return GraphBuilder("/".join([*self._scope, hint]), self._counter, self._taken)

    # ---- tensors -----------------------------------------------------------------------------
    def initializer(self, name: str, value: np.ndarray) -> str:
        if name in self._taken:
            raise ValueError(f"duplicate tensor name {name!r} in the ONNX graph")
        self._taken.add(name)
        return self._add_initializer(name, value)

    def initializer_proto(self, tensor: TensorProto) -> str:
        """A ready TensorProto (e.g. int4, which numpy has no dtype for)."""
        if tensor.name in self._taken:
            raise ValueError(f"duplicate tensor name {tensor.name!r} in the ONNX graph")
        self._taken.add(tensor.name)
        self.initializers.append(tensor)
        return tensor.name

    def _add_initializer(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        """A small constant as an initializer, shared between identical uses."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.tobytes(), arr.shape)
        if key not in self._consts:
            self._consts[key] = self._add_initializer(self.fresh("const"), arr)
        return self._consts[key]

    def i64(self, *values: int) -> str:
        return self.const(list(values), np.int64)

    # ---- nodes -------------------------------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, *, outputs: Sequence[str] | None = None,
           domain: str = "", **attrs: Any) -> Any:
        """Emit one node. Returns its output name (one output) or a list of names."""
        outs = list(outputs) if outputs is not None else [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh(op_type), domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def graph(self, name: str, inputs: list[Any], outputs: list[Any], prune: bool = False) -> GraphProto:
        """The graph; with ``prune``, nodes and initializers nothing depends on are left out."""
        nodes, inits = self.nodes, self.initializers
        if prune:
            nodes = _live_nodes(nodes, {o.name for o in outputs})
            used = {n for node in nodes for n in _consumed(node)}
            inits = [t for t in inits if t.name in used]
        return helper.make_graph(nodes, name, inputs, outputs, initializer=inits)

    # ---- common patterns ---------------------------------------------------------------------
    def silu(self, x: str) -> str:
        return self.op("Mul", [x, self.op("Sigmoid", [x])])

    def unsqueeze(self, x: str, *axes: int) -> str:
        return self.op("Unsqueeze", [x, self.i64(*axes)])

    def squeeze(self, x: str, *axes: int) -> str:
        return self.op("Squeeze", [x, self.i64(*axes)])

    def transpose(self, x: str, perm: Sequence[int]) -> str:
        return self.op("Transpose", [x], perm=list(perm))

    def reshape(self, x: str, shape: Sequence[int] | str) -> str:
        return self.op("Reshape", [x, shape if isinstance(shape, str) else self.i64(*shape)])

    def split(self, x: str, sizes: Sequence[int], axis: int = -1) -> list[str]:
        return self.op("Split", [x, self.i64(*sizes)], len(sizes), axis=axis)

    def gather(self, x: str, index: int, axis: int) -> str:
        """x[..., index, ...] along ``axis`` with that axis removed."""
        return self.op("Gather", [x, self.const(index, np.int64)], axis=axis)

    def dim(self, x: str, axis: int) -> str:
        """The runtime size of one axis as a 1-element int64 tensor."""
        return self.op("Shape", [x], start=axis, end=axis + 1)


def _consumed(node: NodeProto) -> set[str]:
    """Every name a node reads, including outer-scope names read inside its subgraphs (Scan bodies)."""
    names = set(node.input)
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            for inner in attr.g.node:
                names |= _consumed(inner)
    return names


def _live_nodes(nodes: list[NodeProto], outputs: set[str]) -> list[NodeProto]:
    """Nodes whose outputs reach the graph outputs (walked backwards, order kept)."""
    needed, live = set(outputs), []
    for node in reversed(nodes):
        if needed.intersection(node.output):
            live.append(node)
            needed |= _consumed(node)
    return live[::-1]
