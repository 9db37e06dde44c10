"""ONNX Runtime (CPU) vs PyTorch eager (CPU): prefill tokens/s and decode ms/token.

For each model (two small random configs, plus every checkpoint under examples/models/ that has a
config.json) this exports plugin and portable graphs and times them with
``edgessm.runtime.bench.bench_backend`` next to the PyTorch model; prints a table and writes JSON.
``--sweep-chunks`` also times the portable prefill at several Scan chunk sizes (how the defaults
in edgessm.export.onnx_export were chosen).

    python benchmarks/bench_ort.py results/bench_ort.json [--prompt-len 256] [--threads 2] [--sweep-chunks]
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import edgessm
from edgessm.config import MambaConfig
from edgessm.export import export_onnx
from edgessm.io import atomic_write_json
from edgessm.models.loading import random_model
from edgessm.runtime.backend import TorchBackend
from edgessm.runtime.bench import bench_backend, format_table
from edgessm.runtime.ort import OrtBackend

log = logging.getLogger("bench_ort")

SMALL_CONFIGS = {
    "mamba1-small": MambaConfig(arch="mamba1", vocab_size=1024, d_model=256, n_layer=4, d_state=16),
    "mamba2-small": MambaConfig(arch="mamba2", vocab_size=1024, d_model=256, n_layer=4, d_state=64, head_dim=32,
                                n_groups=1, chunk_size=64),
}
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "models"
COLUMNS = ["model", "backend", "batch", "prompt_len", "prefill_ms", "prefill_tokens_per_s", "decode_ms_per_token",
           "speedup_prefill", "speedup_decode"]


def _models() -> dict[str, edgessm.MambaLM]:
    models = {name: random_model(cfg) for name, cfg in SMALL_CONFIGS.items()}
    if EXAMPLES.is_dir():
        for d in sorted(p for p in EXAMPLES.iterdir() if (p / "config.json").is_file()):
            models[f"examples/{d.name}"] = edgessm.load_model(d)
    return models


def _bench_model(name: str, model: edgessm.MambaLM, args: argparse.Namespace, work: Path) -> list[dict]:
    rows = []
    torch_row = bench_backend(TorchBackend(model), args.batch, args.prompt_len, args.new_tokens, args.repeats).as_dict()
    rows.append({"model": name, **torch_row, "backend": "torch-eager"})
    for scan in ("plugin", "portable"):
        out = work / f"{name.replace('/', '_')}-{scan}"
        export_onnx(model, out, scan=scan)
        row = bench_backend(OrtBackend(out, threads=args.threads), args.batch, args.prompt_len, args.new_tokens,
                            args.repeats).as_dict()
        rows.append({"model": name, **row, "backend": f"ort-{scan}",
                     "speedup_prefill": torch_row["prefill_ms"] / row["prefill_ms"],
                     "speedup_decode": torch_row["decode_ms_per_token"] / row["decode_ms_per_token"]})
    return rows


def _sweep(name: str, model: edgessm.MambaLM, args: argparse.Namespace, work: Path) -> list[dict]:
    """Portable prefill time per Scan chunk size."""
    rows = []
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, (args.batch, args.prompt_len))
    key = "chunk_mamba1" if model.config.arch == "mamba1" else "chunk_mamba2"
    for chunk in (1, 4, 8, 16, 32, 64):
        out = work / f"sweep-{name.replace('/', '_')}-{chunk}"
        export_onnx(model, out, scan="portable", graphs=("prefill",), **{key: chunk})
        backend = OrtBackend(out, threads=args.threads)
        backend.prefill(prompt)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            backend.prefill(prompt)
            times.append(time.perf_counter() - t0)
        rows.append({"model": name, "chunk": chunk, "prefill_ms": 1e3 * float(np.median(times))})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json_out", type=Path, help="Where to write the results (JSON).")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads and torch threads.")
    p.add_argument("--sweep-chunks", action="store_true", help="Also time portable prefill per Scan chunk size.")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, sweep = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in _models().items():
            log.info("benchmarking %s", name)
            rows += _bench_model(name, model, args, Path(tmp))
            if args.sweep_chunks:
                sweep += _sweep(name, model, args, Path(tmp))
    print(format_table(rows, COLUMNS))
    if sweep:
        print()
        print(format_table(sweep, ["model", "chunk", "prefill_ms"]))
    env = {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
           "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
           "ort_threads": args.threads}
    atomic_write_json(args.json_out, {"args": {k: str(v) for k, v in vars(args).items()}, "env": env, "rows": rows,
                                      "chunk_sweep": sweep})


if __name__ == "__main__":
    main()
