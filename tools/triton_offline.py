"""Compile a decode GEMV's Triton kernel offline, exactly as its launcher would launch it, and report its
resources: no GPU needed (Triton and CUDA's ptxas are).

The launcher (edgessm.ops.triton_gemv.gemv_w4a16 / gemv_w8a16 / gemv_float) runs on CPU tensors with the
kernel replaced by a recorder; the recorded arguments are specialized as Triton's JIT does at a launch
(16-byte aligned pointers and ints divisible by 16 get ``tt.divisibility`` 16, ints equal to 1 and None
become constants), then compiled for the chosen GPU. A compile without that specialization (e.g. a bare
``triton.compile`` of the signature) assumes unaligned pointers and emits 4-byte loads where the
launched kernel has 16-byte ones, so its register counts mislead.

    python tools/triton_offline.py --op w4a16 --n 8192 --k 2048            # H100 (sm_90, 132 SMs)
    python tools/triton_offline.py --op w4a16 --n 8192 --k 2048 --arch 87 --sms 16   # Jetson AGX Orin
    python tools/triton_offline.py --op w8a16 --n 2048 --k 4096 --ptx /tmp/k.ptx

Prints the launch (grid, constexprs, num_warps), ptxas's registers / spills / shared memory, the PTX
instruction mix (global loads with their widths, barriers, shuffles, arithmetic) and the SASS opcode
counts of the cubin Triton built (cuobjdump, from the CUDA toolkit or the nvidia-cuda-cuobjdump wheel,
disassembling with the nvdisasm that Triton ships). Counts are of the whole kernel: a loop body counts once.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cubin_diff import find_cuobjdump, parse_sass  # noqa: E402  (tools/, this script's folder)
from edgessm.ops import triton_gemv as Q  # noqa: E402

OPS = ("w4a16", "w8a16", "w8a8", "float")


class Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.calls: list[tuple[tuple, tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


# the decode GEMV kernels a launcher may launch (which one depends on the op, K and M)
GEMV_KERNELS = ("_words_gemv_kernel", "_rows_gemv_kernel")


def record_launch(op: str, n: int, k: int, m: int, group: int, sms: int,
                  conv_width: int = 0) -> tuple[object, tuple, tuple, dict]:
    """(jit function, grid, args, kwargs) of the launch that the op's launcher makes for x [m, k], w [n, k];
    with conv_width, the conv update fused on the first half of the outputs (as decode's in_proj)."""
    x = torch.randn(m, k, dtype=torch.float16)
    w = torch.randn(n, k, dtype=torch.float16) / k**0.5
    conv = None
    if conv_width:
        c = n // 2
        conv = Q.ConvUpdate(torch.zeros(m, c, conv_width - 1, dtype=torch.float16), torch.zeros(c, conv_width),
                            torch.zeros(c), 0)
    if op == "w4a16":
        weights, call = Q.quantize_w4(w, group), Q.gemv_w4a16
    elif op == "w8a16":
        weights, call = Q.quantize_w8(w), Q.gemv_w8a16
    elif op == "w8a8":
        q, scale = Q.quantize_w8(w)
        weights, call = (q, scale), lambda x_, q_, s_, conv: Q.gemv_w8a8(x_, float(x_.abs().max()) / 127, q_, s_,
                                                                          conv=conv)
    else:
        weights, call = (w,), Q.gemv_float
    recorders = {name: Recorder(getattr(Q, name)) for name in GEMV_KERNELS}
    saved = (Q._NOMINAL_SMS, Q._pdl)
    try:
        for name, recorder in recorders.items():
            setattr(Q, name, recorder)
        Q._NOMINAL_SMS = sms  # the launchers size CPU-tensor grids for this many SMs
        Q._pdl = lambda t: {"PDL": True, "launch_pdl": True}  # as on sm_90 (unused on sm_87: see main)
        call(x, *weights, conv=conv)
    finally:
        for name, recorder in recorders.items():
            setattr(Q, name, recorder.fn)
        Q._NOMINAL_SMS, Q._pdl = saved
    calls = [(r.fn, *c) for r in recorders.values() for c in r.calls]
    if len(calls) != 1:
        raise SystemExit(f"triton_offline: the {op} launcher made {len(calls)} launches of {', '.join(GEMV_KERNELS)}, "
                         f"expected 1 (M={m} must be at most {Q._GEMV_MAX_M} for a GEMV kernel)")
    return calls[0]


def compile_launch(fn, args: tuple, kwargs: dict, arch: int):
    """Compile fn for sm_<arch> with the launch's specialization (as triton.runtime.jit's binder does)."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "launch_pdl") if k in kwargs}
    if "ASM" in kwargs:
        kwargs["ASM"] = True  # the launchers pass x.is_cuda: inline-assembly loads on a GPU
    if arch < 90:
        options.pop("launch_pdl", None)
        kwargs["PDL"] = False  # the launchers turn PDL off below sm_90
    params = fn.arg_names
    values = dict(zip(params, args)) | kwargs
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(params):
        v = values[p]
        if i in fn.constexprs:
            signature[p] = "constexpr"
            constexprs[(i,)] = v
            continue
        ty, spec = native_specialize_impl(BaseBackend, v, False, i not in fn.do_not_specialize, True)
        signature[p] = ty
        if ty == "constexpr":
            constexprs[(i,)] = spec
        elif isinstance(spec, str) and spec:
            attrs[(i,)] = BaseBackend.parse_attr(spec)
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options), constexprs


def ptxas_resources(ptx: str, arch: int) -> str:
    """ptxas -v's 'Used N registers, ...' line for the PTX (Triton's sm_90 PTX targets sm_90a)."""
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        return "(ptxas not found: install the CUDA toolkit for register counts)"
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([ptxas, "-v", f"-arch={sm}", str(src), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True)
    lines = [ln.split("info    : ")[-1] for ln in (res.stderr + res.stdout).splitlines() if "Used" in ln or "spill" in ln]
    return "; ".join(lines) if res.returncode == 0 else f"ptxas failed: {res.stderr.strip()[:500]}"


def sass_mix(cubin: bytes) -> str:
    """SASS opcodes of the kernel: the cubin Triton built (with its own ptxas), disassembled by cuobjdump
    (found and read as tools/cubin_diff.py does)."""
    found = find_cuobjdump()
    if found is None:
        return "(SASS needs cuobjdump: the CUDA toolkit, or pip install nvidia-cuda-cuobjdump)"
    cuobjdump, env = found
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "k.cubin").write_bytes(cubin)
        res = subprocess.run([cuobjdump, "-sass", str(Path(d) / "k.cubin")], capture_output=True, text=True, env=env)
    mix = collections.Counter(
        instruction.split()[0].split(".")[0] for body in parse_sass(res.stdout).values() for instruction in body)
    if not mix:
        return f"(no SASS from cuobjdump: {res.stderr.strip()[:200]})"
    return f"{sum(mix.values())}; " + ", ".join(f"{k} {v}" for k, v in mix.most_common(20))


def instruction_mix(ptx: str) -> collections.Counter:
    """PTX instructions by opcode and first modifier (ld.global.v4 etc.), inline-asm loads included."""
    mix: collections.Counter = collections.Counter()
    for line in ptx.splitlines():
        s = line.strip()
        m = re.match(r"(@!?%p\d+\s+)?([a-z][a-z0-9_]*(\.[a-z0-9_]+)*)", s)
        if not m or s.startswith(("//", ".", "$")):  # comments, directives, labels
            continue
        parts = m.group(2).split(".")
        key = ".".join(parts[:3]) if parts[0] in ("ld", "st") else ".".join(parts[:2])
        mix[key] += 1
    return mix


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", choices=OPS, default="w4a16")
    ap.add_argument("--n", type=int, required=True, help="output features (rows of the weight)")
    ap.add_argument("--k", type=int, required=True, help="input features")
    ap.add_argument("--m", type=int, default=1, help="rows of x (decode batch, at most 4)")
    ap.add_argument("--group", type=int, default=128, help="W4 quantization group")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10: 90 H100, 87 Jetson Orin")
    ap.add_argument("--sms", type=int, default=132, help="SMs the launcher sizes the grid for (Orin: 16)")
    ap.add_argument("--conv", type=int, default=0, metavar="WIDTH",
                    help="fuse the conv update of this width on the first N/2 outputs (decode's in_proj; 0: none)")
    ap.add_argument("--ptx", type=Path, help="also write the PTX here")
    ap.add_argument("--ttgir", type=Path, help="also write the TritonGPU IR here (the layouts of every tensor)")
    args = ap.parse_args()
    try:
        import triton  # noqa: F401
    except ImportError:
        raise SystemExit("triton_offline: needs Triton (pip install triton==3.6.0)") from None
    fn, grid, call_args, kwargs = record_launch(args.op, args.n, args.k, args.m, args.group, args.sms, args.conv)
    kernel, constexprs = compile_launch(fn, call_args, dict(kwargs), args.arch)
    ptx = kernel.asm["ptx"]
    if args.ptx:
        args.ptx.write_text(ptx)
    if args.ttgir:
        args.ttgir.write_text(kernel.asm["ttgir"])
    names = fn.arg_names
    shown = {names[i[0]]: v for i, v in constexprs.items() if v is not None}
    print(f"{fn.__name__} [{args.op} N={args.n} K={args.k} M={args.m}] sm_{args.arch}, grid {grid}, "
          f"num_warps {kwargs.get('num_warps', 4)}")
    print("  constexprs:", ", ".join(f"{k}={v}" for k, v in shown.items()))
    print("  ptxas:", ptxas_resources(ptx, args.arch))
    mix = instruction_mix(ptx)
    print(f"  PTX instructions: {sum(mix.values())}; " + ", ".join(f"{k} {v}" for k, v in mix.most_common(24)))
    print("  SASS instructions:", sass_mix(kernel.asm["cubin"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
