"""Whole-model decode time under different settings of the GEMV kernels' tuning knobs (one GPU).

The knobs are int module constants of edgessm.ops.triton_gemv (``_GEMV_TILE``, ``_GEMV_PROGRAMS_PER_SM``, ...)
and the word-streaming GEMV's limits per weight width, named ``W<bits>.<field>`` for the fields of
``_WORDS_GEMV_TUNING[bits]`` (e.g. ``W4.warps_per_sm``, ``W8.max_block_n``), read each time a kernel is launched. A GEMV's best setting depends on what runs
around it (with programmatic dependent launch a kernel's weight loads overlap its predecessor), so the
knobs are tuned here on the decode step they serve: for each config and weights mode, one varied
setting at a time (the others at their defaults, and once all at their defaults), the backend is built
anew, its decode step captured as a CUDA graph and timed as in benchmarks/gpu_decode.py.

    python tools/decode_knob_sweep.py --configs mamba1-1.4b --modes w4a16 \
        --knob W4.max_block_n=4,2 --knob W4.warps_per_sm=6,12 --pdl on,off --json $OUT/sweep.json

Prints a table (ms/token and the ratio to the defaults' time in the same run) and writes JSON atomically.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import edgessm.ops.triton_gemv as gemv  # noqa: E402
from edgessm.io import atomic_write_json  # noqa: E402
from edgessm.models.loading import random_model  # noqa: E402
from edgessm.runtime.bench import format_table  # noqa: E402
from gpu_decode import CONFIGS, MODES, PROMPT_LEN, bench_cuda_graph, copy_bandwidth, release_cuda_memory  # noqa: E402

log = logging.getLogger("decode_knob_sweep")


def get_knob(name: str) -> int | None:
    """The value of knob ``name`` (see the module docstring), None if there is no such knob."""
    bits, _, field = name.partition(".")
    if field:
        tuning = gemv._WORDS_GEMV_TUNING.get(int(bits[1:])) if bits[:1] == "W" and bits[1:].isdigit() else None
        return getattr(tuning, field, None) if field in gemv.WordsGemvTuning._fields else None
    value = getattr(gemv, name, None)
    return value if isinstance(value, int) else None


def set_knob(name: str, value: int) -> None:
    bits, _, field = name.partition(".")
    if field:
        b = int(bits[1:])
        gemv._WORDS_GEMV_TUNING = {**gemv._WORDS_GEMV_TUNING, b: gemv._WORDS_GEMV_TUNING[b]._replace(**{field: value})}
    else:
        setattr(gemv, name, value)


def parse_knob(text: str) -> tuple[str, list[int]]:
    """'NAME=v1,v2' → (NAME, [v1, v2]); NAME a knob of the module docstring."""
    name, _, values = text.partition("=")
    if get_knob(name) is None or not values:
        raise argparse.ArgumentTypeError(f"--knob {text!r}: expected NAME=v1,v2,... with NAME an int constant of "
                                         f"edgessm.ops.triton_gemv or W<bits>.<field> of its _WORDS_GEMV_TUNING "
                                         f"(fields {', '.join(gemv.WordsGemvTuning._fields)}; e.g. W8.max_block_n=4,2)")
    try:
        return name, [int(v) for v in values.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--knob {text!r}: the values must be integers") from None


def settings(knobs: list[tuple[str, list[int]]]) -> list[dict[str, int]]:
    """The defaults ({}), then each knob value on its own."""
    return [{}] + [{name: v} for name, values in knobs for v in values if v != get_knob(name)]


def run(configs: list[str], modes: list[str], knobs: list[tuple[str, list[int]]], pdl: list[bool], steps: int,
        warmup: int) -> list[dict]:
    bw = copy_bandwidth()
    defaults = {name: get_knob(name) for name, _ in knobs}
    rows: list[dict] = []
    for name in configs:
        cfg = CONFIGS[name]
        with torch.device("cuda"):
            model = random_model(cfg, seed=0).half()
        prompt = torch.randint(0, cfg.vocab_size, (1, PROMPT_LEN), device="cuda")
        for mode in modes:
            for on in pdl:
                os.environ["EDGESSM_PDL"] = "1" if on else "0"
                base = None
                for setting in settings(knobs):
                    for k, v in {**defaults, **setting}.items():
                        set_knob(k, v)
                    label = ", ".join(f"{k}={v}" for k, v in setting.items()) or "defaults"
                    log.info("%s %s pdl=%s: %s", name, mode, on, label)
                    (row,) = bench_cuda_graph(model, mode, prompt, steps, warmup, bw)
                    base = base or row["ms_per_token"]
                    rows.append({"config": name, "weights": mode, "pdl": on, "setting": label,
                                 "ms_per_token": row["ms_per_token"], "p10_ms": row["p10_ms"], "p90_ms": row["p90_ms"],
                                 "vs_defaults": row["ms_per_token"] / base, "floor_ms": row["floor_ms"]})
                    release_cuda_memory()
        for k, v in defaults.items():
            set_knob(k, v)
        del model
        release_cuda_memory()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="mamba1-1.4b", help=f"comma-separated, from {', '.join(CONFIGS)}")
    ap.add_argument("--modes", default="w4a16", help=f"comma-separated, from {', '.join(MODES)}")
    ap.add_argument("--knob", type=parse_knob, action="append", default=[], help="NAME=v1,v2 (repeatable)")
    ap.add_argument("--pdl", default="on", help="on, off or on,off: programmatic dependent launch (EDGESSM_PDL)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--json", type=Path, default=Path(os.environ.get("OUT", "out")) / "decode_knob_sweep.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        log.error("decode_knob_sweep needs a CUDA GPU")
        return 2
    pdl = [{"on": True, "off": False}[p] for p in args.pdl.split(",")]
    rows = run(args.configs.split(","), args.modes.split(","), args.knob, pdl, args.steps, args.warmup)
    print(format_table(rows, ["config", "weights", "pdl", "setting", "ms_per_token", "p10_ms", "p90_ms", "vs_defaults",
                              "floor_ms"]))
    atomic_write_json(args.json, {"device": torch.cuda.get_device_name(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
