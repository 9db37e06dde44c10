"""The main job (`make demo`): quantize the shipped Mamba-1 example, export it, run it with ONNX
Runtime on the CPU, and compare float vs quantized accuracy and speed.

Steps (each is one library call; the CLI equivalents are printed as the demo goes):
  1. edgessm quantize examples/models/mamba1-tiny --recipe w8a8 -o out/demo/w8a8
  2. edgessm export examples/models/mamba1-tiny -o out/demo/onnx-fp32 --scan portable
     edgessm export out/demo/w8a8 -o out/demo/onnx-w8a8 --scan portable
  3. edgessm eval / bench / generate on both exports with --backend ort
The table is printed and written to out/demo/report.json.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from edgessm.export import export_onnx
from edgessm.io import atomic_write_json
from edgessm.quant import get_recipe, quantize_checkpoint
from edgessm.runtime.bench import bench_backend, format_table
from edgessm.runtime.evaluate import evaluate_file
from edgessm.runtime.generation import generate
from edgessm.runtime.ort import OrtBackend
from edgessm.runtime.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("edgessm.demo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "examples/models/mamba1-tiny")
    parser.add_argument("--data", type=Path, default=ROOT / "examples/data/heldout.txt")
    parser.add_argument("--out", type=Path, default=ROOT / "out/demo")
    parser.add_argument("--recipe", default="w8a8")
    parser.add_argument("--max-windows", type=int, default=64, help="Held-out windows of 256 bytes to evaluate.")
    parser.add_argument("--prompt", default="def ")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    t0 = time.perf_counter()
    qdir = args.out / args.recipe
    log.info("[1/3] edgessm quantize %s --recipe %s -o %s", args.model, args.recipe, qdir)
    quantize_checkpoint(args.model, qdir, get_recipe(args.recipe), num_samples=32, seq_len=256)

    exports = {"fp32": args.out / "onnx-fp32", args.recipe: args.out / f"onnx-{args.recipe}"}
    for source, target in ((args.model, exports["fp32"]), (qdir, exports[args.recipe])):
        log.info("[2/3] edgessm export %s -o %s --scan portable", source, target)
        export_onnx(source, target, scan="portable")

    log.info("[3/3] ONNX Runtime (CPU): eval on %s, bench, generate", args.data)
    tokenizer = ByteTokenizer()
    rows, samples = [], {}
    for name, directory in exports.items():
        backend = OrtBackend(directory)
        ev = evaluate_file(backend, args.data, tokenizer, window=256, max_windows=args.max_windows)
        speed = bench_backend(backend, prompt_len=128, new_tokens=32)
        out = generate(backend, np.array([tokenizer.encode(args.prompt)]), 80)
        samples[name] = tokenizer.decode(out.tokens[0].tolist())
        rows.append({"model": name, "backend": "ort-cpu", "perplexity": ev.perplexity, "accuracy_%": 100 * ev.accuracy,
                     "eval_tokens": ev.tokens, "prefill_tok/s": speed.prefill_tokens_per_s,
                     "decode_ms/tok": speed.decode_ms_per_token, "peak_rss_MiB": speed.peak_rss_mib})
    drop = 100 * (rows[1]["perplexity"] / rows[0]["perplexity"] - 1)

    print()
    print(format_table(rows, list(rows[0])))
    print(f"\n{args.recipe} perplexity change vs fp32: {drop:+.2f}%  (held-out: {args.data.name}, "
          f"{rows[0]['eval_tokens']} predicted bytes)")
    for name, text in samples.items():
        print(f"\n--- {name} greedy continuation of {args.prompt!r} ---\n{text}")
    atomic_write_json(args.out / "report.json", {"rows": rows, "samples": samples, "perplexity_change_percent": drop,
                                                 "seconds": time.perf_counter() - t0})
    print(f"\nreport: {args.out / 'report.json'}  ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
