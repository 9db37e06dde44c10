"""Each `edgessm` custom op, as a one-node ONNX graph run by ONNX Runtime through ort_ops' lowering,
against the float64 reference op of edgessm.ops (docs/onnx_ops.md semantics and input order)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from edgessm.export.builder import DOMAIN
from edgessm.export.schemas import register_schemas
from edgessm.ops import causal_conv1d, causal_conv1d_update, selective_scan, selective_state_update, ssd_scan, ssd_state_update
from edgessm.ops.hadamard import hadamard_base, hadamard_factor, hadamard_transform
from edgessm.runtime.ort_ops import lower_custom_ops
from tests.conftest import rel_err

B, D, N, K = 2, 24, 6, 4
H, P, G, NS = 4, 8, 2, 5


def _run(op: str, inputs: dict[str, np.ndarray], n_out: int, io: int, chunk: int, **attrs) -> list[np.ndarray]:
    """Build the one-node graph, check it (strict), lower it and run it; inputs keep their order."""
    register_schemas()
    outs = [f"out{i}" for i in range(n_out)]
    node = helper.make_node(op, list(inputs), outs, domain=DOMAIN, **attrs)
    vin = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in inputs.items()]
    vout = [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outs]
    model = helper.make_model(helper.make_graph([node], "g", vin, vout), ir_version=10,
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)])
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    for vi in model.graph.output:  # the schema's inference typed every output
        assert vi.type.tensor_type.elem_type != TensorProto.UNDEFINED, vi.name
    lowered = lower_custom_ops(model, chunk_mamba1=chunk, chunk_mamba2=chunk)
    onnx.checker.check_model(lowered, full_check=True)
    sess = ort.InferenceSession(lowered.SerializeToString(), providers=["CPUExecutionProvider"])
    results = sess.run(None, inputs)
    for r in results:
        assert np.isfinite(r.astype(np.float64)).all()
    return results


def _rand(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float64))


def _io(a: np.ndarray, io: np.dtype) -> np.ndarray:
    return a.astype(io)


TOL = {np.float32: 1e-5, np.float16: 5e-3}
LENGTHS = (1, 5, 13)  # chunk 4: one partial chunk, one exact+partial, several


@pytest.mark.parametrize("io", [np.float32, np.float16])
@pytest.mark.parametrize("length", LENGTHS)
def test_causal_conv1d(io, length: int) -> None:
    rng = np.random.default_rng(length)
    x, w, b = _io(_rand(rng, B, D, length), io), _rand(rng, D, K, scale=0.5), _rand(rng, D)
    y, state = _run("CausalConv1d", {"x": x, "weight": w, "bias": b}, 2, io, 4, silu=1)
    ry, rs = causal_conv1d(_t(x), _t(w), _t(b))
    assert y.dtype == io and state.shape == (B, D, K - 1)
    assert rel_err(torch.from_numpy(y.astype(np.float64)), ry) < TOL[io]
    assert rel_err(torch.from_numpy(state.astype(np.float64)), rs) < TOL[io]


def test_causal_conv1d_update() -> None:
    rng = np.random.default_rng(0)
    x, s, w, b = _rand(rng, B, D), _rand(rng, B, D, K - 1), _rand(rng, D, K), _rand(rng, D)
    y, new = _run("CausalConv1dUpdate", {"x": x, "conv_state": s, "weight": w, "bias": b}, 2, TensorProto.FLOAT, 4, silu=0)
    ry, rs = causal_conv1d_update(_t(x), _t(s), _t(w), _t(b), silu=False)
    assert rel_err(torch.from_numpy(y), ry) < 1e-6 and rel_err(torch.from_numpy(new), rs) == 0.0


def _m1_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"A": -np.exp(_rand(rng, D, N, scale=0.5)), "Dskip": _rand(rng, D)}


@pytest.mark.parametrize("io", [np.float32, np.float16])
@pytest.mark.parametrize("length", LENGTHS)
def test_selective_scan(io, length: int) -> None:
    rng = np.random.default_rng(10 + length)
    p = _m1_params(rng)
    u, delta, z = (_io(_rand(rng, B, D, length), io) for _ in range(3))
    bm, cm = (_io(_rand(rng, B, N, length), io) for _ in range(2))
    bias = _rand(rng, D, scale=0.5)
    feeds = {"u": u, "delta": delta, "A": p["A"], "Bm": bm, "Cm": cm, "Dskip": p["Dskip"], "z": z, "delta_bias": bias}
    y, state = _run("SelectiveScan", feeds, 2, io, 4, delta_softplus=1)
    # Compare the scan part alone too (y without the D skip), so a wrong C or decay cannot hide behind D*u.
    ry, rs = selective_scan(_t(u), _t(delta), _t(p["A"]), _t(bm), _t(cm), _t(p["Dskip"]), _t(z), _t(bias), True)
    assert y.dtype == io and state.dtype == np.float32
    assert rel_err(torch.from_numpy(y.astype(np.float64)), ry) < TOL[io]
    assert rel_err(torch.from_numpy(state), rs) < TOL[io]
    feeds["Dskip"] = np.zeros_like(p["Dskip"])
    y0, _ = _run("SelectiveScan", feeds, 2, io, 4, delta_softplus=1)
    ry0, _ = selective_scan(_t(u), _t(delta), _t(p["A"]), _t(bm), _t(cm), None, _t(z), _t(bias), True)
    assert rel_err(torch.from_numpy(y0.astype(np.float64)), ry0) < TOL[io]


def test_selective_state_update() -> None:
    rng = np.random.default_rng(3)
    p = _m1_params(rng)
    state, x, dt, z = _rand(rng, B, D, N), _rand(rng, B, D), _rand(rng, B, D), _rand(rng, B, D)
    bm, cm, bias = _rand(rng, B, N), _rand(rng, B, N), _rand(rng, D)
    feeds = {"state": state, "x": x, "dt": dt, "A": p["A"], "Bm": bm, "Cm": cm, "Dskip": np.zeros(D, np.float32),
             "z": z, "dt_bias": bias}
    y, new = _run("SelectiveStateUpdate", feeds, 2, TensorProto.FLOAT, 1, dt_softplus=1)
    ry, rs = selective_state_update(_t(state), _t(x), _t(dt), _t(p["A"]), _t(bm), _t(cm), None, _t(z), _t(bias), True)
    assert rel_err(torch.from_numpy(y), ry) < 1e-5 and rel_err(torch.from_numpy(new), rs) < 1e-5


@pytest.mark.parametrize("limits", [(0.0, math.inf), (0.05, 0.5)])
@pytest.mark.parametrize("length", LENGTHS)
def test_ssd_scan(length: int, limits: tuple[float, float]) -> None:
    rng = np.random.default_rng(20 + length)
    x, dt = _rand(rng, B, length, H, P), _rand(rng, B, length, H)
    bm, cm = _rand(rng, B, length, G, NS), _rand(rng, B, length, G, NS)
    A, bias = -np.exp(_rand(rng, H, scale=0.5)), _rand(rng, H, scale=0.5)
    feeds = {"x": x, "dt": dt, "A": A, "Bm": bm, "Cm": cm, "Dskip": np.zeros(H, np.float32), "dt_bias": bias}
    attrs = {"dt_softplus": 1, "dt_min": limits[0], "dt_max": limits[1], "chunk_size": 256}
    y, state = _run("SSDScan", feeds, 2, TensorProto.FLOAT, 4, **attrs)
    ry, rs = ssd_scan(_t(x), _t(dt), _t(A), _t(bm), _t(cm), None, _t(bias), True, limits)
    assert y.shape == (B, length, H, P) and state.shape == (B, H, P, NS)
    assert rel_err(torch.from_numpy(y), ry) < 1e-5 and rel_err(torch.from_numpy(state), rs) < 1e-5


def test_ssd_state_update() -> None:
    rng = np.random.default_rng(5)
    state, x, dt = _rand(rng, B, H, P, NS), _rand(rng, B, H, P), _rand(rng, B, H)
    bm, cm = _rand(rng, B, G, NS), _rand(rng, B, G, NS)
    A, dskip, bias = -np.exp(_rand(rng, H)), _rand(rng, H), _rand(rng, H)
    feeds = {"state": state, "x": x, "dt": dt, "A": A, "Bm": bm, "Cm": cm, "Dskip": dskip, "dt_bias": bias}
    y, new = _run("SSDStateUpdate", feeds, 2, TensorProto.FLOAT, 1, dt_softplus=1, dt_min=0.0, dt_max=0.3)
    ry, rs = ssd_state_update(_t(state), _t(x), _t(dt), _t(A), _t(bm), _t(cm), _t(dskip), _t(bias), True, (0.0, 0.3))
    assert rel_err(torch.from_numpy(y), ry) < 1e-5 and rel_err(torch.from_numpy(new), rs) < 1e-5


@pytest.mark.parametrize("n", [64, 40 * 4])
def test_hadamard_transform(n: int) -> None:
    rng = np.random.default_rng(n)
    x = _rand(rng, 3, 2, n)
    m = hadamard_factor(n)[0]
    (y,) = _run("HadamardTransform", {"x": x, "had_m": hadamard_base(m).numpy()}, 1, TensorProto.FLOAT, 1,
                scale=1.0 / math.sqrt(n))
    assert rel_err(torch.from_numpy(y), hadamard_transform(_t(x))) < 1e-5


def _codes(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.integers(-128, 128, shape).astype(np.int8)


def test_quant_selective_scan() -> None:
    """Quant op = float op on q * scale (u per channel, the rest per tensor)."""
    rng = np.random.default_rng(7)
    length = 9
    p = _m1_params(rng)
    q = {k: _codes(rng, *s) for k, s in (("u", (B, D, length)), ("delta", (B, D, length)), ("Bm", (B, N, length)),
                                        ("Cm", (B, N, length)), ("z", (B, D, length)))}
    scales = {"u_scale": (0.02 * rng.random(D) + 0.005).astype(np.float32), "delta_scale": np.float32([0.01]),
              "B_scale": np.float32([0.015]), "C_scale": np.float32([0.02]), "z_scale": np.float32([0.03])}
    bias = _rand(rng, D, scale=0.5)
    feeds = {"u": q["u"], "delta": q["delta"], "A": p["A"], "Bm": q["Bm"], "Cm": q["Cm"], "Dskip": p["Dskip"],
             "z": q["z"], "delta_bias": bias, **scales}
    y, state = _run("QuantSelectiveScan", feeds, 2, TensorProto.FLOAT, 4, delta_softplus=1, out_dtype=TensorProto.FLOAT)
    deq = {k: _t(v) * _t(scales[s]).reshape(-1, 1) if k == "u" else _t(v) * float(scales[s][0])
           for k, v, s in ((k, q[k], s) for k, s in (("u", "u_scale"), ("delta", "delta_scale"), ("Bm", "B_scale"),
                                                      ("Cm", "C_scale"), ("z", "z_scale")))}
    ry, rs = selective_scan(deq["u"], deq["delta"], _t(p["A"]), deq["Bm"], deq["Cm"], _t(p["Dskip"]), deq["z"], _t(bias), True)
    assert y.dtype == np.float32
    assert rel_err(torch.from_numpy(y), ry) < 1e-5 and rel_err(torch.from_numpy(state), rs) < 1e-5


def test_quant_ssd_state_update() -> None:
    rng = np.random.default_rng(8)
    state, dt = _rand(rng, B, H, P, NS), _rand(rng, B, H)
    qx, qb, qc = _codes(rng, B, H, P), _codes(rng, B, G, NS), _codes(rng, B, G, NS)
    xs = (0.02 * rng.random(H * P) + 0.005).astype(np.float32)
    bs, cs = (0.02 * rng.random(G) + 0.005).astype(np.float32), (0.02 * rng.random(G) + 0.005).astype(np.float32)
    A, dskip, bias = -np.exp(_rand(rng, H)), _rand(rng, H), _rand(rng, H)
    feeds = {"state": state, "x": qx, "dt": dt, "A": A, "Bm": qb, "Cm": qc, "Dskip": dskip, "dt_bias": bias,
             "x_scale": xs, "B_scale": bs, "C_scale": cs}
    y, new = _run("QuantSSDStateUpdate", feeds, 2, TensorProto.FLOAT, 1, dt_softplus=1, out_dtype=TensorProto.FLOAT)
    x = _t(qx) * _t(xs).reshape(H, P)
    bm, cm = _t(qb) * _t(bs)[:, None], _t(qc) * _t(cs)[:, None]
    ry, rs = ssd_state_update(_t(state), x, _t(dt), _t(A), bm, cm, _t(dskip), _t(bias), True)
    assert rel_err(torch.from_numpy(y), ry) < 1e-5 and rel_err(torch.from_numpy(new), rs) < 1e-5


@pytest.mark.parametrize("length", [1, 11])
def test_quant_ssd_scan(length: int) -> None:
    rng = np.random.default_rng(9 + length)
    dt = _rand(rng, B, length, H)
    qx, qb, qc = _codes(rng, B, length, H, P), _codes(rng, B, length, G, NS), _codes(rng, B, length, G, NS)
    xs = (0.02 * rng.random(H * P) + 0.005).astype(np.float32)
    bs, cs = (0.02 * rng.random(G) + 0.005).astype(np.float32), (0.02 * rng.random(G) + 0.005).astype(np.float32)
    A, dskip, bias = -np.exp(_rand(rng, H)), _rand(rng, H), _rand(rng, H)
    feeds = {"x": qx, "dt": dt, "A": A, "Bm": qb, "Cm": qc, "Dskip": dskip, "dt_bias": bias,
             "x_scale": xs, "B_scale": bs, "C_scale": cs}
    y, state = _run("QuantSSDScan", feeds, 2, TensorProto.FLOAT, 4, dt_softplus=1, chunk_size=64,
                    out_dtype=TensorProto.FLOAT)
    x = _t(qx) * _t(xs).reshape(H, P)
    bm, cm = _t(qb) * _t(bs)[:, None], _t(qc) * _t(cs)[:, None]
    ry, rs = ssd_scan(x, _t(dt), _t(A), bm, cm, _t(dskip), _t(bias), True)
    assert rel_err(torch.from_numpy(y), ry) < 1e-5 and rel_err(torch.from_numpy(state), rs) < 1e-5


def test_hadamard_quantize() -> None:
    rng = np.random.default_rng(11)
    n, out_scale = 128, 0.01
    x = _rand(rng, 4, n)
    (q,) = _run("HadamardQuantize", {"x": x, "had_m": hadamard_base(1).numpy()}, 1, TensorProto.FLOAT, 1,
                scale=1.0 / math.sqrt(n), out_scale=out_scale)
    ref = torch.clamp(torch.round(hadamard_transform(_t(x)) / out_scale), -128, 127)
    assert q.dtype == np.int8
    # identical codes except where float32 vs float64 rotation lands within rounding distance of a .5
    assert (torch.from_numpy(q.astype(np.int64)) - ref).abs().max() <= 1
    assert (torch.from_numpy(q.astype(np.int64)) == ref).double().mean() > 0.99
