"""Side-by-side times of several runs of one benchmark (e.g. tools/gpu_ab.sh's A, B, A, B):
plugins/harness/bench_kernels.py or benchmarks/gpu_gemv.py JSON files.

    python tools/ab_table.py out/gpu_ab/a1/bench_kernels.json out/gpu_ab/b1/bench_kernels.json ...
    python tools/ab_table.py out/gpu_ab/{a1,b1,a2,b2}/gpu_gemv.json

One row per benchmark row found in the first file (bench_kernels: section, config, dtype, variant;
gpu_gemv: config, projection, M, impl): its time in µs in each run, then the last run's time over the
first's (B/A when the runs alternate A, B).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgessm.runtime.bench import format_table  # noqa: E402

# Per benchmark: the columns that name a row, and its time in µs.
KERNELS_KEY = ("section", "config", "dtype", "variant")
GEMV_KEY = ("config", "proj", "M", "impl")


def load_times(path: Path) -> tuple[tuple[str, ...], dict[tuple[str, ...], float]]:
    """(key columns, key -> µs) of one bench_kernels.py or gpu_gemv.py JSON."""
    try:
        rows = json.loads(path.read_text())["rows"]
        if rows and "us_per_call" in rows[0]:
            return GEMV_KEY, {tuple(str(r[k]) for k in GEMV_KEY): float(r["us_per_call"]) for r in rows}
        return KERNELS_KEY, {tuple(str(r[k]) for k in KERNELS_KEY): 1e3 * float(r["ms"]) for r in rows}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"ab_table: {path}: not a bench_kernels.py or gpu_gemv.py JSON ({e})") from None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="bench_kernels.json files, in run order")
    args = ap.parse_args()
    loaded = [load_times(p) for p in args.runs]
    key_columns = loaded[0][0]
    if any(cols != key_columns for cols, _ in loaded):
        raise SystemExit("ab_table: the files come from different benchmarks")
    runs = [times for _, times in loaded]
    names = [p.parent.name or p.name for p in args.runs]
    ratio = f"{names[-1]}/{names[0]}"
    columns = [*key_columns, *(f"{n} µs" for n in names), ratio]
    table = []
    for key in runs[0]:
        times = [r.get(key) for r in runs]
        row = dict(zip(key_columns, key))
        row.update({f"{n} µs": "-" if t is None else f"{t:.2f}" for n, t in zip(names, times)})
        if len(runs) > 1 and times[0] and times[-1]:
            row[ratio] = f"{times[-1] / times[0]:.3f}"
        table.append(row)
    print(format_table(table, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
