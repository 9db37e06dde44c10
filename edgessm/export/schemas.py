"""ONNX schemas of the custom `edgessm` ops (docs/onnx_ops.md), registered with ``onnx.defs``.

Registering them lets ``onnx.checker.check_model(full_check=True)`` and
``onnx.shape_inference.infer_shapes(strict_mode=True)`` check every custom node (arity, input
types, attributes) and propagate output types and shapes through it, instead of skipping the
node as an unknown op. Registration is process-wide and idempotent: ``register_schemas()``.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnx import TensorProto, TypeProto, defs
from onnx.shape_inference import InferenceContext

from edgessm.export.builder import DOMAIN

IO = "T"  # activation dtype: float32 or float16
F32 = "tensor(float)"
I8 = "tensor(int8)"

# A dim spec is (input index, axis) -> copy that dim, or (input index, axis, delta) -> that dim + delta.
DimSpec = tuple[int, ...]


@dataclass(frozen=True)
class OutSpec:
    name: str
    dtype: str  # IO, F32, I8, or "attr" (the out_dtype attribute)
    shape: tuple[DimSpec, ...]
    dtype_from: int = 0  # which input's element type IO refers to


@dataclass(frozen=True)
class OpSpec:
    name: str
    inputs: tuple[tuple[str, str], ...]
    outputs: tuple[OutSpec, ...]
    attrs: tuple[tuple[str, int], ...]  # (name, OpSchema.AttrType value)


_INT = defs.OpSchema.AttrType.INT
_FLOAT = defs.OpSchema.AttrType.FLOAT


def _same(i: int, rank: int) -> tuple[DimSpec, ...]:
    return tuple((i, a) for a in range(rank))


_SCAN_ATTRS = (("dt_softplus", _INT), ("dt_min", _FLOAT), ("dt_max", _FLOAT))
_M1_SCAN_IN = (("u", IO), ("delta", IO), ("A", F32), ("Bm", IO), ("Cm", IO), ("Dskip", F32), ("z", IO), ("delta_bias", F32))
_M1_STEP_IN = (("state", F32), ("x", IO), ("dt", IO), ("A", F32), ("Bm", IO), ("Cm", IO), ("Dskip", F32), ("z", IO), ("dt_bias", F32))
_M2_SCAN_IN = (("x", IO), ("dt", IO), ("A", F32), ("Bm", IO), ("Cm", IO), ("Dskip", F32), ("dt_bias", F32))
_M2_STEP_IN = (("state", F32), ("x", IO), ("dt", IO), ("A", F32), ("Bm", IO), ("Cm", IO), ("Dskip", F32), ("dt_bias", F32))


def _quant(inputs: tuple[tuple[str, str], ...], int8: set[str], scales: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    return tuple((n, I8 if n in int8 else t) for n, t in inputs) + tuple((s, F32) for s in scales)


OP_SPECS: dict[str, OpSpec] = {
    s.name: s
    for s in (
        OpSpec("CausalConv1d", (("x", IO), ("weight", F32), ("bias", F32)),
               (OutSpec("y", IO, _same(0, 3)), OutSpec("conv_state", IO, ((0, 0), (0, 1), (1, 1, -1)))),
               (("silu", _INT),)),
        OpSpec("CausalConv1dUpdate", (("x", IO), ("conv_state", IO), ("weight", F32), ("bias", F32)),
               (OutSpec("y", IO, _same(0, 2)), OutSpec("new_conv_state", IO, _same(1, 3))), (("silu", _INT),)),
        OpSpec("SelectiveScan", _M1_SCAN_IN,
               (OutSpec("y", IO, _same(0, 3)), OutSpec("final_state", F32, ((0, 0), (0, 1), (2, 1)))),
               (("delta_softplus", _INT),)),
        OpSpec("SelectiveStateUpdate", _M1_STEP_IN,
               (OutSpec("y", IO, _same(1, 2), 1), OutSpec("new_state", F32, _same(0, 3))), (("dt_softplus", _INT),)),
        OpSpec("SSDScan", _M2_SCAN_IN,
               (OutSpec("y", IO, _same(0, 4)), OutSpec("final_state", F32, ((0, 0), (0, 2), (0, 3), (3, 3)))),
               _SCAN_ATTRS + (("chunk_size", _INT),)),
        OpSpec("SSDStateUpdate", _M2_STEP_IN,
               (OutSpec("y", IO, _same(1, 3), 1), OutSpec("new_state", F32, _same(0, 4))), _SCAN_ATTRS),
        OpSpec("HadamardTransform", (("x", IO), ("had_m", F32)), (OutSpec("y", IO, _same(0, -1)),), (("scale", _FLOAT),)),
        OpSpec("HadamardQuantize", (("x", IO), ("had_m", F32)), (OutSpec("y", I8, _same(0, -1)),),
               (("scale", _FLOAT), ("out_scale", _FLOAT))),
        OpSpec("QuantSelectiveScan",
               _quant(_M1_SCAN_IN, {"u", "delta", "Bm", "Cm", "z"}, ("u_scale", "delta_scale", "B_scale", "C_scale", "z_scale")),
               (OutSpec("y", "attr", _same(0, 3)), OutSpec("final_state", F32, ((0, 0), (0, 1), (2, 1)))),
               (("delta_softplus", _INT), ("out_dtype", _INT))),
        OpSpec("QuantSelectiveStateUpdate",
               _quant(_M1_STEP_IN, {"x", "dt", "Bm", "Cm", "z"}, ("x_scale", "dt_scale", "B_scale", "C_scale", "z_scale")),
               (OutSpec("y", "attr", _same(1, 2)), OutSpec("new_state", F32, _same(0, 3))),
               (("dt_softplus", _INT), ("out_dtype", _INT))),
        OpSpec("QuantSSDScan", _quant(_M2_SCAN_IN, {"x", "Bm", "Cm"}, ("x_scale", "B_scale", "C_scale")),
               (OutSpec("y", "attr", _same(0, 4)), OutSpec("final_state", F32, ((0, 0), (0, 2), (0, 3), (3, 3)))),
               _SCAN_ATTRS + (("chunk_size", _INT), ("out_dtype", _INT))),
        OpSpec("QuantSSDStateUpdate", _quant(_M2_STEP_IN, {"x", "Bm", "Cm"}, ("x_scale", "B_scale", "C_scale")),
               (OutSpec("y", "attr", _same(1, 3)), OutSpec("new_state", F32, _same(0, 4))),
               _SCAN_ATTRS + (("out_dtype", _INT),)),
    )
}


def _out_type(ctx: InferenceContext, spec: OutSpec) -> TypeProto | None:
    src = ctx.get_input_type(spec.dtype_from)
    if src is None or not src.HasField("tensor_type"):
        return None
    out = TypeProto()
    if spec.dtype == IO:
        out.tensor_type.elem_type = src.tensor_type.elem_type
    elif spec.dtype == F32:
        out.tensor_type.elem_type = TensorProto.FLOAT
    elif spec.dtype == I8:
        out.tensor_type.elem_type = TensorProto.INT8
    else:
        attr = ctx.get_attribute("out_dtype")
        out.tensor_type.elem_type = attr.i if attr is not None else TensorProto.FLOAT
    if spec.shape == _same(spec.dtype_from, -1):
        if src.tensor_type.HasField("shape"):
            out.tensor_type.shape.CopyFrom(src.tensor_type.shape)
        return out
    dims = out.tensor_type.shape.dim
    for d in spec.shape:
        t = ctx.get_input_type(d[0])
        dim = dims.add()
        if t is None or not t.tensor_type.HasField("shape") or len(t.tensor_type.shape.dim) <= d[1]:
            continue
        in_dim = t.tensor_type.shape.dim[d[1]]
        if len(d) == 3:
            if in_dim.HasField("dim_value"):
                dim.dim_value = in_dim.dim_value + d[2]
        else:
            dim.CopyFrom(in_dim)
    return out


def _inference(spec: OpSpec):
    def infer(ctx: InferenceContext) -> None:
        for i, out in enumerate(spec.outputs):
            t = _out_type(ctx, out)
            if t is not None and i < ctx.get_num_outputs():
                ctx.set_output_type(i, t)

    return infer


def _used(spec: OpSpec) -> list[str]:
    """Type constraints a schema uses: IO for activations, O for an out_dtype-typed output."""
    used = [IO] if any(t == IO for _, t in spec.inputs) else []
    return used + (["O"] if any(o.dtype == "attr" for o in spec.outputs) else [])


def _schema(spec: OpSpec) -> defs.OpSchema:
    param = defs.OpSchema.FormalParameter
    schema = defs.OpSchema(
        spec.name, DOMAIN, 1, f"edgessm custom op {spec.name} (docs/onnx_ops.md)",
        inputs=[param(n, t) for n, t in spec.inputs],
        outputs=[param(o.name, {IO: IO, F32: F32, I8: I8}.get(o.dtype, "O")) for o in spec.outputs],
        type_constraints=[(c, ["tensor(float)", "tensor(float16)"], "float32 or float16") for c in _used(spec)],
        attributes=[defs.OpSchema.Attribute(n, t, "see docs/onnx_ops.md", required=False) for n, t in spec.attrs],
    )
    schema.set_type_and_shape_inference_function(_inference(spec))
    return schema


def register_schemas() -> None:
    for spec in OP_SPECS.values():
        if not defs.has(spec.name, DOMAIN):
            defs.register_schema(_schema(spec))
