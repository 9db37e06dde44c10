"""Correctness harness for libedgessm_kernels.so against the float64 references in reference.py.

For every kernel, dtype and case: fresh random inputs, outputs poisoned (NaN for float tensors,
random bytes for int8), one launch, comparison of every output with the reference by
||out - ref|| / ||ref||. Prints a PASS/FAIL table and exits nonzero on any failure.

    python plugins/harness/check_kernels.py [--lib build/plugins/libedgessm_kernels.so] [--json F]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference as ref  # noqa: E402
from essm_lib import (  # noqa: E402
    CUDA_ERROR_INVALID_VALUE,
    DTYPE_NAMES,
    ESSM_BF16,
    ESSM_F16,
    ESSM_F32,
    ESSM_I8,
    SSD_VARIANTS,
    TORCH_DTYPES,
    KernelLib,
    ScanScales,
    SsdScales,
    ptr,
    scan_scales,
)

log = logging.getLogger("check_kernels")

# ||out - ref|| / ||ref|| limits by the dtype of the output tensor (fp32 math everywhere).
TOLERANCE = {ESSM_F32: 1e-4, ESSM_F16: 2e-3, ESSM_BF16: 1.2e-2}
FLOAT_IO = (ESSM_F32, ESSM_F16, ESSM_BF16)
QUANT_OUT = (ESSM_F16, ESSM_F32, ESSM_BF16)  # out dtypes tested with int8 inputs
# Prefill-scan variants (essm_tuning_set_scan_variant): (variant, segments) -> label.
SCAN_VARIANTS = {(0, 0): "auto", (1, 0): "chunked/r1", (2, 0): "chunked/r2", (3, 1): "seq/S1", (3, 4): "seq/S4",
                 (3, 32): "seq/S32", (4, 0): "seq1", (5, 0): "cluster", (5, 2): "cluster/S2", (5, 8): "cluster/S8",
                 (5, 32): "cluster/S32", (6, 2): "single-block/S2", (6, 4): "single-block/S4"}
SEQ_MAX_STATE = 16  # the sequential variants (3-6) handle dstate <= 16


@dataclass
class Result:
    kernel: str
    case: str
    dtype: str
    tensor: str
    rel_err: float
    tol: float
    ok: bool


class Checker:
    def __init__(self, lib: KernelLib, seed: int) -> None:
        self.lib = lib
        self.rng = np.random.default_rng(seed)
        self.results: list[Result] = []

    # ---- tensors -------------------------------------------------------------------------------
    def dev(self, values: np.ndarray, dtype: int) -> tuple[torch.Tensor, np.ndarray]:
        """Device tensor of `dtype` and the float64 values it actually holds."""
        t = torch.from_numpy(np.ascontiguousarray(values)).to("cuda", TORCH_DTYPES[dtype])
        return t, t.to(torch.float64).cpu().numpy()

    def normal(self, shape: tuple[int, ...], dtype: int, std: float = 1.0) -> tuple[torch.Tensor, np.ndarray]:
        return self.dev(self.rng.normal(0.0, std, shape).astype(np.float32), dtype)

    def f32(self, values: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        return self.dev(values.astype(np.float32), ESSM_F32)

    def int8(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, np.ndarray]:
        return self.dev(self.rng.integers(-127, 128, shape).astype(np.int8), ESSM_I8)

    def poisoned(self, shape: tuple[int, ...], dtype: int) -> torch.Tensor:
        if dtype == ESSM_I8:
            return torch.from_numpy(self.rng.integers(-128, 128, shape).astype(np.int8)).cuda()
        return torch.full(shape, float("nan"), dtype=TORCH_DTYPES[dtype], device="cuda")

    # ---- comparison ----------------------------------------------------------------------------
    def compare(self, kernel: str, case: str, dtype: str, tensor: str, out: torch.Tensor,
                expected: np.ndarray, tol: float) -> None:
        got = out.to(torch.float64).cpu().numpy()
        if got.shape != expected.shape:
            raise AssertionError(f"{kernel}/{case}: {tensor} shape {got.shape} != {expected.shape}")
        if not np.isfinite(got).all():
            err = math.inf  # NaN/inf: an unwritten (poisoned) or overflowed element never passes
        else:
            err = float(np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-30))
        self.results.append(Result(kernel, case, dtype, tensor, err, tol, err <= tol))

    def compare_int8(self, kernel: str, case: str, dtype: str, tensor: str, out: torch.Tensor,
                     expected: np.ndarray) -> None:
        """int8 outputs: at most 1 LSB off (fp32 vs fp64 rounding at .5 ties), on <= 0.1% of them."""
        got = out.to(torch.int32).cpu().numpy()
        diff = np.abs(got - expected)
        frac = float((diff > 0).mean())
        ok = bool(diff.max() <= 1) and frac <= 1e-3
        self.results.append(Result(kernel, case, dtype, tensor + " (frac off by 1)", frac, 1e-3, ok))

    def expect_rejected(self, kernel: str, case: str, code: int) -> None:
        ok = code == CUDA_ERROR_INVALID_VALUE
        self.results.append(Result(kernel, case, "-", f"rejected (code {code})", 0.0 if ok else 1.0, 0.0, ok))

    # ---- causal conv1d --------------------------------------------------------------------------
    def conv(self, batch: int, dim: int, seqlen: int, width: int, io: int, silu: bool, bias: bool) -> None:
        case = f"B{batch} C{dim} L{seqlen} K{width} silu{int(silu)} bias{int(bias)}"
        x, x64 = self.normal((batch, dim, seqlen), io)
        w, w64 = self.f32(self.rng.normal(0, 0.5, (dim, width)))
        b, b64 = self.f32(self.rng.normal(0, 0.5, dim)) if bias else (None, None)
        y = self.poisoned((batch, dim, seqlen), io)
        st = self.poisoned((batch, dim, width - 1), io)
        self.lib.call("essm_causal_conv1d_fwd", io, ptr(x), ptr(w), ptr(b), int(silu), ptr(y), ptr(st),
                      batch, dim, seqlen, width)
        torch.cuda.synchronize()
        y_ref, st_ref = ref.causal_conv1d(x64, w64, b64, silu)
        name = DTYPE_NAMES[io]
        self.compare("causal_conv1d_fwd", case, name, "y", y, y_ref, TOLERANCE[io])
        # the state is a copy of inputs: exact
        self.compare("causal_conv1d_fwd", case, name, "conv_state", st, st_ref, 0.0)

    def conv_update(self, batch: int, dim: int, width: int, io: int, in_place: bool) -> None:
        case = f"B{batch} C{dim} K{width} in_place{int(in_place)}"
        x, x64 = self.normal((batch, dim), io)
        s_in, s64 = self.normal((batch, dim, width - 1), io)
        w, w64 = self.f32(self.rng.normal(0, 0.5, (dim, width)))
        b, b64 = self.f32(self.rng.normal(0, 0.5, dim))
        y = self.poisoned((batch, dim), io)
        s_out = s_in if in_place else self.poisoned((batch, dim, width - 1), io)
        self.lib.call("essm_causal_conv1d_update", io, ptr(x), ptr(s_in), ptr(w), ptr(b), 1, ptr(y),
                      ptr(s_out), batch, dim, width)
        torch.cuda.synchronize()
        y_ref, s_ref = ref.causal_conv1d_update(x64, s64, w64, b64, True)
        name = DTYPE_NAMES[io]
        self.compare("causal_conv1d_update", case, name, "y", y, y_ref, TOLERANCE[io])
        self.compare("causal_conv1d_update", case, name, "conv_state", s_out, s_ref, 0.0)

    # ---- Mamba-1 ---------------------------------------------------------------------------------
    def _scan_inputs(self, shape_x: tuple[int, ...], shape_bc: tuple[int, ...], dim: int, in_dt: int,
                     out_dt: int, softplus: bool) -> dict:
        """u, delta, B, C, z on the device (+ float64 values) and the int8 scales if quantized."""
        if in_dt == ESSM_I8:
            u_scale, us64 = self.f32(self.rng.uniform(0.005, 0.03, dim))
            # delta, B, C, z scales: device scalars the kernels read (fresh values every case)
            tensor_scales, ts64 = self.f32(self.rng.uniform(1.5, 3.5, 4) / 127)
            dscale, bscale, cscale, zscale = ts64
            (u, uq), (d, dq), (bm, bq), (cm, cq), (z, zq) = (self.int8(s) for s in
                                                             (shape_x, shape_x, shape_bc, shape_bc, shape_x))
            chan = us64.reshape((1, dim) + (1,) * (len(shape_x) - 2))
            vals = dict(u=uq * chan, delta=dq * dscale, B=bq * bscale, C=cq * cscale, z=zq * zscale)
            if not softplus:
                vals["delta"] = np.abs(vals["delta"])
                d = d.abs()
            return dict(dev=dict(u=u, delta=d, B=bm, C=cm, z=z), vals=vals,
                        scales=scan_scales(u_scale, tensor_scales), keep=(u_scale, tensor_scales))
        u, u64 = self.normal(shape_x, in_dt)
        dnp = self.rng.normal(0, 1, shape_x).astype(np.float32)
        d, d64 = self.dev(dnp if softplus else np.abs(dnp) * 0.2, in_dt)
        bm, b64 = self.normal(shape_bc, in_dt)
        cm, c64 = self.normal(shape_bc, in_dt)
        z, z64 = self.normal(shape_x, in_dt)
        return dict(dev=dict(u=u, delta=d, B=bm, C=cm, z=z), vals=dict(u=u64, delta=d64, B=b64, C=c64, z=z64),
                    scales=None, keep=None)

    def scan(self, batch: int, dim: int, dstate: int, seqlen: int, in_dt: int, out_dt: int, *, gate: bool,
             init: bool, softplus: bool, skip: bool, variant: tuple[int, int]) -> None:
        case = (f"B{batch} D{dim} N{dstate} L{seqlen} z{int(gate)} h0{int(init)} sp{int(softplus)} "
                f"Dskip{int(skip)} {SCAN_VARIANTS[variant]}")
        dtname = f"{DTYPE_NAMES[in_dt]}->{DTYPE_NAMES[out_dt]}"
        io = self._scan_inputs((batch, dim, seqlen), (batch, dstate, seqlen), dim, in_dt, out_dt, softplus)
        dv, vals = io["dev"], io["vals"]
        A, A64 = self.f32(-np.exp(self.rng.uniform(-1.0, 2.5, (dim, dstate))))
        Dk, D64 = self.f32(self.rng.normal(0, 1, dim)) if skip else (None, None)
        db, db64 = self.f32(self.rng.uniform(-3.0, -1.0, dim)) if softplus else (None, None)
        h0, h064 = self.f32(self.rng.normal(0, 1, (batch, dim, dstate))) if init else (None, None)
        y = self.poisoned((batch, dim, seqlen), out_dt)
        hT = self.poisoned((batch, dim, dstate), ESSM_F32)
        self.lib.set_scan_variant(*variant)
        scales = io["scales"]
        self.lib.call("essm_selective_scan_fwd", in_dt, out_dt, ptr(dv["u"]), ptr(dv["delta"]), ptr(A),
                      ptr(dv["B"]), ptr(dv["C"]), ptr(Dk), ptr(dv["z"]) if gate else None, ptr(db),
                      int(softplus), scales, ptr(h0), ptr(y), ptr(hT),
                      batch, dim, dstate, seqlen)
        torch.cuda.synchronize()
        self.lib.set_scan_variant(0)
        y_ref, h_ref = ref.selective_scan(vals["u"], vals["delta"], A64, vals["B"], vals["C"], D64,
                                          vals["z"] if gate else None, db64, softplus, h064)
        self.compare("selective_scan_fwd", case, dtname, "y", y, y_ref, TOLERANCE[out_dt])
        self.compare("selective_scan_fwd", case, dtname, "final_state", hT, h_ref, TOLERANCE[ESSM_F32])

    def state_update(self, batch: int, dim: int, dstate: int, in_dt: int, out_dt: int, *, in_place: bool,
                     gate: bool, unaligned: bool = False) -> None:
        """`unaligned`: the state buffers start 4 bytes past a 16-byte boundary (the kernel must then
        move one state per access)."""
        case = f"B{batch} D{dim} N{dstate} z{int(gate)} in_place{int(in_place)}{' unaligned' if unaligned else ''}"
        dtname = f"{DTYPE_NAMES[in_dt]}->{DTYPE_NAMES[out_dt]}"
        io = self._scan_inputs((batch, dim), (batch, dstate), dim, in_dt, out_dt, True)
        dv, vals = io["dev"], io["vals"]
        A, A64 = self.f32(-np.exp(self.rng.uniform(-1.0, 2.5, (dim, dstate))))
        Dk, D64 = self.f32(self.rng.normal(0, 1, dim))
        db, db64 = self.f32(self.rng.uniform(-3.0, -1.0, dim))
        s_in, s64 = self.f32(self.rng.normal(0, 1, (batch, dim, dstate)))
        y = self.poisoned((batch, dim), out_dt)
        s_out = s_in if in_place else self.poisoned((batch, dim, dstate), ESSM_F32)
        if unaligned:
            s_in = shifted_copy(s_in)
            s_out = s_in if in_place else shifted_copy(s_out)
        self.lib.call("essm_selective_state_update", in_dt, out_dt, ptr(s_in), ptr(dv["u"]), ptr(dv["delta"]),
                      ptr(A), ptr(dv["B"]), ptr(dv["C"]), ptr(Dk), ptr(dv["z"]) if gate else None, ptr(db), 1,
                      io["scales"], ptr(y), ptr(s_out), batch, dim, dstate)
        torch.cuda.synchronize()
        y_ref, s_ref = ref.selective_state_update(s64, vals["u"], vals["delta"], A64, vals["B"], vals["C"], D64,
                                                  vals["z"] if gate else None, db64, True)
        self.compare("selective_state_update", case, dtname, "y", y, y_ref, TOLERANCE[out_dt])
        self.compare("selective_state_update", case, dtname, "state", s_out, s_ref, TOLERANCE[ESSM_F32])

    # ---- Mamba-2 SSD -----------------------------------------------------------------------------
    def _ssd_inputs(self, shape_x: tuple[int, ...], shape_bc: tuple[int, ...], nheads: int, headdim: int,
                    ngroups: int, in_dt: int) -> dict:
        if in_dt == ESSM_I8:
            # column 0 gets a zero scale: its x is zero whatever the int8 values (the kernels must not
            # divide by it or let its raw values reach the state)
            xs, xs64 = self.f32(np.concatenate([[0.0], self.rng.uniform(0.005, 0.03, nheads * headdim - 1)]))
            bs, bs64 = self.f32(self.rng.uniform(0.01, 0.04, ngroups))
            cs, cs64 = self.f32(self.rng.uniform(0.01, 0.04, ngroups))
            (x, xq), (bm, bq), (cm, cq) = self.int8(shape_x), self.int8(shape_bc), self.int8(shape_bc)
            lead_x = (1,) * (len(shape_x) - 2)
            lead_bc = (1,) * (len(shape_bc) - 2)
            vals = dict(x=xq * xs64.reshape(lead_x + (nheads, headdim)),
                        B=bq * bs64.reshape(lead_bc + (ngroups, 1)), C=cq * cs64.reshape(lead_bc + (ngroups, 1)))
            return dict(dev=dict(x=x, B=bm, C=cm), vals=vals, scales=SsdScales(ptr(xs), ptr(bs), ptr(cs)),
                        keep=(xs, bs, cs))
        x, x64 = self.normal(shape_x, in_dt)
        bm, b64 = self.normal(shape_bc, in_dt)
        cm, c64 = self.normal(shape_bc, in_dt)
        return dict(dev=dict(x=x, B=bm, C=cm), vals=dict(x=x64, B=b64, C=c64), scales=None, keep=None)

    def ssd(self, batch: int, seqlen: int, nheads: int, headdim: int, ngroups: int, dstate: int, in_dt: int,
            out_dt: int, *, init: bool, clamp: bool, variant: tuple[int, ...] = (0, 0), workspace: bool = True,
            softplus: bool = True) -> None:
        """One SSD prefill under `variant` (SSD_VARIANTS), with the workspace its split asks for (filled
        with NaN bytes), or none (`workspace=False`: the launcher must then not split). `softplus=False`
        takes dt as given, some of it negative (clamped at -0.05): decays above 1 inside a chunk, a cumsum
        of dt A that is not monotonic (SSD step 14 in docs/benchmarks.md tried an M that relies on it)."""
        case = (f"B{batch} L{seqlen} H{nheads} P{headdim} G{ngroups} N{dstate} h0{int(init)} clamp{int(clamp)} "
                f"sp{int(softplus)} {SSD_VARIANTS[variant]}{'' if workspace else ' no-workspace'}")
        dtname = f"{DTYPE_NAMES[in_dt]}->{DTYPE_NAMES[out_dt]}"
        io = self._ssd_inputs((batch, seqlen, nheads, headdim), (batch, seqlen, ngroups, dstate), nheads,
                              headdim, ngroups, in_dt)
        dv, vals = io["dev"], io["vals"]
        if softplus:
            dt, dt64 = self.normal((batch, seqlen, nheads), out_dt)
            db, db64 = self.f32(self.rng.uniform(-3.0, -1.0, nheads))
        else:
            dt, dt64 = self.dev(self.rng.uniform(-0.08, 0.3, (batch, seqlen, nheads)), out_dt)
            db, db64 = self.f32(self.rng.uniform(-0.01, 0.01, nheads))
        A, A64 = self.f32(-np.exp(self.rng.uniform(-1.0, 1.5, nheads)))
        Dk, D64 = self.f32(self.rng.normal(0, 1, nheads))
        dt_min, dt_max = (0.01, 0.2) if clamp else (0.0 if softplus else -0.05, math.inf)
        s0, s064 = self.f32(self.rng.normal(0, 1, (batch, nheads, headdim, dstate))) if init else (None, None)
        y = self.poisoned((batch, seqlen, nheads, headdim), out_dt)
        sT = self.poisoned((batch, nheads, headdim, dstate), ESSM_F32)
        with self.lib.forced_ssd_variant(variant):
            ws = self.lib.ssd_workspace(out_dt, batch, seqlen, nheads, headdim, dstate) if workspace else None
            self.lib.call("essm_ssd_scan_fwd", in_dt, out_dt, ptr(dv["x"]), ptr(dt), ptr(A), ptr(dv["B"]), ptr(dv["C"]),
                          ptr(Dk), ptr(db), int(softplus), dt_min, dt_max, io["scales"], ptr(s0), ptr(y), ptr(sT), batch,
                          seqlen, nheads, headdim, ngroups, dstate, 256, ptr(ws), 0 if ws is None else ws.numel())
            torch.cuda.synchronize()
        y_ref, s_ref = ref.ssd_scan(vals["x"], dt64, A64, vals["B"], vals["C"], D64, db64, softplus, dt_min, dt_max,
                                    s064)
        self.compare("ssd_scan_fwd", case, dtname, "y", y, y_ref, TOLERANCE[out_dt])
        self.compare("ssd_scan_fwd", case, dtname, "final_state", sT, s_ref, TOLERANCE[ESSM_F32])

    def ssd_update(self, batch: int, nheads: int, headdim: int, ngroups: int, dstate: int, in_dt: int,
                   out_dt: int, *, in_place: bool, clamp: bool) -> None:
        case = f"B{batch} H{nheads} P{headdim} G{ngroups} N{dstate} clamp{int(clamp)} in_place{int(in_place)}"
        dtname = f"{DTYPE_NAMES[in_dt]}->{DTYPE_NAMES[out_dt]}"
        io = self._ssd_inputs((batch, nheads, headdim), (batch, ngroups, dstate), nheads, headdim, ngroups, in_dt)
        dv, vals = io["dev"], io["vals"]
        dt, dt64 = self.normal((batch, nheads), out_dt)
        A, A64 = self.f32(-np.exp(self.rng.uniform(-1.0, 1.5, nheads)))
        Dk, D64 = self.f32(self.rng.normal(0, 1, nheads))
        db, db64 = self.f32(self.rng.uniform(-3.0, -1.0, nheads))
        dt_min, dt_max = (0.01, 0.2) if clamp else (0.0, math.inf)
        s_in, s64 = self.f32(self.rng.normal(0, 1, (batch, nheads, headdim, dstate)))
        y = self.poisoned((batch, nheads, headdim), out_dt)
        s_out = s_in if in_place else self.poisoned((batch, nheads, headdim, dstate), ESSM_F32)
        self.lib.call("essm_ssd_state_update", in_dt, out_dt, ptr(s_in), ptr(dv["x"]), ptr(dt), ptr(A), ptr(dv["B"]),
                      ptr(dv["C"]), ptr(Dk), ptr(db), 1, dt_min, dt_max, io["scales"], ptr(y), ptr(s_out), batch,
                      nheads, headdim, ngroups, dstate)
        torch.cuda.synchronize()
        y_ref, s_ref = ref.ssd_state_update(s64, vals["x"], dt64, A64, vals["B"], vals["C"], D64, db64, True,
                                            dt_min, dt_max)
        self.compare("ssd_state_update", case, dtname, "y", y, y_ref, TOLERANCE[out_dt])
        self.compare("ssd_state_update", case, dtname, "state", s_out, s_ref, TOLERANCE[ESSM_F32])

    # ---- Hadamard --------------------------------------------------------------------------------
    def hadamard(self, rows: int, m: int, logk: int, in_dt: int, quantize: bool) -> None:
        n = m << logk
        case = f"rows{rows} n{n} (m{m} x 2^{logk})"
        dtname = f"{DTYPE_NAMES[in_dt]}->{'i8' if quantize else DTYPE_NAMES[in_dt]}"
        x, x64 = self.normal((rows, n), in_dt)
        if m > 1:  # any +-1 base matrix exercises the Kronecker structure
            hm, hm64 = self.f32(self.rng.choice([-1.0, 1.0], (m, m)))
        else:
            hm, hm64 = None, np.ones((1, 1))
        scale = 1.0 / math.sqrt(n) if rows % 2 else float(self.rng.uniform(0.5, 2.0))
        v_ref = ref.hadamard_transform(x64, hm64, scale)
        if quantize:
            out_scale = float(np.abs(v_ref).max() / 127 * 0.8)  # ~2% of values saturate
            y = self.poisoned((rows, n), ESSM_I8)
            self.lib.call("essm_hadamard_transform", in_dt, ESSM_I8, ptr(x), ptr(hm), m, scale, out_scale, ptr(y),
                          rows, n)
            torch.cuda.synchronize()
            self.compare_int8("hadamard_transform", case, dtname, "y", y, ref.quantize_int8(v_ref, out_scale))
        else:
            y = self.poisoned((rows, n), in_dt)
            self.lib.call("essm_hadamard_transform", in_dt, in_dt, ptr(x), ptr(hm), m, scale, 1.0, ptr(y), rows, n)
            torch.cuda.synchronize()
            self.compare("hadamard_transform", case, dtname, "y", y, v_ref, TOLERANCE[in_dt])

    # ---- argument validation ---------------------------------------------------------------------
    def rejections(self) -> None:
        t = torch.zeros(4096, dtype=torch.float32, device="cuda")
        p = ptr(t)
        lib = self.lib
        self.expect_rejected("hadamard_transform", "m=3", lib.status(
            "essm_hadamard_transform", ESSM_F32, ESSM_F32, p, p, 3, 1.0, 1.0, p, 1, 24))
        self.expect_rejected("hadamard_transform", "n=40*1024 > 32768", lib.status(
            "essm_hadamard_transform", ESSM_F32, ESSM_F32, p, p, 40, 1.0, 1.0, p, 1, 40 * 1024))
        self.expect_rejected("hadamard_transform", "n/m not a power of 2", lib.status(
            "essm_hadamard_transform", ESSM_F32, ESSM_F32, p, p, 12, 1.0, 1.0, p, 1, 36))
        self.expect_rejected("ssd_scan_fwd", "dstate=24", lib.status(
            "essm_ssd_scan_fwd", ESSM_F32, ESSM_F32, p, p, p, p, p, p, p, 1, 0.0, math.inf, None, None, p, None,
            1, 1, 1, 1, 1, 24, 256, None, 0))
        self.expect_rejected("ssd_scan_fwd", "workspace bytes without a workspace", lib.status(
            "essm_ssd_scan_fwd", ESSM_F16, ESSM_F16, p, p, p, p, p, p, p, 1, 0.0, math.inf, None, None, p, None,
            1, 64, 1, 64, 1, 128, 256, None, 4096))
        self.expect_rejected("ssd_scan_fwd", "workspace not 16-byte aligned", lib.status(
            "essm_ssd_scan_fwd", ESSM_F16, ESSM_F16, p, p, p, p, p, p, p, 1, 0.0, math.inf, None, None, p, None,
            1, 64, 1, 64, 1, 128, 256, p + 4, 4092))
        self.expect_rejected("selective_scan_fwd", "f16 in, f32 out", lib.status(
            "essm_selective_scan_fwd", ESSM_F16, ESSM_F32, p, p, p, p, p, None, None, None, 1, None, None, p, None,
            1, 1, 16, 8))
        self.expect_rejected("selective_scan_fwd", "int8 without scales", lib.status(
            "essm_selective_scan_fwd", ESSM_I8, ESSM_F16, p, p, p, p, p, None, None, None, 1, None, None, p, None,
            1, 1, 16, 8))
        for missing in ("delta_scale", "B_scale", "C_scale", "z_scale"):
            partial = ScanScales(p, p, p, p, p)
            setattr(partial, missing, None)
            self.expect_rejected("selective_scan_fwd", f"int8 with NULL {missing}", lib.status(
                "essm_selective_scan_fwd", ESSM_I8, ESSM_F16, p, p, p, p, p, None, None, None, 1, partial, None, p,
                None, 1, 1, 16, 8))
            self.expect_rejected("selective_state_update", f"int8 with NULL {missing}", lib.status(
                "essm_selective_state_update", ESSM_I8, ESSM_F16, p, p, p, p, p, p, None, None, None, 1, partial, p,
                p, 1, 1, 16))
        self.expect_rejected("selective_state_update", "dstate=257", lib.status(
            "essm_selective_state_update", ESSM_F32, ESSM_F32, p, p, p, p, p, p, None, None, None, 1, None, p,
            p, 1, 1, 257))
        self.expect_rejected("ssd_state_update", "dstate=272", lib.status(
            "essm_ssd_state_update", ESSM_F32, ESSM_F32, p, p, p, p, p, p, None, None, 1, 0.0, math.inf, None, p, p,
            1, 1, 1, 1, 272))
        self.expect_rejected("causal_conv1d_fwd", "width=9", lib.status(
            "essm_causal_conv1d_fwd", ESSM_F32, p, p, None, 1, p, None, 1, 1, 8, 9))
        torch.cuda.synchronize()


def shifted_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` whose data starts one element past its allocation's (16-byte aligned) start."""
    view = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
    view.copy_(t)
    return view


def run_all(chk: Checker, only: set[str] | None = None) -> None:
    """Run every case, or only those whose label (conv, scan, ssd, hadamard, ...) is in `only`."""
    cases: list[tuple[str, Callable[[], None]]] = []
    add = cases.append
    for io in FLOAT_IO:
        for (b, c, l, k) in [(2, 37, 1000, 4), (1, 5, 1, 4), (3, 130, 7, 2), (1, 3, 2100, 4), (2, 9, 33, 1)]:
            add(("conv", lambda b=b, c=c, l=l, k=k, io=io: chk.conv(b, c, l, k, io, silu=k != 2, bias=l != 7)))
        add(("conv_update", lambda io=io: chk.conv_update(3, 77, 4, io, in_place=False)))
        add(("conv_update", lambda io=io: chk.conv_update(1, 130, 4, io, in_place=True)))
    pairs = [(io, io) for io in FLOAT_IO] + [(ESSM_I8, o) for o in QUANT_OUT]
    for in_dt, out_dt in pairs:
        scan_cases = [
            dict(batch=2, dim=37, dstate=16, seqlen=1000, gate=True, init=False, softplus=True, skip=True),
            dict(batch=1, dim=5, dstate=16, seqlen=1, gate=True, init=True, softplus=True, skip=True),
            dict(batch=2, dim=70, dstate=16, seqlen=2100, gate=True, init=True, softplus=True, skip=True),
            dict(batch=3, dim=9, dstate=8, seqlen=37, gate=False, init=True, softplus=False, skip=False),
            dict(batch=3, dim=13, dstate=64, seqlen=7, gate=False, init=True, softplus=False, skip=False),
            dict(batch=1, dim=6, dstate=256, seqlen=1100, gate=True, init=True, softplus=True, skip=True),
            dict(batch=2, dim=11, dstate=24, seqlen=2100, gate=True, init=False, softplus=True, skip=True),
        ]
        for sc in scan_cases:
            for var in SCAN_VARIANTS:
                if var[0] >= 3 and sc["dstate"] > SEQ_MAX_STATE:
                    continue
                add(("scan", lambda sc=sc, var=var, i=in_dt, o=out_dt: chk.scan(in_dt=i, out_dt=o, variant=var, **sc)))
        for (b, d, n, ip, g) in [(2, 37, 16, False, True), (1, 130, 64, True, True), (3, 11, 256, False, False),
                                 (2, 9, 24, True, True), (2, 33, 128, False, True), (2, 19, 13, True, True),
                                 (1, 7, 250, False, True)]:  # dstate % 4 != 0: one state per access
            add(("state_update", lambda b=b, d=d, n=n, ip=ip, g=g, i=in_dt, o=out_dt:
                 chk.state_update(b, d, n, i, o, in_place=ip, gate=g)))
        for ip in (False, True):
            add(("state_update", lambda ip=ip, i=in_dt, o=out_dt:
                 chk.state_update(2, 37, 16, i, o, in_place=ip, gate=True, unaligned=True)))
        ssd_cases = [
            (2, 100, 4, 32, 1, 16, False, False), (1, 7, 6, 48, 2, 64, True, True), (1, 1, 2, 64, 2, 128, True, False),
            (1, 300, 4, 64, 2, 256, False, True), (2, 37, 4, 128, 4, 128, True, False),
            (1, 1000, 3, 64, 1, 128, True, False), (1, 70, 2, 20, 1, 32, True, True),
            (1, 2100, 2, 64, 1, 128, True, True),
        ]
        for (b, l, h, p, g, n, init, clamp) in ssd_cases:
            for v in SSD_VARIANTS if out_dt != ESSM_F32 else ((0, 0),):
                add(("ssd", lambda b=b, l=l, h=h, p=p, g=g, n=n, init=init, clamp=clamp, i=in_dt, o=out_dt, v=v:
                     chk.ssd(b, l, h, p, g, n, i, o, init=init, clamp=clamp, variant=v)))
        if out_dt != ESSM_F32:  # a split forced without a workspace: the launcher must run unsplit
            add(("ssd", lambda i=in_dt, o=out_dt: chk.ssd(1, 1000, 3, 64, 1, 128, i, o, init=True, clamp=False,
                                                          variant=(4, 4), workspace=False)))
        for v in SSD_VARIANTS if out_dt != ESSM_F32 else ((0, 0),):  # dt < 0: a non-monotonic cumsum
            add(("ssd", lambda i=in_dt, o=out_dt, v=v: chk.ssd(1, 300, 3, 64, 1, 128, i, o, init=True, clamp=False,
                                                               variant=v, softplus=False)))
        for (b, h, p, g, n, ip, clamp) in [(2, 4, 64, 1, 128, False, True), (1, 6, 48, 2, 16, True, False),
                                            (3, 8, 32, 4, 256, False, False), (1, 5, 16, 1, 18, False, False),
                                            (2, 2, 8, 2, 250, True, False)]:
            add(("ssd_update", lambda b=b, h=h, p=p, g=g, n=n, ip=ip, clamp=clamp, i=in_dt, o=out_dt:
                 chk.ssd_update(b, h, p, g, n, i, o, in_place=ip, clamp=clamp)))
    had_cases = [(3, 1, 0), (5, 1, 4), (3, 1, 7), (17, 1, 10), (3, 1, 15), (3, 12, 0), (5, 12, 3), (3, 12, 8),
                 (5, 20, 4), (3, 20, 9), (5, 28, 6), (3, 40, 7), (2, 40, 9)]
    for io in FLOAT_IO:
        for (r, m, k) in had_cases:
            add(("hadamard", lambda r=r, m=m, k=k, io=io: chk.hadamard(r, m, k, io, quantize=False)))
    for io in (ESSM_F16, ESSM_F32):
        for (r, m, k) in had_cases:
            add(("hadamard_i8", lambda r=r, m=m, k=k, io=io: chk.hadamard(r, m, k, io, quantize=True)))
    add(("rejections", chk.rejections))
    for label, fn in cases:
        if only is not None and label not in only:
            continue
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a crashing case is a failed check, the rest still run
            log.exception("case %s raised", label)
            chk.results.append(Result(label, "raised", "-", f"{type(exc).__name__}: {exc}"[:60], math.inf, 0.0, False))


def print_table(results: list[Result]) -> None:
    header = f"{'kernel':<24} {'case':<62} {'dtype':<9} {'tensor':<28} {'rel_err':>10} {'tol':>8}  status"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.kernel:<24} {r.case:<62} {r.dtype:<9} {r.tensor:<28} {r.rel_err:>10.2e} {r.tol:>8.1e}  "
              f"{'PASS' if r.ok else 'FAIL'}")
    failed = sum(not r.ok for r in results)
    print(f"\n{len(results) - failed}/{len(results)} checks passed, {failed} failed")


def write_json_atomic(path: Path, payload: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lib", default=None, help="path of libedgessm_kernels.so")
    parser.add_argument("--seed", type=int, default=None, help="RNG seed (default: fresh)")
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    parser.add_argument("--only", default=None,
                        help="comma-separated case labels to run (conv, conv_update, scan, state_update, ssd, "
                             "ssd_update, hadamard, hadamard_i8, rejections); default all")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if not torch.cuda.is_available():
        log.error("no CUDA device: the kernel harness needs a GPU")
        return 2
    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % (2**31))
    lib = KernelLib(args.lib)
    log.info("library %s, device %s, seed %d", lib.path, torch.cuda.get_device_name(), seed)
    chk = Checker(lib, seed)
    run_all(chk, set(args.only.split(",")) if args.only else None)
    print_table(chk.results)
    if args.json is not None:
        write_json_atomic(args.json, dict(seed=seed, device=torch.cuda.get_device_name(),
                                          results=[asdict(r) for r in chk.results]))
    return 0 if all(r.ok for r in chk.results) else 1


if __name__ == "__main__":
    sys.exit(main())
