"""Summarize an Nsight Compute source-page CSV (tools/gpu_sass_profile.sh): executed warp
instructions and warp stall samples by opcode, and the hottest address ranges.

    python tools/sass_hotspots.py out/1.csv [--top 25] [--window 32]
"""

from __future__ import annotations

import argparse
import collections
import csv
import sys
from pathlib import Path


def read_rows(path: Path) -> tuple[str, list[dict[str, str]]]:
    """The kernel name and one dict per SASS instruction."""
    with path.open(newline="") as f:
        lines = list(csv.reader(f))
    kernel = lines[0][1] if lines and len(lines[0]) > 1 else "?"
    header = lines[1]
    return kernel, [dict(zip(header, row)) for row in lines[2:] if len(row) == len(header)]


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def opcode(source: str) -> str:
    words = source.split()
    while words and words[0].startswith("@"):
        words = words[1:]
    return words[0] if words else "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", type=Path)
    parser.add_argument("--top", type=int, default=25, help="opcodes and windows listed")
    parser.add_argument("--window", type=int, default=32, help="instructions per address window")
    args = parser.parse_args()
    kernel, rows = read_rows(args.csv)
    executed = [number(r.get("Instructions Executed", "0")) for r in rows]
    stalls = [number(r.get("Warp Stall Sampling (All Samples)", "0")) for r in rows]
    total_exec, total_stall = sum(executed) or 1.0, sum(stalls) or 1.0
    print(f"{kernel}\n{len(rows)} SASS instructions, {total_exec:,.0f} warp instructions executed, "
          f"{total_stall:,.0f} stall samples\n")
    by_op: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for r, e, s in zip(rows, executed, stalls):
        totals = by_op[opcode(r.get("Source", ""))]
        totals[0] += e
        totals[1] += s
    print(f"{'opcode':<28} {'% executed':>10} {'% stalls':>9}")
    for op, (e, s) in sorted(by_op.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"{op:<28} {100 * e / total_exec:10.1f} {100 * s / total_stall:9.1f}")
    print(f"\nhottest windows of {args.window} instructions (by stall samples):")
    windows = []
    for start in range(0, len(rows), args.window):
        sl = slice(start, start + args.window)
        windows.append((sum(stalls[sl]), sum(executed[sl]), start))
    for s, e, start in sorted(windows, reverse=True)[:args.top // 2]:
        ops = collections.Counter(opcode(r.get("Source", "")) for r in rows[start:start + args.window])
        print(f"[{start:5d}, {start + args.window:5d}) stalls {100 * s / total_stall:5.1f}%  "
              f"executed {100 * e / total_exec:5.1f}%  {', '.join(f'{o} {c}' for o, c in ops.most_common(6))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
