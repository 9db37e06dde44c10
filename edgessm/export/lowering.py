"""Standard-ONNX lowerings of the `edgessm` custom ops (docs/onnx_ops.md).

One function per op, taking the op's inputs in contract order. ``--scan portable`` export calls
them in place of custom nodes, and ``edgessm.runtime.ort_ops`` calls them to rewrite the custom
nodes of a plugin-mode graph for ONNX Runtime, so both modes compute with the same subgraphs.

Prefill scans run as an ONNX ``Scan`` over chunks of ``chunk`` tokens, chained through the
Scan state. Inside a chunk, Mamba-2 uses the SSD chunk form of ``edgessm.ops.ssd_scan(..., chunk_size=...)``
(masked cumulative log-decays, exponentiated, then MatMuls); Mamba-1, whose state has a decay per
(channel, state) pair, computes every step's decay and input at once and unrolls the ``chunk``
cheap recurrence steps. The sequence is zero-padded to a multiple of ``chunk`` after
discretisation, where a zero step (dt = 0) leaves the state unchanged. docs/export.md records
the measurements behind these choices and the default chunk sizes.

All arithmetic is float32; float16 activations are cast on the way in and out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from onnx import TensorProto, helper

from edgessm.export.builder import GraphBuilder
from edgessm.ops.hadamard import hadamard_factor, hadamard_matrix

Shape = Sequence[int | str | None] | None


class LoweringError(ValueError):
    """A custom node cannot be lowered (a dimension that must be static is not)."""


@dataclass
class Node:
    """A custom op instance: contract-ordered inputs/outputs, attributes and known input shapes."""

    op_type: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    shapes: list[Shape] = field(default_factory=list)
    io_dtype: int = TensorProto.FLOAT

    def dim(self, i: int, axis: int, what: str) -> int:
        shape = self.shapes[i] if i < len(self.shapes) else None
        d = None if shape is None or axis >= len(shape) else shape[axis]
        if not isinstance(d, int):
            raise LoweringError(
                f"{self.op_type}: input {i} ({self.inputs[i]}) needs a static {what} (axis {axis}), got shape {shape}"
            )
        return d


# ---- helpers ------------------------------------------------------------------------------------
def _f32(b: GraphBuilder, x: str, node: Node) -> str:
    return x if node.io_dtype == TensorProto.FLOAT else b.op("Cast", [x], to=TensorProto.FLOAT)


def _io(b: GraphBuilder, x: str, node: Node, out: str) -> str:
    if node.io_dtype == TensorProto.FLOAT:
        return b.op("Identity", [x], outputs=[out])
    return b.op("Cast", [x], outputs=[out], to=node.io_dtype)


def _dt(b: GraphBuilder, dt: str, bias: str, softplus: bool, lo: float = 0.0, hi: float = math.inf) -> str:
    """softplus(dt + bias) clamped to [lo, hi] (the clamp only when it can bind)."""
    out = b.op("Add", [dt, bias])
    if softplus:
        out = b.op("Softplus", [out])
    if lo > 0.0 or math.isfinite(hi):
        out = b.op("Clip", [out, b.const(lo), b.const(hi if math.isfinite(hi) else np.finfo(np.float32).max)])
    return out


def _pad_to_chunks(b: GraphBuilder, xs: list[tuple[str, int]], length: str, axis: int, chunk: int) -> list[str]:
    """Zero-pad each (tensor, rank) along ``axis`` up to a multiple of ``chunk``."""
    if chunk == 1:
        return [x for x, _ in xs]
    c = b.i64(chunk)
    extra = b.op("Mod", [b.op("Sub", [c, b.op("Mod", [length, c])]), c])
    out = []
    for x, rank in xs:
        parts = [b.i64(*([0] * (rank + axis))), extra]  # begins of every axis, then the ends up to ``axis``
        if rank - axis - 1:
            parts.append(b.i64(*([0] * (rank - axis - 1))))
        out.append(b.op("Pad", [x, b.op("Concat", parts, axis=0)]))
    return out


def _chunk_masks(b: GraphBuilder, chunk: int) -> tuple[str, str]:
    """strict[r, s] = r > s (which steps a cumulative decay sums), lower[t, s] = t >= s (causality)."""
    idx = np.arange(chunk)
    return b.const(idx[:, None] > idx[None, :]), b.const(idx[:, None] >= idx[None, :])


def _segment_decay(b: GraphBuilder, a: str, strict: str, lower: str, axis: int) -> str:
    """decay[..., t, s] = exp(sum_{s < r <= t} a[..., r]) for t >= s, else 0; ``a``'s step axis is ``axis``.

    Summed from the masked steps themselves (not a difference of two cumulative sums), as in
    ``edgessm.ops.scan._segsum``, so it stays exact when the total decay is large.
    """
    rep = b.op("Mul", [b.unsqueeze(a, axis + 1), strict])  # [..., r, s]
    seg = b.op("CumSum", [rep, b.const(axis, np.int64)])  # [..., t, s]
    return b.op("Mul", [b.op("Exp", [seg]), lower])


def _scan(b: GraphBuilder, body: GraphBuilder, state0: str, scan_inputs: list[str], body_in: list[str],
          body_out: list[str], axes: Sequence[int], out_axis: int) -> tuple[str, str]:
    """An ONNX Scan with one state and one stacked output; returns (final state, stacked output)."""
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in body_in]
    vo = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in body_out]
    graph = body.graph(b.fresh("scan_body"), vi, vo)
    return b.op("Scan", [state0, *scan_inputs], 2, body=graph, num_scan_inputs=len(scan_inputs),
                scan_input_axes=list(axes), scan_output_axes=[out_axis])


# ---- causal conv --------------------------------------------------------------------------------
def causal_conv1d(b: GraphBuilder, node: Node) -> None:
    x, w, bias = node.inputs
    channels, width = node.dim(1, 0, "channel count"), node.dim(1, 1, "kernel width")
    window = b.op("Pad", [x, b.i64(0, 0, width - 1, 0, 0, 0)])  # [B, C, K-1+L]
    y = b.op("Conv", [_f32(b, window, node), b.unsqueeze(w, 1), bias], group=channels, kernel_shape=[width])
    if node.attrs.get("silu", 1):
        y = b.silu(y)
    _io(b, y, node, node.outputs[0])
    b.op("Slice", [window, b.i64(-(width - 1)), b.i64(np.iinfo(np.int64).max), b.i64(2)], outputs=[node.outputs[1]])


def causal_conv1d_update(b: GraphBuilder, node: Node) -> None:
    x, state, w, bias = node.inputs
    window = b.op("Concat", [state, b.unsqueeze(x, 2)], axis=2)  # [B, C, K]
    y = b.op("Add", [b.op("ReduceSum", [b.op("Mul", [_f32(b, window, node), w]), b.i64(2)], keepdims=0), bias])
    if node.attrs.get("silu", 1):
        y = b.silu(y)
    _io(b, y, node, node.outputs[0])
    b.op("Slice", [window, b.i64(1), b.i64(np.iinfo(np.int64).max), b.i64(2)], outputs=[node.outputs[1]])


# ---- Mamba-1 ------------------------------------------------------------------------------------
def _selective_chunk_body(b: GraphBuilder, A: str, chunk: int) -> tuple[GraphBuilder, list[str], list[str]]:
    """Scan body: state h [B, D, N]; per chunk dt, dt*u [B, D, c] and B, C [B, N, c] → (h', y [B, D, c]).

    The decays and inputs of all ``chunk`` steps are computed at once; the recurrence over the
    steps is unrolled (for Mamba-1's [D, N] state the quadratic chunked form costs O(D*N*c^2)
    per chunk and measured slower in ONNX Runtime than these c cheap element-wise steps).
    """
    body = b.child("scan")
    h, dt, xdt, bm, cm = (body.fresh(n) for n in ("h", "dt", "xdt", "B", "C"))
    decay = body.op("Exp", [body.op("Mul", [body.unsqueeze(dt, 2), b.unsqueeze(A, 2)])])  # [B, D, N, c]
    xb = body.op("Mul", [body.unsqueeze(xdt, 2), body.unsqueeze(bm, 1)])  # [B, D, N, c]
    steps = []
    state = h
    for t in range(chunk):
        state = body.op("Add", [body.op("Mul", [body.gather(decay, t, 3), state]), body.gather(xb, t, 3)])
        steps.append(body.unsqueeze(state, 3))
    traj = steps[0] if chunk == 1 else body.op("Concat", steps, axis=3)  # [B, D, N, c]: state after each step
    y = body.op("ReduceSum", [body.op("Mul", [traj, body.unsqueeze(cm, 1)]), body.i64(2)], keepdims=0)
    return body, [h, dt, xdt, bm, cm], [state, y]


def selective_scan(b: GraphBuilder, node: Node, chunk: int = 16) -> None:
    u, delta, A, bm, cm, dskip, z, delta_bias = node.inputs
    n_state = node.dim(2, 1, "state size")
    uf = _f32(b, u, node)
    dt = _dt(b, _f32(b, delta, node), b.unsqueeze(delta_bias, 1), bool(node.attrs.get("delta_softplus", 1)))
    length = b.dim(u, 2)
    seqs = _pad_to_chunks(b, [(dt, 3), (b.op("Mul", [dt, uf]), 3), (_f32(b, bm, node), 3), (_f32(b, cm, node), 3)],
                          length, 2, chunk)
    seqs = [b.reshape(s, [0, 0, -1, chunk]) for s in seqs]  # [B, *, n_chunks, c]
    h0 = b.op("ConstantOfShape", [b.op("Concat", [b.op("Shape", [u], start=0, end=2), b.i64(n_state)], axis=0)],
              value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    body, body_in, body_out = _selective_chunk_body(b, A, chunk)
    h_final, ys = _scan(b, body, h0, seqs, body_in, body_out, [2] * 4, 2)
    y = b.op("Slice", [b.reshape(ys, [0, 0, -1]), b.i64(0), length, b.i64(2)])
    y = b.op("Add", [y, b.op("Mul", [uf, b.unsqueeze(dskip, 1)])])
    y = b.op("Mul", [y, b.silu(_f32(b, z, node))])
    _io(b, y, node, node.outputs[0])
    b.op("Identity", [h_final], outputs=[node.outputs[1]])


def selective_state_update(b: GraphBuilder, node: Node) -> None:
    state, x, dt, A, bm, cm, dskip, z, dt_bias = node.inputs
    xf = _f32(b, x, node)
    step = _dt(b, _f32(b, dt, node), dt_bias, bool(node.attrs.get("dt_softplus", 1)))  # [B, D]
    decay = b.op("Exp", [b.op("Mul", [b.unsqueeze(step, 2), A])])  # [B, D, N]
    inject = b.op("Mul", [b.unsqueeze(b.op("Mul", [step, xf]), 2), b.unsqueeze(_f32(b, bm, node), 1)])
    new_state = b.op("Add", [b.op("Mul", [decay, state]), inject], outputs=[node.outputs[1]])
    y = b.squeeze(b.op("MatMul", [new_state, b.unsqueeze(_f32(b, cm, node), 2)]), 2)
    y = b.op("Mul", [b.op("Add", [y, b.op("Mul", [xf, dskip])]), b.silu(_f32(b, z, node))])
    _io(b, y, node, node.outputs[0])


# ---- Mamba-2 ------------------------------------------------------------------------------------
def _heads(b: GraphBuilder, t: str, n_heads: int, n_groups: int, n_state: int, group_axis: int) -> str:
    """Repeat the group axis of B/C so head h reads group h // (H / G)."""
    if n_heads == n_groups:
        return t
    rep = [1] * (group_axis + 3)
    rep[group_axis + 1] = n_heads // n_groups
    expanded = b.op("Expand", [b.unsqueeze(t, group_axis + 1), b.i64(*rep)])
    return b.reshape(expanded, [0] * group_axis + [n_heads, n_state])


def _ssd_chunk_body(b: GraphBuilder, chunk: int) -> tuple[GraphBuilder, list[str], list[str]]:
    """Scan body: state S [B, H, P, N]; per chunk a [B, c, H], x*dt [B, c, H, P], B, C [B, c, H, N]."""
    body = b.child("scan")
    s, a, xdt, bm, cm = (body.fresh(n) for n in ("S", "a", "xdt", "B", "C"))
    a_t = body.transpose(a, [0, 2, 1])  # [B, H, c]
    from_start = body.op("Exp", [body.op("CumSum", [a_t, body.const(2, np.int64)])])  # [B, H, t]
    c_t = body.transpose(cm, [0, 2, 1, 3])  # [B, H, c, N]
    b_t = body.transpose(bm, [0, 2, 1, 3])
    x_t = body.transpose(xdt, [0, 2, 1, 3])  # [B, H, c, P]
    strict, lower = _chunk_masks(b, chunk)
    decay = _segment_decay(body, a_t, strict, lower, 2)  # [B, H, t, s]
    scores = body.op("Mul", [body.op("MatMul", [c_t, body.transpose(b_t, [0, 1, 3, 2])]), decay])
    y = body.op("MatMul", [scores, x_t])
    carried = body.op("MatMul", [c_t, body.transpose(s, [0, 1, 3, 2])])  # [B, H, c, P]
    y = body.op("Add", [y, body.op("Mul", [carried, body.unsqueeze(from_start, 3)])])
    weighted = body.op("Mul", [x_t, body.unsqueeze(body.gather(decay, chunk - 1, 2), 3)])  # [B, H, s, P]
    s_new = body.op("Add", [
        body.op("Mul", [body.unsqueeze(body.gather(from_start, chunk - 1, 2), 2, 3), s]),
        body.op("MatMul", [body.transpose(weighted, [0, 1, 3, 2]), b_t]),
    ])
    return body, [s, a, xdt, bm, cm], [s_new, body.transpose(y, [0, 2, 1, 3])]


def ssd_scan(b: GraphBuilder, node: Node, chunk: int = 32) -> None:
    x, dt, A, bm, cm, dskip, dt_bias = node.inputs
    heads, hdim = node.dim(0, 2, "head count"), node.dim(0, 3, "head dim")
    groups, n_state = node.dim(3, 2, "group count"), node.dim(3, 3, "state size")
    xf = _f32(b, x, node)
    step = _dt(b, _f32(b, dt, node), dt_bias, bool(node.attrs.get("dt_softplus", 1)),
               float(node.attrs.get("dt_min", 0.0)), float(node.attrs.get("dt_max", math.inf)))  # [B, L, H]
    a = b.op("Mul", [step, A])
    xdt = b.op("Mul", [xf, b.unsqueeze(step, 3)])
    bh = _heads(b, _f32(b, bm, node), heads, groups, n_state, 2)
    ch = _heads(b, _f32(b, cm, node), heads, groups, n_state, 2)
    length = b.dim(x, 1)
    a, xdt, bh, ch = _pad_to_chunks(b, [(a, 3), (xdt, 4), (bh, 4), (ch, 4)], length, 1, chunk)
    seqs = [b.reshape(a, [0, -1, chunk, heads])]  # [B, n_chunks, c, ...]
    seqs += [b.reshape(t, [0, -1, chunk, heads, d]) for t, d in ((xdt, hdim), (bh, n_state), (ch, n_state))]
    s0 = b.op("ConstantOfShape", [b.op("Concat", [b.dim(x, 0), b.i64(heads, hdim, n_state)], axis=0)],
              value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    body, body_in, body_out = _ssd_chunk_body(b, chunk)
    s_final, ys = _scan(b, body, s0, seqs, body_in, body_out, [1] * 4, 1)
    y = b.op("Slice", [b.reshape(ys, [0, -1, heads, hdim]), b.i64(0), length, b.i64(1)])
    y = b.op("Add", [y, b.op("Mul", [xf, b.unsqueeze(dskip, 1)])])
    _io(b, y, node, node.outputs[0])
    b.op("Identity", [s_final], outputs=[node.outputs[1]])


def ssd_state_update(b: GraphBuilder, node: Node) -> None:
    state, x, dt, A, bm, cm, dskip, dt_bias = node.inputs
    heads, groups, n_state = node.dim(1, 1, "head count"), node.dim(4, 1, "group count"), node.dim(4, 2, "state size")
    xf = _f32(b, x, node)
    step = _dt(b, _f32(b, dt, node), dt_bias, bool(node.attrs.get("dt_softplus", 1)),
               float(node.attrs.get("dt_min", 0.0)), float(node.attrs.get("dt_max", math.inf)))  # [B, H]
    bh = _heads(b, _f32(b, bm, node), heads, groups, n_state, 1)  # [B, H, N]
    ch = _heads(b, _f32(b, cm, node), heads, groups, n_state, 1)
    decay = b.unsqueeze(b.op("Exp", [b.op("Mul", [step, A])]), 2, 3)
    inject = b.op("Mul", [b.unsqueeze(b.op("Mul", [b.unsqueeze(step, 2), xf]), 3), b.unsqueeze(bh, 2)])
    new_state = b.op("Add", [b.op("Mul", [decay, state]), inject], outputs=[node.outputs[1]])
    y = b.squeeze(b.op("MatMul", [new_state, b.unsqueeze(ch, 3)]), 3)  # [B, H, P]
    _io(b, b.op("Add", [y, b.op("Mul", [xf, b.unsqueeze(dskip, 1)])]), node, node.outputs[0])


# ---- Hadamard -----------------------------------------------------------------------------------
def hadamard_transform(b: GraphBuilder, node: Node) -> None:
    """y = scale * H x along the last axis, as a MatMul with the constant (had_m ⊗ H_2^k)ᵀ."""
    x = node.inputs[0]
    n = node.dim(0, len(node.shapes[0] or ()) - 1, "last-axis size")
    m = node.dim(1, 0, "base order")
    if hadamard_factor(n)[0] != m:
        raise LoweringError(f"HadamardTransform: had_m is {m}x{m} but n={n} factors as {hadamard_factor(n)}")
    scale = float(node.attrs.get("scale", 1.0))
    matrix = (hadamard_matrix(n).numpy() * scale).T.astype(np.float32)
    _io(b, b.op("MatMul", [_f32(b, x, node), b.const(matrix)]), node, node.outputs[0])


def hadamard_quantize(b: GraphBuilder, node: Node) -> None:
    """HadamardTransform, then QuantizeLinear with ``out_scale`` (round half to even, saturate)."""
    rotated = b.fresh("rotated")
    hadamard_transform(b, Node("HadamardTransform", node.inputs, [rotated], {"scale": node.attrs.get("scale", 1.0)},
                               node.shapes, node.io_dtype))
    out_scale = b.const(float(node.attrs["out_scale"]))
    b.op("QuantizeLinear", [_f32(b, rotated, node), out_scale, b.const(0, np.int8)], outputs=[node.outputs[0]])


# Quant* ops: int8 input → (its scale input, the shape the scale is reshaped to so that it
# broadcasts against the tensor; None = as it is, a [1] or a last-axis [C] scale).
_QUANT_LAYOUT: dict[str, dict[str, tuple[str, Callable[[Node], list[int]] | None]]] = {
    "QuantSelectiveScan": {"u": ("u_scale", lambda n: [-1, 1]), "delta": ("delta_scale", None),
                           "Bm": ("B_scale", None), "Cm": ("C_scale", None), "z": ("z_scale", None)},
    "QuantSelectiveStateUpdate": {"x": ("x_scale", None), "dt": ("dt_scale", None), "Bm": ("B_scale", None),
                                  "Cm": ("C_scale", None), "z": ("z_scale", None)},
    "QuantSSDScan": {"x": ("x_scale", lambda n: [n.dim(0, 2, "head count"), -1]), "Bm": ("B_scale", lambda n: [-1, 1]),
                     "Cm": ("C_scale", lambda n: [-1, 1])},
    "QuantSSDStateUpdate": {"x": ("x_scale", lambda n: [n.dim(1, 1, "head count"), -1]),
                            "Bm": ("B_scale", lambda n: [-1, 1]), "Cm": ("C_scale", lambda n: [-1, 1])},
}


def quant_scan(b: GraphBuilder, node: Node, chunk: int | None = None) -> None:
    """A Quant* scan: dequantize each int8 input as ``q * scale`` (broadcast per channel/group),
    then the float op's lowering with ``out_dtype`` as the activation dtype."""
    from edgessm.export.schemas import OP_SPECS

    float_op = node.op_type.removeprefix("Quant")
    names = [n for n, _ in OP_SPECS[node.op_type].inputs]
    args = list(node.inputs[: len(OP_SPECS[float_op].inputs)])
    for tensor, (scale_name, shape) in _QUANT_LAYOUT[node.op_type].items():
        i = names.index(tensor)
        scale = node.inputs[names.index(scale_name)]
        if shape is not None:
            scale = b.reshape(scale, shape(node))
        args[i] = b.op("Mul", [b.op("Cast", [node.inputs[i]], to=TensorProto.FLOAT), scale])
    attrs = {k: v for k, v in node.attrs.items() if k != "out_dtype"}
    io = int(node.attrs.get("out_dtype", TensorProto.FLOAT))
    lower(b, Node(float_op, args, node.outputs, attrs, node.shapes[: len(args)], io), chunk)


LOWERINGS: dict[str, Callable[..., None]] = {
    "HadamardQuantize": hadamard_quantize,
    "QuantSelectiveScan": quant_scan,
    "QuantSelectiveStateUpdate": quant_scan,
    "QuantSSDScan": quant_scan,
    "QuantSSDStateUpdate": quant_scan,
    "CausalConv1d": causal_conv1d,
    "CausalConv1dUpdate": causal_conv1d_update,
    "SelectiveScan": selective_scan,
    "SelectiveStateUpdate": selective_state_update,
    "SSDScan": ssd_scan,
    "SSDStateUpdate": ssd_state_update,
    "HadamardTransform": hadamard_transform,
}
CHUNKED = ("SelectiveScan", "SSDScan", "QuantSelectiveScan", "QuantSSDScan")


def lower(b: GraphBuilder, node: Node, chunk: int | None = None) -> None:
    """Emit the standard-op subgraph of one custom node into ``b`` (writing ``node.outputs``)."""
    fn = LOWERINGS.get(node.op_type)
    if fn is None:
        raise LoweringError(f"no standard-ONNX lowering for edgessm op {node.op_type!r} (have {sorted(LOWERINGS)})")
    if node.op_type in CHUNKED and chunk is not None:
        fn(b, node, chunk=chunk)
    else:
        fn(b, node)
