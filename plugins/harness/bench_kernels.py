"""Kernel benchmark: edgessm CUDA kernels vs measured copy bandwidth and PyTorch eager.

Effective bandwidth = (bytes of every input read once + every output written once) / time, with
time the median of CUDA-event timings of CUDA-graph replays after warm-up: a graph holds one call per
input copy, the copies rotating through enough inputs that the working set exceeds the L2 cache, so
host launch overhead is not timed (it exceeded the GPU time of the shortest kernels: a 27 µs
Hadamard launch measured 45 µs through ctypes on a slower host) and edgessm's kernels and the peer's
are timed alike. Decode steps are timed as CUDA-graph replays of all layers of a model (distinct
per-layer buffers) and reported per layer. Each row also gives its physical floor:
the larger of bytes / copy bandwidth and the busiest execution unit's time at its peak rate (the
special-function unit for the Mamba-1 scan's exponentials, the tensor cores for the SSD products),
and the kernel's time as a percentage of it. With `--peer DIR` (tools/peer_mamba_ssm.sh) the rows
that mamba_ssm has a kernel for (SSD prefill, the Mamba-1 decode step; float16) also time it on the
same inputs, check that its output agrees with edgessm's, and give the speed-up over it.

    python plugins/harness/bench_kernels.py [--lib PATH] [--json PATH] [--peer DIR]  (JSON defaults to $OUT)
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from check_kernels import write_json_atomic  # noqa: E402
from essm_lib import (  # noqa: E402
    ESSM_F16, ESSM_I8, SSD_VARIANTS, KernelLib, ScanScales, SsdScales, ptr, scan_scales)
from peers import MambaSsmPeer, load_mamba_ssm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
from edgessm.runtime.gpu_profile import format_kernel_times, kernel_times  # noqa: E402

log = logging.getLogger("bench_kernels")
L2_ROTATE_BYTES = 200 * 2**20  # working set spanned by the rotated input copies (> 3x H100 L2)
EAGER_REPS = 3
# Prefill-scan variants timed (essm_tuning_set_scan_variant): (variant, segments) -> label; "seq1" is the
# single-segment one-barrier kernel that "auto" runs where the heuristic picks one segment (docs/kernels.md).
SCAN_VARIANTS = {(0, 0): "auto", (1, 0): "chunked/r1", (2, 0): "chunked/r2", (3, 1): "seq/S1", (3, 2): "seq/S2",
                 (3, 4): "seq/S4", (3, 8): "seq/S8", (3, 16): "seq/S16", (3, 32): "seq/S32", (4, 0): "seq1",
                 (5, 2): "cluster/S2", (5, 4): "cluster/S4", (5, 8): "cluster/S8", (5, 16): "cluster/S16",
                 (5, 32): "cluster/S32", (6, 2): "single-block/S2", (6, 4): "single-block/S4"}


@dataclass
class Row:
    section: str
    config: str
    dtype: str
    variant: str
    ms: float
    gbps: float
    pct_copy: float
    eager_ms: float | None = None
    note: str = ""
    # The physical floor: the larger of bytes / copy bandwidth and the time the busiest execution
    # unit needs at its peak rate (Bench.unit_floor_ms), and which of them it is.
    floor_ms: float | None = None
    floor_unit: str = "copy"
    pct_floor: float | None = None
    peer_ms: float | None = None  # the peer's kernels (--peer) on the same inputs, CUDA-graph replays


# Peak per-SM rates of the units that bound these kernels, by compute capability (CUDA C
# Programming Guide throughput table; dense fp16 tensor-core FLOPs with fp32 accumulation from the
# A100 / H100 datasheets: 312 TFLOP/s on 108 SMs at 1.41 GHz, 989 on 132 at 1.83 GHz).
SFU_OPS_PER_CLK_SM = {(8, 0): 16, (8, 6): 16, (8, 7): 16, (8, 9): 16, (9, 0): 16}  # ex2 / rcp
TENSOR_F16_FLOPS_PER_CLK_SM = {(8, 0): 2048, (9, 0): 4096}


def max_sm_clock_hz() -> float | None:
    """The GPU's maximum SM clock (nvidia-smi), None where it cannot be read."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits",
                              "-i", str(torch.cuda.current_device())], capture_output=True, text=True, timeout=30)
        return float(out.stdout.strip()) * 1e6 if out.returncode == 0 else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def time_ms(fn: Callable[[int], None], reps: int, warmup: int) -> float:
    """Median milliseconds of fn(i) over `reps` CUDA-event timed calls after `warmup` calls."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for i, (start, end) in enumerate(events):
        start.record()
        fn(i)
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def copies_for(bytes_per_set: int) -> int:
    return max(1, min(8, math.ceil(L2_ROTATE_BYTES / max(bytes_per_set, 1))))


def esize(dtype: int) -> int:
    return 1 if dtype == ESSM_I8 else 2


def int8_scan_scales(dim: int, in_dt: int) -> tuple[ScanScales | None, torch.Tensor | None]:
    """essm_scan_scales for int8 input (all 0.02, on the device) and the tensor behind them, which the
    caller keeps alive while launching; (None, None) for float input."""
    if in_dt != ESSM_I8:
        return None, None
    values = torch.full((dim + 4,), 0.02, device="cuda")  # u_scale [dim], then delta, B, C, z
    return scan_scales(values[:dim], values[dim:]), values


def parse_ssd_variants(text: str) -> list[tuple[int, ...]]:
    """'0,0 4,2,1' -> [(0, 0), (4, 2, 1)]: SSD forms as (variant, segments[, pieces])."""
    out = []
    for item in text.split():
        try:
            v = tuple(int(x) for x in item.split(","))
        except ValueError:
            v = ()
        if not 2 <= len(v) <= 3:
            raise argparse.ArgumentTypeError(f"SSD form {item!r}: expected integers VARIANT,SEGMENTS[,PIECES]")
        out.append(v)
    return out


def ssd_variant_label(v: tuple[int, ...]) -> str:
    """The label of an SSD form: its SSD_VARIANTS label, or one built the same way."""
    if v in SSD_VARIANTS:
        return SSD_VARIANTS[v]
    label = SSD_VARIANTS[(v[0], 0 if v[0] < 4 else 1)]
    label += f"/S{v[1]}" if v[1] > 1 else "/Sauto" if v[0] >= 4 and v[1] == 0 else ""
    return label + (f"/P{v[2]}" if len(v) > 2 and v[2] > 0 else "")


class Bench:
    def __init__(self, lib: KernelLib, reps: int, profile: bool = False, peer: MambaSsmPeer | None = None,
                 kernel_times: bool = False) -> None:
        self.lib = lib
        self.peer = peer
        self.reps = reps
        self.profile = profile  # one launch per kernel, no eager baselines (for running under ncu)
        self.kernel_times = kernel_times  # SSD rows: each launched kernel's own GPU time in the note
        self.ssd_variants: dict[tuple[int, ...], str] = dict(SSD_VARIANTS)  # the SSD forms timed
        self.rows: list[Row] = []
        self.copy_gbps = 0.0
        self.gen = torch.Generator(device="cuda").manual_seed(1234)
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        self.sms, self.cc = props.multi_processor_count, (props.major, props.minor)
        self.sm_clock_hz = max_sm_clock_hz()

    def unit_floor_ms(self, ops: float, rates: dict[tuple[int, int], int]) -> float | None:
        """Milliseconds for `ops` operations of one kind at the whole GPU's peak rate for them (per-SM rate
        from `rates` x SMs x maximum SM clock); None where the rate or the clock is unknown."""
        rate = rates.get(self.cc)
        if rate is None or self.sm_clock_hz is None:
            return None
        return 1e3 * ops / (rate * self.sms * self.sm_clock_hz)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float16, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device="cuda", generator=self.gen) * std).to(dtype)

    def randint8(self, *shape: int) -> torch.Tensor:
        return torch.randint(-127, 128, shape, device="cuda", generator=self.gen, dtype=torch.int8)

    def add(self, section: str, config: str, dtype: str, variant: str, ms: float, nbytes: int,
            eager_ms: float | None = None, note: str = "", unit: tuple[str, float | None] | None = None,
            peer_ms: float | None = None) -> None:
        """One result row; `unit` = (name, floor ms) of the execution unit that bounds the kernel, if any."""
        gbps = nbytes / (ms * 1e-3) / 1e9
        row = Row(section, config, dtype, variant, ms, gbps, 100.0 * gbps / self.copy_gbps, eager_ms, note,
                  peer_ms=peer_ms)
        if self.copy_gbps > 0:
            row.floor_ms = 1e3 * nbytes / (self.copy_gbps * 1e9)
            if unit is not None and unit[1] is not None and unit[1] > row.floor_ms:
                row.floor_unit, row.floor_ms = unit[0], unit[1]
            row.pct_floor = 100.0 * row.floor_ms / ms
        self.rows.append(row)
        log.info("%s %s %s %s: %.4f ms, %.1f GB/s", section, config, dtype, variant, ms, gbps)

    # ---- device-to-device copy ------------------------------------------------------------------
    def copy_bandwidth(self) -> None:
        n = 2**30 // 2  # 1 GiB of fp16
        src = self.randn(n)
        dst = torch.empty_like(src)
        ms = time_ms(lambda i: dst.copy_(src), self.reps, 5)
        nbytes = 2 * src.numel() * src.element_size()  # read + write
        self.copy_gbps = nbytes / (ms * 1e-3) / 1e9
        self.add("copy", "1 GiB D2D (torch copy_)", "f16", "torch", ms, nbytes)

    # ---- Mamba-1 prefill scan ------------------------------------------------------------------
    def scan_inputs(self, b: int, d: int, n: int, seqlen: int, in_dt: int) -> dict:
        if in_dt == ESSM_I8:
            t = dict(u=self.randint8(b, d, seqlen), delta=self.randint8(b, d, seqlen), B=self.randint8(b, n, seqlen),
                     C=self.randint8(b, n, seqlen), z=self.randint8(b, d, seqlen))
        else:
            t = dict(u=self.randn(b, d, seqlen), delta=self.randn(b, d, seqlen), B=self.randn(b, n, seqlen),
                     C=self.randn(b, n, seqlen), z=self.randn(b, d, seqlen))
        t["y"] = torch.empty(b, d, seqlen, dtype=torch.float16, device="cuda")
        return t

    def scan(self, b: int, d: int, n: int, seqlen: int, in_dt: int) -> None:
        config = f"B{b} D{d} N{n} L{seqlen}"
        dname = "i8->f16" if in_dt == ESSM_I8 else "f16"
        e_in = esize(in_dt)
        nbytes = (e_in * (3 * b * d * seqlen + 2 * b * n * seqlen) + 2 * b * d * seqlen
                  + 4 * (d * n + 2 * d) + 4 * b * d * n + (4 * (d + 4) if in_dt == ESSM_I8 else 0))
        sets = [self.scan_inputs(b, d, n, seqlen, in_dt) for _ in range(copies_for(nbytes))]
        A = -torch.exp(torch.rand(d, n, device="cuda", generator=self.gen) * 3.0)
        Dk = torch.randn(d, device="cuda", generator=self.gen)
        db = torch.rand(d, device="cuda", generator=self.gen) * -2.0 - 1.0
        hT = torch.empty(b, d, n, device="cuda")
        scales, _keep = int8_scan_scales(d, in_dt)

        def run(i: int) -> None:
            s = sets[i % len(sets)]
            self.lib.call("essm_selective_scan_fwd", in_dt, ESSM_F16, ptr(s["u"]), ptr(s["delta"]), ptr(A), ptr(s["B"]),
                          ptr(s["C"]), ptr(Dk), ptr(s["z"]), ptr(db), 1, scales, None, ptr(s["y"]), ptr(hT),
                          b, d, n, seqlen)

        eager = None
        if in_dt == ESSM_F16 and not self.profile:
            s0 = sets[0]
            eager = time_ms(lambda i: eager_selective_scan(s0["u"], s0["delta"], A, s0["B"], s0["C"], Dk, s0["z"], db),
                            EAGER_REPS, 1)
            ref = eager_selective_scan(s0["u"], s0["delta"], A, s0["B"], s0["C"], Dk, s0["z"], db)
            run(0)
            torch.cuda.synchronize()
            note = f"vs eager rel.err {rel_err(s0['y'], ref):.1e}"
        else:
            note = ""
        # special-function-unit floor: one ex2 per state step (the decay) and two per (token, channel)
        # for softplus and SiLU (docs/kernels.md)
        sfu = ("sfu", self.unit_floor_ms(b * d * seqlen * (n + 2), SFU_OPS_PER_CLK_SM))
        for variant in list(SCAN_VARIANTS)[:2] if self.profile else SCAN_VARIANTS:
            self.lib.set_scan_variant(*variant)
            ms = self.kernel_ms(run, len(sets))
            self.add("scan_prefill", config, dname, SCAN_VARIANTS[variant], ms, nbytes, eager, note, sfu)
        self.lib.set_scan_variant(0)

    # ---- Mamba-1 decode ------------------------------------------------------------------------
    def state_update(self, label: str, b: int, d: int, n: int, layers: int, in_dt: int) -> None:
        config = f"{label} B{b} D{d} N{n} x{layers} layers"
        dname = "i8->f16" if in_dt == ESSM_I8 else "f16"
        e_in = esize(in_dt)
        per_layer = (8 * b * d * n + 4 * d * n + e_in * (3 * b * d + 2 * b * n) + 2 * b * d + 8 * d
                     + (4 * (d + 4) if in_dt == ESSM_I8 else 0))
        mk = self.randint8 if in_dt == ESSM_I8 else self.randn
        L = [dict(state=torch.randn(b, d, n, device="cuda", generator=self.gen),
                  A=-torch.exp(torch.rand(d, n, device="cuda", generator=self.gen) * 3.0),
                  x=mk(b, d), dt=mk(b, d), z=mk(b, d), B=mk(b, n), C=mk(b, n),
                  D=torch.randn(d, device="cuda", generator=self.gen),
                  db=torch.rand(d, device="cuda", generator=self.gen) * -2.0 - 1.0,
                  y=torch.empty(b, d, dtype=torch.float16, device="cuda")) for _ in range(layers)]
        scales, _keep = int8_scan_scales(d, in_dt)

        def step_all() -> None:
            for t in L:
                self.lib.call("essm_selective_state_update", in_dt, ESSM_F16, ptr(t["state"]), ptr(t["x"]), ptr(t["dt"]),
                              ptr(t["A"]), ptr(t["B"]), ptr(t["C"]), ptr(t["D"]), ptr(t["z"]), ptr(t["db"]), 1, scales,
                              ptr(t["y"]), ptr(t["state"]), b, d, n)

        ms = self.graph_ms(step_all) / layers
        eager, peer_ms, note = None, None, ""
        if in_dt == ESSM_F16:
            def eager_all(_: int) -> None:
                for t in L:
                    eager_state_update(t["state"], t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["db"])
            eager = time_ms(eager_all, 20, 3) / layers
            if self.peer is not None:
                peer_ms, note = self.state_update_peer(L, layers, scales)
        self.add("decode_state_update", config, dname, "graph, per layer", ms, per_layer, eager, note, peer_ms=peer_ms)

    def state_update_peer(self, layers_io: list[dict], layers: int, scales: ScanScales | None) -> tuple[float, str]:
        """The peer's decode step over the same layers in one CUDA graph: (ms per layer, agreement note).
        Agreement: one step of both from the same state on layer 0's inputs."""
        assert self.peer is not None
        peer = self.peer

        def peer_all() -> None:
            for t in layers_io:
                peer.state_update(t["state"], t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["db"])

        ms = self.graph_ms(peer_all) / layers
        t = layers_io[0]
        start = t["state"].clone()
        ref_y = peer.state_update(start.clone(), t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["db"])
        state = start.clone()
        self.lib.call("essm_selective_state_update", ESSM_F16, ESSM_F16, ptr(state), ptr(t["x"]), ptr(t["dt"]),
                      ptr(t["A"]), ptr(t["B"]), ptr(t["C"]), ptr(t["D"]), ptr(t["z"]), ptr(t["db"]), 1, scales,
                      ptr(t["y"]), ptr(state), t["x"].shape[0], t["x"].shape[1], t["B"].shape[1])
        torch.cuda.synchronize()
        return ms, f"{peer.name}: rel.err vs edgessm y {rel_err(t['y'], ref_y):.1e}"

    # ---- Mamba-2 decode ------------------------------------------------------------------------
    def ssd_state_update(self, label: str, b: int, h: int, p: int, g: int, n: int, layers: int) -> None:
        """The SSD decode step (float16), all layers in one CUDA graph, reported per layer; bytes: the state
        read and written, x, y, dt, B, C, and A, D, dt_bias."""
        config = f"{label} B{b} H{h} P{p} G{g} N{n} x{layers} layers"
        per_layer = 8 * b * h * p * n + 2 * (2 * b * h * p + b * h + 2 * b * g * n) + 12 * h
        L = [dict(state=torch.randn(b, h, p, n, device="cuda", generator=self.gen),
                  A=-torch.exp(torch.rand(h, device="cuda", generator=self.gen)), x=self.randn(b, h, p),
                  dt=self.randn(b, h), B=self.randn(b, g, n), C=self.randn(b, g, n),
                  D=torch.randn(h, device="cuda", generator=self.gen),
                  db=torch.rand(h, device="cuda", generator=self.gen) * -2.0 - 1.0,
                  y=torch.empty(b, h, p, dtype=torch.float16, device="cuda")) for _ in range(layers)]

        def launch(t: dict, state: torch.Tensor) -> None:
            self.lib.call("essm_ssd_state_update", ESSM_F16, ESSM_F16, ptr(state), ptr(t["x"]), ptr(t["dt"]),
                          ptr(t["A"]), ptr(t["B"]), ptr(t["C"]), ptr(t["D"]), ptr(t["db"]), 1, 0.0, math.inf, None,
                          ptr(t["y"]), ptr(state), b, h, p, g, n)

        ms = self.graph_ms(lambda: [launch(t, t["state"]) for t in L]) / layers
        peer_ms, note = None, ""
        if self.peer is not None:
            peer = self.peer

            def peer_step(t: dict, state: torch.Tensor) -> torch.Tensor:
                return peer.ssd_state_update(state, t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["db"])

            peer_ms = self.graph_ms(lambda: [peer_step(t, t["state"]) for t in L]) / layers
            t, start = L[0], L[0]["state"].clone()
            ref_y = peer_step(t, start.clone())
            launch(t, start)
            torch.cuda.synchronize()
            note = f"{peer.name}: rel.err vs edgessm y {rel_err(t['y'], ref_y):.1e}"
        self.add("decode_ssd_update", config, "f16", "graph, per layer", ms, per_layer, None, note, peer_ms=peer_ms)

    def kernel_ms(self, run: Callable[[int], None], copies: int) -> float:
        """Milliseconds of one run(i): CUDA-graph replays of run(0) .. run(copies - 1), per call (one plain
        call per measurement under --profile, for ncu)."""
        if self.profile:
            return time_ms(run, 1, 0)
        return self.graph_ms(lambda: [run(i) for i in range(copies)]) / copies

    def graph_ms(self, body: Callable[[], None]) -> float:
        """Median ms of one replay of a CUDA graph capturing `body`."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            body()  # warm-up outside capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        return time_ms(lambda i: graph.replay(), self.reps, 10)

    # ---- Mamba-2 SSD prefill -------------------------------------------------------------------
    def ssd(self, b: int, seqlen: int, h: int, p: int, g: int, n: int, in_dt: int) -> None:
        config = f"B{b} L{seqlen} H{h} P{p} G{g} N{n}"
        dname = "i8->f16" if in_dt == ESSM_I8 else "f16"
        e_in = esize(in_dt)
        nbytes = (e_in * (b * seqlen * h * p + 2 * b * seqlen * g * n) + 2 * b * seqlen * h + 2 * b * seqlen * h * p
                  + 4 * b * h * p * n + 12 * h + (4 * (h * p + 2 * g) if in_dt == ESSM_I8 else 0))
        mk = self.randint8 if in_dt == ESSM_I8 else self.randn
        sets = [dict(x=mk(b, seqlen, h, p), B=mk(b, seqlen, g, n), C=mk(b, seqlen, g, n),
                     dt=self.randn(b, seqlen, h), y=torch.empty(b, seqlen, h, p, dtype=torch.float16, device="cuda"))
                for _ in range(copies_for(nbytes))]
        A = -torch.exp(torch.rand(h, device="cuda", generator=self.gen))
        Dk = torch.randn(h, device="cuda", generator=self.gen)
        db = torch.rand(h, device="cuda", generator=self.gen) * -2.0 - 1.0
        sT = torch.empty(b, h, p, n, device="cuda")
        keep = (torch.full((h * p,), 0.02, device="cuda"), torch.full((g,), 0.02, device="cuda"))
        scales = SsdScales(ptr(keep[0]), ptr(keep[1]), ptr(keep[1])) if in_dt == ESSM_I8 else None

        ws = self.lib.ssd_workspace(ESSM_F16, b, seqlen, h, p, n)  # re-taken for each forced form below

        def run(i: int) -> None:
            s = sets[i % len(sets)]
            self.lib.call("essm_ssd_scan_fwd", in_dt, ESSM_F16, ptr(s["x"]), ptr(s["dt"]), ptr(A), ptr(s["B"]),
                          ptr(s["C"]), ptr(Dk), ptr(db), 1, 0.0, math.inf, scales, None, ptr(s["y"]), ptr(sT),
                          b, seqlen, h, p, g, n, 256, ptr(ws), 0 if ws is None else ws.numel())

        eager, note, peer_ms = None, "", None
        if in_dt == ESSM_F16 and not self.profile:
            s0 = sets[0]
            eager = time_ms(lambda i: eager_ssd_chunked(s0["x"], s0["dt"], A, s0["B"], s0["C"], Dk, db), EAGER_REPS, 1)
            ref = eager_ssd_chunked(s0["x"], s0["dt"], A, s0["B"], s0["C"], Dk, db)
            run(0)
            torch.cuda.synchronize()
            note = f"vs eager rel.err {rel_err(s0['y'], ref):.1e}"
            if self.peer is not None:
                peer_ms, peer_note = self.ssd_peer(sets, A, Dk, db, sT)
                note += "; " + peer_note
        # tensor-core floor: the chunked form's products at chunk length 64 (G = C B^T and M x on the
        # causal half, C S, and B^T x for the state), counted once (not the state operand's split)
        q, chunks = 64, b * h * math.ceil(seqlen / 64)
        flops = 2 * chunks * (q * (q + 1) // 2 * (n + p) + 2 * q * n * p)
        tensor = ("tensor", self.unit_floor_ms(flops, TENSOR_F16_FLOPS_PER_CLK_SM))
        for variant, label in self.ssd_variants.items():
            with self.lib.forced_ssd_variant(variant):
                ws = self.lib.ssd_workspace(ESSM_F16, b, seqlen, h, p, n)
                ms = self.kernel_ms(run, len(sets))
                parts = (format_kernel_times(kernel_times(lambda i: run(i % len(sets))))
                         if self.kernel_times else "")
            self.add("ssd_prefill", config, dname, label, ms, nbytes, eager, "; ".join(filter(None, [note, parts])),
                     tensor, peer_ms)

    def ssd_peer(self, sets: list[dict], A: torch.Tensor, Dk: torch.Tensor, db: torch.Tensor,
                 state0: torch.Tensor) -> tuple[float, str]:
        """The peer's SSD prefill on the same input sets: (ms of one call replayed in a CUDA graph, the
        GPU's time; a note with the ms of a plain call, launch overheads included, as a user of its
        Python API sees them, and its agreement with edgessm's y and final state of set 0, `state0`)."""
        assert self.peer is not None
        peer = self.peer

        def call(s: dict) -> tuple[torch.Tensor, torch.Tensor]:
            return peer.ssd_prefill(s["x"], s["dt"], A, s["B"], s["C"], Dk, db, 256)

        call_ms = time_ms(lambda i: call(sets[i % len(sets)]), self.reps, 3)  # the first calls autotune

        def all_sets() -> None:
            for s in sets:
                call(s)

        graph_ms = self.graph_ms(all_sets) / len(sets)
        y, state = call(sets[0])
        return graph_ms, (f"{peer.name}: {call_ms:.4f} ms per plain call, rel.err vs edgessm y "
                          f"{rel_err(sets[0]['y'], y):.1e}, state {rel_err(state0, state):.1e}")

    # ---- Hadamard -------------------------------------------------------------------------------
    def hadamard(self, rows: int, m: int, logk: int, quantize: bool) -> None:
        n = m << logk
        config = f"rows{rows} n{n} (m{m})"
        out_dt = ESSM_I8 if quantize else ESSM_F16
        nbytes = rows * n * (2 + esize(out_dt)) + 4 * m * m
        sets = [dict(x=self.randn(rows, n),
                     y=torch.empty(rows, n, dtype=torch.int8 if quantize else torch.float16, device="cuda"))
                for _ in range(copies_for(nbytes))]
        hm = torch.where(torch.rand(m, m, device="cuda", generator=self.gen) < 0.5, -1.0, 1.0)
        scale = 1.0 / math.sqrt(n)

        def run(i: int) -> None:
            s = sets[i % len(sets)]
            self.lib.call("essm_hadamard_transform", ESSM_F16, out_dt, ptr(s["x"]), ptr(hm) if m > 1 else None, m,
                          scale, 0.05, ptr(s["y"]), rows, n)

        eager = None
        if not quantize and not self.profile:
            eager = time_ms(lambda i: eager_hadamard(sets[0]["x"], hm, scale), EAGER_REPS + 2, 1)
        ms = self.kernel_ms(run, len(sets))
        self.add("hadamard", config, "f16->" + ("i8" if quantize else "f16"), "kernel", ms, nbytes, eager)


# ---- PyTorch eager implementations of the same ops (float32 math) ------------------------------
def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = out.double(), ref.double()
    return float((o - r).norm() / r.norm())


def eager_selective_scan(u, delta, A, B, C, D, z, db) -> torch.Tensor:  # noqa: ANN001
    dt = F.softplus(delta.float() + db[:, None], threshold=20.0)
    dtu = dt * u.float()
    Bf, Cf = B.float(), C.float()
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], device=u.device)
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(dt[:, :, t, None] * A) * h + dtu[:, :, t, None] * Bf[:, None, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, Cf[:, :, t]))
    y = torch.stack(ys, -1) + D[:, None] * u.float()
    return (y * F.silu(z.float())).half()


def eager_state_update(state, x, dt, A, B, C, D, z, db) -> None:  # noqa: ANN001
    d = F.softplus(dt.float() + db, threshold=20.0)
    state.mul_(torch.exp(d[..., None] * A)).add_((d * x.float())[..., None] * B.float()[:, None, :])
    y = torch.einsum("bdn,bn->bd", state, C.float()) + D * x.float()
    return (y * F.silu(z.float())).half()


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """[..., T] -> [..., T, T] with sum_{s < r <= t} a[r] on and below the diagonal, -inf above."""
    T = a.shape[-1]
    rep = a[..., None].expand(*a.shape, T)
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), -1)
    seg = torch.cumsum(rep.masked_fill(~strict, 0), dim=-2)
    return seg.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device)), -math.inf)


def eager_ssd_chunked(x, dt, A, B, C, D, db, chunk: int = 256) -> torch.Tensor:  # noqa: ANN001
    """Chunked SSD (intra-chunk matmuls + inter-chunk state passing), float32."""
    b, seqlen, h, p = x.shape
    g = B.shape[2]
    q = chunk
    c = seqlen // q
    dtf = F.softplus(dt.float() + db, threshold=20.0)
    xd = (x.float() * dtf[..., None]).reshape(b, c, q, h, p)
    Bh = B.float().repeat_interleave(h // g, dim=2).reshape(b, c, q, h, -1)
    Ch = C.float().repeat_interleave(h // g, dim=2).reshape(b, c, q, h, -1)
    a = (dtf * A).reshape(b, c, q, h).permute(0, 3, 1, 2)  # [b, h, c, q]
    a_cs = torch.cumsum(a, -1)
    Lmat = torch.exp(_segsum(a))  # [b, h, c, q, q]
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Ch, Bh, Lmat, xd)
    decay_states = torch.exp(a_cs[..., -1:] - a_cs)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bh, decay_states, xd)
    states = torch.cat([torch.zeros_like(states[:, :1]), states], 1)
    decay_chunk = torch.exp(_segsum(F.pad(a_cs[..., -1], (1, 0))))
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)[:, :-1]
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Ch, states, torch.exp(a_cs))
    y = (y_diag + y_off).reshape(b, seqlen, h, p) + D[:, None] * x.float()
    return y.half()


def eager_hadamard(x: torch.Tensor, hm: torch.Tensor, scale: float) -> torch.Tensor:
    """Reshape-butterfly Walsh-Hadamard along b, then the base matrix along a (float32)."""
    m = hm.shape[0]
    rows, n = x.shape
    k = n // m
    v = x.float().reshape(rows * m, k)
    hs = 1
    while hs < k:
        w = v.reshape(-1, k // (2 * hs), 2, hs)
        v = torch.stack((w[:, :, 0] + w[:, :, 1], w[:, :, 0] - w[:, :, 1]), 2).reshape(-1, k)
        hs *= 2
    v = v.reshape(rows, m, k)
    if m > 1:
        v = torch.einsum("ij,rjk->rik", hm, v)
    return (v.reshape(rows, n) * scale).half()


def print_table(rows: list[Row]) -> None:
    header = (f"{'section':<20} {'config':<34} {'dtype':<8} {'variant':<17} {'ms':>9} {'GB/s':>8} {'%copy':>6} "
              f"{'floor ms':>9} {'bound':>6} {'%floor':>6} {'eager ms':>9} {'speedup':>8} {'peer ms':>9} "
              f"{'vs peer':>8}  note")
    print(header)
    print("-" * len(header))
    for r in rows:
        eager = f"{r.eager_ms:9.3f}" if r.eager_ms is not None else f"{'-':>9}"
        speed = f"{r.eager_ms / r.ms:8.1f}" if r.eager_ms is not None else f"{'-':>8}"
        floor = (f"{r.floor_ms:9.4f} {r.floor_unit:>6} {r.pct_floor:6.1f}" if r.floor_ms is not None
                 else f"{'-':>9} {'-':>6} {'-':>6}")
        peer = (f"{r.peer_ms:9.4f} {r.peer_ms / r.ms:8.2f}" if r.peer_ms is not None else f"{'-':>9} {'-':>8}")
        print(f"{r.section:<20} {r.config:<34} {r.dtype:<8} {r.variant:<17} {r.ms:9.4f} {r.gbps:8.1f} "
              f"{r.pct_copy:6.1f} {floor} {eager} {speed} {peer}  {r.note}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lib", default=None, help="path of libedgessm_kernels.so")
    parser.add_argument("--json", type=Path, default=None, help="output JSON (default $OUT/bench_kernels.json)")
    parser.add_argument("--reps", type=int, default=50, help="timed repetitions per measurement")
    parser.add_argument("--profile", action="store_true",
                        help="launch each headline kernel once (prefill scan, SSD, Hadamard) for ncu")
    parser.add_argument("--only", default=None,
                        help="comma-separated sections to time (scan, state_update, ssd_state_update, ssd, hadamard); "
                             "default all")
    parser.add_argument("--kernel-times", action="store_true",
                        help="SSD rows: also each launched kernel's GPU time (torch profiler), in the note")
    parser.add_argument("--ssd-variants", type=parse_ssd_variants, default=None, metavar="V,S[,P] ...",
                        help="SSD forms to time instead of the usual set, space-separated (variant, segments "
                             "and pass-1 pieces as in essm_lib.SSD_VARIANTS), e.g. '0,0 4,2,1 4,2,4'")
    parser.add_argument("--peer", type=Path, default=None,
                        help="folder made by tools/peer_mamba_ssm.sh: also time mamba_ssm's Triton kernels")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if not torch.cuda.is_available():
        log.error("no CUDA device: the kernel benchmark needs a GPU")
        return 2
    peer = load_mamba_ssm(args.peer) if args.peer is not None else None
    bench = Bench(KernelLib(args.lib), 1 if args.profile else args.reps, args.profile, peer, args.kernel_times)
    if args.ssd_variants:
        bench.ssd_variants = {v: ssd_variant_label(v) for v in args.ssd_variants}
    bench.copy_bandwidth()
    if args.profile:
        bench.scan(1, 1536, 16, 2048, ESSM_F16)  # auto: the segmented sequential kernel
        bench.scan(8, 4096, 16, 2048, ESSM_F16)  # auto: the one-barrier single-segment kernel
        bench.ssd(1, 2048, 24, 64, 1, 128, ESSM_F16)
        bench.hadamard(4096, 1, 12, False)
        bench.hadamard(4096, 12, 7, False)
        return 0
    jobs: list[tuple[str, Callable[[], None]]] = []
    for in_dt in (ESSM_F16, ESSM_I8):
        for b, d in ((1, 1536), (8, 1536), (1, 4096), (8, 4096)):
            jobs.append(("scan", lambda b=b, d=d, i=in_dt: bench.scan(b, d, 16, 2048, i)))
    for in_dt in (ESSM_F16, ESSM_I8):
        for b in (1, 8):
            jobs.append(("state_update", lambda b=b, i=in_dt: bench.state_update("130M", b, 1536, 16, 24, i)))
            jobs.append(("state_update", lambda b=b, i=in_dt: bench.state_update("1.4B", b, 4096, 16, 48, i)))
    for b in (1, 8):
        jobs.append(("ssd_state_update", lambda b=b: bench.ssd_state_update("Mamba-2 130M", b, 24, 64, 1, 128, 24)))
        jobs.append(("ssd_state_update", lambda b=b: bench.ssd_state_update("Mamba-2 1.3B", b, 64, 64, 1, 128, 48)))
    for in_dt in (ESSM_F16, ESSM_I8):
        for b, h in ((1, 24), (1, 64), (4, 64)):
            jobs.append(("ssd", lambda b=b, h=h, i=in_dt: bench.ssd(b, 2048, h, 64, 1, 128, i)))
    for m, logk in ((1, 12), (12, 7), (20, 8), (1, 13), (40, 9), (1, 15)):
        for quantize in (False, True):
            jobs.append(("hadamard", lambda m=m, k=logk, q=quantize:
                         bench.hadamard(4096 if (m << k) <= 8192 else 1024, m, k, q)))
    only = set(args.only.split(",")) if args.only else None
    jobs = [(label, job) for label, job in jobs if only is None or label in only]
    failures = 0
    for _label, job in jobs:
        try:
            job()
        except Exception:  # noqa: BLE001 - report and go on with the other measurements
            log.exception("benchmark job failed")
            failures += 1
        torch.cuda.empty_cache()
    print_table(bench.rows)
    out = args.json or (Path(os.environ["OUT"]) / "bench_kernels.json" if os.environ.get("OUT") else None)
    if out is not None:
        payload = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_gbps=bench.copy_gbps,
                       peer=None if peer is None else peer.name,
                       sms=bench.sms, max_sm_clock_hz=bench.sm_clock_hz, rows=[asdict(r) for r in bench.rows])
        write_json_atomic(out, payload)
        log.info("wrote %s", out)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
