"""Launch configurations of the word-streaming decode GEMV, timed one projection at a time (one GPU).

For each projection of the given Mamba-1 configs and each weights mode (fp16-triton, w8a16, w8a8, w4a16;
benchmarks/gpu_gemv.py's impls), this times, with gpu_gemv.bench_row (CUDA graph of calls on distinct weight
copies, median replay):

- ``rows``: the row-streaming kernel (``_rows_gemv_kernel``; not for w4a16, whose other path is a GEMM),
- ``default``: the word-streaming kernel at ``_words_gemv_config``'s choice,
- every candidate (BLOCK_N, VEC, BLOCK_W, BATCH, num_warps) of the word-streaming kernel (``candidates``),

(in_proj with the decode conv update fused under ``--conv-width 4``, as decode runs it) and prints, per projection and mode, the three and the best candidate, so that ``_words_gemv_config`` and the
routing between the two kernels can be set from one run. Every timed call is also checked against the float64
reference (``kernel_err``). Triton compiles each candidate once; ``--jobs`` processes compile them first (same
Triton cache), so the timing process only loads them.

    python tools/gemv_config_sweep.py --configs mamba1-1.4b,mamba1-130m --impls fp16-triton,w8a16 \
        --json $OUT/gemv_config_sweep.json

Writes JSON atomically (every row, the device).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import edgessm.ops.triton_gemv as gemv  # noqa: E402
from edgessm.io import atomic_write_json  # noqa: E402
from edgessm.runtime.bench import format_table  # noqa: E402
from gpu_gemv import (CONFIGS, WORD_GEMV_BITS, bench_row, conv_width, copy_bandwidth, prepare_row,  # noqa: E402
                      projection_shapes)

log = logging.getLogger("gemv_config_sweep")

Config = tuple[int, int, int, int, int]  # BLOCK_N, VEC, BLOCK_W, BATCH, num_warps
MAX_STEPS = 8  # K steps of a candidate (each one unrolled in the kernel)


def candidates(n: int, kw: int) -> list[Config]:
    """Configurations for N rows of kw words: BLOCK_W a power of two from 32 (or the row, if shorter) of at
    most MAX_STEPS steps padding at most a third of the row (VEC and warps as _words_gemv_config derives
    them), BLOCK_N 1-8, BATCH 1 or all steps within _WORDS_GEMV_MAX_WORDS words per thread."""
    out: list[Config] = []
    block_w = min(32, 1 << (kw - 1).bit_length())
    while block_w <= 512:  # 4 warps x 4 words
        steps = -(-kw // block_w)
        if steps <= MAX_STEPS and 3 * steps * block_w <= 4 * kw:
            vec = min(4, max(block_w // 32, 1))
            warps = max(block_w // (32 * vec), 1)
            for block_n in (b for b in (1, 2, 4, 8) if b <= n):
                for batch in sorted({b for b in (1, steps) if b <= steps and block_n * vec * b <= 32}):
                    out.append((block_n, vec, block_w, batch, warps))
        block_w *= 2
    return out


@contextmanager
def forced(kernel: str, config: Config | None = None) -> Iterator[None]:
    """Launches go to the row-streaming kernel (kernel 'rows') or to the word-streaming one (whatever the
    routing of _words_gemv_applies would pick) at ``config`` (None: _words_gemv_config's)."""
    applies, choose = gemv._words_gemv_applies, gemv._words_gemv_config
    gemv._words_gemv_applies = lambda *a, **k: kernel != "rows"
    if config is not None:
        gemv._words_gemv_config = lambda *a, **k: config
    try:
        yield
    finally:
        gemv._words_gemv_applies, gemv._words_gemv_config = applies, choose


def plan(args: argparse.Namespace) -> list[dict]:
    """Every (config, proj, impl, kernel, words config) to time, in order."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    jobs = []
    for config in args.configs.split(","):
        shapes = projection_shapes(CONFIGS[config])
        for proj in args.projections.split(","):
            n, k = shapes[proj]
            for impl in args.impls.split(","):
                bits = WORD_GEMV_BITS[impl]
                if k % (128 // bits) or (impl == "w4a16" and k % args.group):
                    continue
                kw = k * bits // 32
                base = {"config": config, "proj": proj, "N": n, "K": k, "impl": impl,
                        "conv_width": conv_width(proj, impl, args)}
                if impl != "w4a16":
                    jobs.append({**base, "kernel": "rows", "words": None})
                jobs.append({**base, "kernel": "default", "words": list(gemv._words_gemv_config(n, kw, bits, sms))})
                jobs += [{**base, "kernel": "candidate", "words": list(c)} for c in candidates(n, kw)]
    return jobs


def compile_shard(jobs: list[dict], args: argparse.Namespace) -> None:
    """Runs each job once (Triton compiles its kernel into the shared cache); no timing."""
    for job in jobs:
        x, _, tensors, call, _, _ = prepare_row(job["N"], job["K"], 1, job["impl"], args.group, job["conv_width"])
        with forced(job["kernel"], job["words"] and tuple(job["words"])):
            call(x, tensors)
    torch.cuda.synchronize()


def compile_all(jobs: list[dict], args: argparse.Namespace) -> None:
    """``--jobs`` subprocesses, each compiling every jobs-th job."""
    procs = [subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--shard", f"{i}/{args.jobs}"])
             for i in range(args.jobs)]
    if any(p.wait() for p in procs):
        raise RuntimeError("a compile shard failed (its log is above)")


def time_all(jobs: list[dict], args: argparse.Namespace) -> list[dict]:
    rows = []
    for i, job in enumerate(jobs):
        what = " ".join(str(job[k]) for k in ("config", "proj", "impl", "kernel", "words"))
        try:
            with forced(job["kernel"], job["words"] and tuple(job["words"])):
                rows.append({**job, **bench_row(job["N"], job["K"], 1, job["impl"], args, args.l2_bytes,
                                                job["conv_width"])})
            # one line per launch, so that a run cut short still shows what it timed
            log.info("[%d/%d] %s: %.3f us, err %.1e", i + 1, len(jobs), what, rows[-1]["us_per_call"],
                     rows[-1]["kernel_err"])
        except Exception as e:  # a candidate that fails (compile, resources) is reported, the rest still run
            log.warning("[%d/%d] %s failed: %s", i + 1, len(jobs), what, e)
            rows.append({**job, "error": f"{type(e).__name__}: {e}"[:300]})
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per (config, proj, impl): rows / default / best-candidate µs and the best candidate."""
    out: dict[tuple, dict] = {}
    for r in rows:
        if "us_per_call" not in r:
            continue
        s = out.setdefault((r["config"], r["proj"], r["impl"]), {"config": r["config"], "proj": r["proj"], "N": r["N"],
                                                                  "K": r["K"], "impl": r["impl"]})
        if r["kernel"] in ("rows", "default"):
            s[f"{r['kernel']}_us"] = r["us_per_call"]
        elif r["us_per_call"] < s.get("best_us", float("inf")):
            s.update(best_us=r["us_per_call"], best=",".join(map(str, r["words"])))
        s["max_kernel_err"] = max(s.get("max_kernel_err", 0.0), r["kernel_err"])
    return list(out.values())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="mamba1-1.4b,mamba1-130m")
    ap.add_argument("--projections", default="in_proj,x_proj,dt_proj,out_proj,lm_head")
    ap.add_argument("--impls", default="fp16-triton,w8a16,w8a8")
    ap.add_argument("--group", type=int, default=128, help="W4 quantization group")
    ap.add_argument("--copies", type=int, default=20, help="fewest weight copies per graph (gpu_gemv.py)")
    ap.add_argument("--l2-multiple", type=float, default=2.0, help="as gpu_gemv.py")
    ap.add_argument("--conv-width", type=int, default=0, help="in_proj with the decode conv update fused (gpu_gemv.py)")
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=8, help="compile processes (0: compile while timing)")
    ap.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # i/n: compile every n-th job from i
    ap.add_argument("--json", type=Path, default=Path("out/gemv_config_sweep.json"))
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not torch.cuda.is_available() or gemv.triton is None:
        log.error("gemv_config_sweep needs a CUDA GPU and triton")
        return 2
    jobs = plan(args)
    if args.shard:
        i, n = map(int, args.shard.split("/"))
        compile_shard(jobs[i::n], args)
        return 0
    log.info("%d launches to time", len(jobs))
    if args.jobs:
        compile_all(jobs, args)
    props = torch.cuda.get_device_properties(0)
    args.l2_bytes = int(getattr(props, "L2_cache_size", 50 << 20))
    device = {"name": torch.cuda.get_device_name(), "copy_bandwidth_gb_s": copy_bandwidth() / 1e9,
              "sms": props.multi_processor_count}
    rows = time_all(jobs, args)
    table = summary(rows)
    print(format_table(table, ["config", "proj", "N", "K", "impl", "rows_us", "default_us", "best_us", "best",
                               "max_kernel_err"]))
    atomic_write_json(args.json, {"device": device, "command": " ".join(sys.argv), "summary": table, "rows": rows})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
