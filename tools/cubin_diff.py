"""Compare the SASS of the CUDA kernels of two builds, offline (no GPU): which kernels compile to the
same instructions, and where they differ, whether only integer/control instructions moved or also the
floating-point, memory and barrier ones that set a kernel's speed.

    python tools/cubin_diff.py before.cubin after.cubin [--match REGEX]
    python tools/cubin_diff.py --rev HEAD plugins/kernels/selective_scan.cu [--arch 90] [--match seq1]

With --rev the file as of that git revision is compiled in a copy of that revision's plugins/ (its own
headers), and the working file in the working tree, with the flags of plugins/CMakeLists.txt (-O3
--expt-relaxed-constexpr, C++17). nvcc's device code depends a little on more than the device
source: the same file compiled from two folders (its path's hash is in the anonymous namespace's
mangled name), and a change to host code only, were each seen to move one instruction in one scan
kernel (selective_scan_seq1_kernel, int8 in, float32 out). Treat a lone difference of that size as
that noise. Needs nvcc for --rev and cuobjdump (from
PATH, the nvidia-cuda-cuobjdump wheel, or the copy Triton ships).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-std=c++17"]
# The anonymous namespace's mangled name carries a hash of the file's path: dropped, so that a kernel
# compiled from another copy of the file keeps its name.
ANON_NAMESPACE = re.compile(r"_GLOBAL__N__[0-9a-f]+_\d+_\w*?_cu_[0-9a-f]{8}")
# Opcodes (first dot-separated part) that only compute addresses, predicates and control flow.
INTEGER_CONTROL = {
    "IADD3", "IMAD", "LEA", "SHF", "ISETP", "MOV", "SEL", "LOP3", "S2R", "CS2R", "S2UR", "R2UR", "ULDC", "UMOV",
    "ULEA", "UIADD3", "UIMAD", "USHF", "ULOP3", "UISETP", "USEL", "UPRMT", "NOP", "BRA", "IABS", "PRMT",
    "VIADD", "IMNMX", "PLOP3", "BSSY", "BSYNC", "LDC", "EXIT", "I2FP", "FLO", "POPC", "P2R", "R2P", "VOTE",
    "VOTEU", "BREV", "YIELD", "BREAK", "HFMA2",  # HFMA2.MMA: ptxas's way of setting a register to a constant
}
Kernel = list[str]


def find_cuobjdump() -> tuple[str, dict[str, str]] | None:
    """cuobjdump (from PATH, the nvidia-cuda-cuobjdump wheel, or the copy Triton ships) and the environment
    to run it in: outside a CUDA toolkit on PATH it finds an nvdisasm through NVDISASM_PATH, set to
    Triton's copy when Triton is installed. None when there is none."""
    found = shutil.which("cuobjdump")
    if found:
        return found, dict(os.environ)
    triton_bin: Path | None = None
    try:
        import triton

        triton_bin = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    except ImportError:
        pass
    env = {**os.environ, "NVDISASM_PATH": str(triton_bin)} if triton_bin else dict(os.environ)
    try:
        import nvidia

        for root in nvidia.__path__:
            hits = sorted(Path(root).glob("*/bin/cuobjdump"))
            if hits:
                return str(hits[0]), env
    except ImportError:
        pass
    if triton_bin and (triton_bin / "cuobjdump").exists():
        return str(triton_bin / "cuobjdump"), env
    return None


def parse_sass(text: str) -> dict[str, Kernel]:
    """Kernel name (anonymous-namespace hash dropped) -> its SASS instructions, predicates dropped, in
    address order, from cuobjdump -sass output (addresses of any width: long kernels pass 0xffff)."""
    out: dict[str, Kernel] = {}
    current: Kernel | None = None
    for line in text.splitlines():
        m = re.match(r"\s+Function : (\S+)", line)
        if m:
            current = out.setdefault(ANON_NAMESPACE.sub("_GLOBAL__N_", m.group(1)), [])
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?(.*?)\s*;", line)
        if m and current is not None:
            current.append(m.group(1))
    return out


def kernels(cubin: Path) -> dict[str, Kernel]:
    found = find_cuobjdump()
    if found is None:
        sys.exit("cubin_diff: cuobjdump not found (the CUDA toolkit, pip install nvidia-cuda-cuobjdump, or Triton)")
    tool, env = found
    res = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, env=env, check=True)
    return parse_sass(res.stdout)


def opcode(instruction: str) -> str:
    return instruction.split()[0]


def compare(a: Kernel, b: Kernel) -> str:
    """One line: identical, same instructions reordered, or the opcode counts that differ (the
    floating-point/memory/barrier ones listed first)."""
    if a == b:
        return "identical"
    ca, cb = collections.Counter(map(opcode, a)), collections.Counter(map(opcode, b))
    if ca == cb:
        return f"same opcodes, other operands or order ({len(a)} instructions)"
    diff = {op: (ca[op], cb[op]) for op in sorted(set(ca) | set(cb)) if ca[op] != cb[op]}
    core = {op: n for op, n in diff.items() if op.split(".")[0] not in INTEGER_CONTROL}
    rest = len(diff) - len(core)
    what = "only integer/control opcodes differ" if not core else f"differs in {core}"
    return f"{len(a)} -> {len(b)} instructions; {what} (+{rest} integer/control opcodes)"


def compile_cubin(source: Path, include: Path, arch: str, out: Path) -> None:
    cmd = ["nvcc", *NVCC_FLAGS, f"-I{include}", "-cubin", f"-arch=sm_{arch}", str(source), "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def cubins_from_rev(rev: str, source: Path, arch: str, tmp: Path) -> tuple[Path, Path]:
    """(cubin of `source` at `rev`, compiled in a copy of that revision's plugins/, cubin of the working file)."""
    rel = source.resolve().relative_to(REPO)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "plugins"], check=True, capture_output=True)
    (tmp / "old").mkdir()
    subprocess.run(["tar", "-x", "-C", str(tmp / "old")], input=archive.stdout, check=True)
    compile_cubin(tmp / "old" / rel, tmp / "old" / "plugins" / "include", arch, tmp / "before.cubin")
    compile_cubin(source, REPO / "plugins" / "include", arch, tmp / "after.cubin")
    return tmp / "before.cubin", tmp / "after.cubin"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="BEFORE.cubin AFTER.cubin, or with --rev one .cu file")
    parser.add_argument("--rev", default=None, help="compare the .cu file at this git revision with the working one")
    parser.add_argument("--arch", default="90", help="SM architecture for --rev (default 90; Orin is 87)")
    parser.add_argument("--match", default="", help="only kernels whose mangled name matches this regex")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        if args.rev:
            if len(args.files) != 1:
                parser.error("--rev takes one .cu file")
            before, after = cubins_from_rev(args.rev, args.files[0], args.arch, Path(d))
        elif len(args.files) == 2:
            before, after = args.files
        else:
            parser.error("give BEFORE.cubin AFTER.cubin, or --rev REV FILE.cu")
        a, b = kernels(before), kernels(after)
    for name in sorted(set(a) | set(b)):
        if not re.search(args.match, name):
            continue
        if name not in a or name not in b:
            print(f"{'only after' if name in b else 'only before'}: {name}")
            continue
        print(f"{compare(a[name], b[name])}: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
