"""Side-by-side kernel times of several plugins/harness/bench_kernels.py runs (e.g. tools/gpu_ab.sh's A, B, A, B).

    python tools/ab_table.py out/gpu_ab/a1/bench_kernels.json out/gpu_ab/b1/bench_kernels.json ...

One row per benchmark row (section, config, dtype, variant) found in the first file: its time in µs in
each run, then the last run's time over the first's (B/A when the runs alternate A, B).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgessm.runtime.bench import format_table  # noqa: E402

KEY = ("section", "config", "dtype", "variant")


def load_times(path: Path) -> dict[tuple[str, ...], float]:
    """(section, config, dtype, variant) -> µs of one benchmark JSON."""
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"ab_table: {path}: not a bench_kernels.py JSON ({e})") from None
    return {tuple(str(r[k]) for k in KEY): 1e3 * float(r["ms"]) for r in rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="bench_kernels.json files, in run order")
    args = ap.parse_args()
    runs = [load_times(p) for p in args.runs]
    names = [p.parent.name or p.name for p in args.runs]
    ratio = f"{names[-1]}/{names[0]}"
    columns = ["kernel", "config", "dtype", "variant", *(f"{n} µs" for n in names), ratio]
    table = []
    for key in runs[0]:
        times = [r.get(key) for r in runs]
        row = dict(zip(("kernel", "config", "dtype", "variant"), key))
        row.update({f"{n} µs": "-" if t is None else f"{t:.1f}" for n, t in zip(names, times)})
        if len(runs) > 1 and times[0] and times[-1]:
            row[ratio] = f"{times[-1] / times[0]:.3f}"
        table.append(row)
    print(format_table(table, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
