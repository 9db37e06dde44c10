"""Per-projection decode GEMV latency on one GPU: cuBLAS float16 vs edgessm's Triton W8A16, W8A8, W4A16.

For each projection of the Mamba-1 models that the decode step runs as a linear layer
(edgessm.runtime.cuda_backend: in_proj [2 d_inner, d_model], x_proj [dt_rank + 2 d_state, d_inner],
dt_proj [d_inner, dt_rank], out_proj [d_model, d_inner], lm_head [vocab, d_model]) and each batch M
(rows of x, 1 by default), it times:

- ``fp16``: torch.nn.functional.linear on float16 weights (cuBLAS), what ``weights="float"`` ran before
  ``gemv_float``;
- ``fp16-triton``: edgessm.ops.triton_gemv.gemv_float on the same float16 weights (the word-streaming
  GEMV kernel of the W4 and W8A16 ones with 16-bit weights), what ``weights="float"`` runs for decode;
- ``w8a16``, ``w8a8``, ``w4a16``: edgessm.ops.triton_gemv.gemv_w8a16 / gemv_w8a8 / gemv_w4a16 on
  weights quantized from the same random float16 weights (W4: groups of ``--group``; W8A8: activation
  scale absmax(x) / 127). A projection whose K is not a multiple of the W4 group has no w4a16 row (the
  backend runs it as W8A16, e.g. dt_proj of Mamba-1 130M).

With ``--conv-width W`` the in_proj rows run as decode runs them: the GEMV with the causal conv update of
width W fused on its first d_inner columns (``ConvUpdate``; not for ``fp16``, whose cuBLAS call has no
epilogue), each weight copy with its own conv state; their ``kernel_err`` covers the other columns (the
conv columns are checked by tests/test_cuda_backend.py).

Each row is one CUDA graph of ``copies`` calls, each on its own copy of the weights (distinct
addresses, so L2 does not serve them: at least ``--copies``, and enough copies for
``--l2-multiple`` x the L2 size in weight bytes), replayed ``--replays`` times after ``--warmup``
replays; ``us_per_call`` is the median replay time / copies (graph launch overhead included, as in the
decode graph). ``gb_s`` counts the weight bytes one call reads (quantized weights + scales) and
``pct_copy_bw`` relates them to the device-to-device copy rate measured in the same run (bytes read +
written per second, as in gpu_decode.py). Accuracy, once per row on the first copy:
``err_vs_fp16`` = |y - y_fp16| / |y_fp16| against the cuBLAS float16 result on the unquantized weights
(quantization included: ~1e-2 for W8, ~1e-1 for W4 on random weights), ``kernel_err`` against the
float64 reference of the same quantized weights (edgessm.ops.triton_gemv.reference_*).

    python benchmarks/gpu_gemv.py --json $OUT/gpu_gemv.json

Prints a table and writes JSON (atomically) with every number and the device.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_decode import CONFIGS, copy_bandwidth, time_steps  # noqa: E402

from edgessm.config import MambaConfig  # noqa: E402
from edgessm.io import atomic_write_json  # noqa: E402
from edgessm.runtime.bench import format_table  # noqa: E402

log = logging.getLogger("gpu_gemv")

GEMV_CONFIGS = ("mamba1-130m", "mamba1-1.4b")
PROJECTIONS = ("in_proj", "x_proj", "dt_proj", "out_proj", "lm_head")
IMPLS = ("fp16", "fp16-triton", "w8a16", "w8a8", "w4a16")
MAX_COPIES = 4096
COLUMNS = ["config", "proj", "N", "K", "M", "conv_width", "impl", "us_per_call", "gb_s", "pct_copy_bw", "weight_bytes", "copies",
           "err_vs_fp16", "kernel_err", "error"]


def projection_shapes(cfg: MambaConfig) -> dict[str, tuple[int, int]]:
    """(N outputs, K inputs) of each decode linear layer of a Mamba-1 config."""
    return {
        "in_proj": (2 * cfg.d_inner, cfg.d_model),
        "x_proj": (cfg.dt_rank + 2 * cfg.d_state, cfg.d_inner),
        "dt_proj": (cfg.d_inner, cfg.dt_rank),
        "out_proj": (cfg.d_model, cfg.d_inner),
        "lm_head": (cfg.vocab_size, cfg.d_model),
    }


def weight_bytes(impl: str, n: int, k: int, group: int) -> int:
    """Bytes of weights (and scales) one call of ``impl`` reads for an [N, K] layer."""
    if impl in ("fp16", "fp16-triton"):
        return 2 * n * k
    if impl in ("w8a16", "w8a8"):
        return n * k + 4 * n
    return n * k // 2 + 4 * n * (k // group)


def copies_for(nbytes: int, min_copies: int, l2_bytes: int, l2_multiple: float) -> int:
    """Weight copies in one graph: ``min_copies``, or more until they span ``l2_multiple`` x L2."""
    return max(min_copies, min(MAX_COPIES, math.ceil(l2_multiple * l2_bytes / max(nbytes, 1))))


def summarize(row: dict, copy_bw: float) -> dict:
    """Adds GB/s of weight bytes and % of the copy bandwidth to a row with us_per_call and weight_bytes."""
    if row.get("us_per_call"):
        row["gb_s"] = row["weight_bytes"] / (row["us_per_call"] * 1e-6) / 1e9
        row["pct_copy_bw"] = 100 * row["gb_s"] * 1e9 / copy_bw
    return row


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


def _impl(impl: str, w: torch.Tensor, x: torch.Tensor, group: int):
    """(weight tensors, call(x, tensors, conv=None) -> y, float64 reference of y) of one implementation."""
    from edgessm.ops import triton_gemv as Q

    if impl == "fp16":
        return (w,), lambda x_, t, conv=None: torch.nn.functional.linear(x_, t[0]), x.double() @ w.double().T
    if impl == "fp16-triton":
        return (w,), lambda x_, t, conv=None: Q.gemv_float(x_, t[0], conv=conv), Q.reference_float(x, w)
    if impl == "w4a16":
        p, s = Q.quantize_w4(w, group)
        return (p, s), lambda x_, t, conv=None: Q.gemv_w4a16(x_, t[0], t[1], conv=conv), Q.reference_w4a16(x, p, s)
    q, s = Q.quantize_w8(w)
    if impl == "w8a16":
        return (q, s), lambda x_, t, conv=None: Q.gemv_w8a16(x_, t[0], t[1], conv=conv), Q.reference_w8a16(x, q, s)
    x_scale = float(x.float().abs().max()) / 127
    return ((q, s), lambda x_, t, conv=None: Q.gemv_w8a8(x_, x_scale, t[0], t[1], conv=conv),
            Q.reference_w8a8(x, x_scale, q, s))


def with_conv(call: Callable, n: int, x: torch.Tensor, width: int) -> tuple[Callable, torch.Tensor, int]:
    """(call(x, tensors + (conv state,)), a fresh conv state, conv channels): ``call`` with the conv update of
    ``width`` fused on the first n / 2 output columns (decode's in_proj) for x's rows, dtype and device, its
    state the tensors' last."""
    from edgessm.ops import triton_gemv as Q

    c = n // 2
    gen = torch.Generator(x.device).manual_seed(1)
    weight = torch.randn(c, width, device=x.device, generator=gen) * 0.5
    bias = torch.randn(c, device=x.device, generator=gen)
    state = torch.randn(x.shape[0], c, width - 1, device=x.device, generator=gen).to(x.dtype)
    return lambda x_, t: call(x_, t[:-1], conv=Q.ConvUpdate(t[-1], weight, bias, 0)), state, c


def prepare_row(n: int, k: int, m: int, impl: str, group: int, conv_width: int = 0):
    """One row's inputs, fixed-seed random float16 w [n, k] and x [m, k], and what a call of ``impl`` needs:
    (x, w, tensors, call(x, tensors) -> y, float64 reference of y, the output columns the errors cover);
    with conv_width the conv update is fused (with_conv), its state the tensors' last."""
    gen = torch.Generator("cuda").manual_seed(0)
    w = (torch.randn(n, k, device="cuda", generator=gen) / math.sqrt(k)).half()
    x = torch.randn(m, k, device="cuda", generator=gen).half()
    tensors, call, ref = _impl(impl, w, x, group)
    assert weight_bytes(impl, n, k, group) == sum(t.numel() * t.element_size() for t in tensors)
    plain = slice(0, n)
    if conv_width:
        call, state, c = with_conv(call, n, x, conv_width)
        tensors, plain = tensors + (state,), slice(c, n)
    return x, w, tensors, call, ref, plain


def bench_row(n: int, k: int, m: int, impl: str, args: argparse.Namespace, l2_bytes: int, conv_width: int = 0) -> dict:
    x, w, tensors, call, ref, plain = prepare_row(n, k, m, impl, args.group, conv_width)
    y_fp16 = torch.nn.functional.linear(x, w)
    nbytes = weight_bytes(impl, n, k, args.group)
    y = call(x, tensors)  # compiles the Triton kernel outside the capture
    row = {"weight_bytes": nbytes, "err_vs_fp16": rel_err(y[:, plain], y_fp16[:, plain]),
           "kernel_err": rel_err(y[:, plain], ref[:, plain])}
    del ref, y_fp16
    ncopies = copies_for(nbytes, args.copies, l2_bytes, args.l2_multiple)
    copies = [tuple(t.clone() for t in tensors) for _ in range(ncopies)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on the capture stream (cuBLAS workspaces, allocator)
        for t in copies[:2]:
            call(x, t)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [call(x, t) for t in copies]
    graph.replay()
    torch.cuda.synchronize()
    # (only the plain columns: the warm-up shifted the first copies' conv states once more than the others')
    if not torch.equal(outs[0][:, plain], outs[-1][:, plain]):
        raise RuntimeError("the copies of the weights gave different outputs")
    t = time_steps(graph.replay, args.replays, args.warmup)
    row.update(copies=ncopies, us_per_call=1e3 * t["ms_per_token"] / ncopies, p10_us=1e3 * t["p10_ms"] / ncopies,
               p90_us=1e3 * t["p90_ms"] / ncopies)
    return row

def conv_width(proj: str, impl: str, args: argparse.Namespace) -> int:
    """The conv update fused into this row's GEMV (--conv-width; in_proj only, not cuBLAS's fp16), 0 if none."""
    return args.conv_width if proj == "in_proj" and impl != "fp16" else 0


# weight bits of the impls that may run edgessm's word-streaming GEMV kernel (its launch config goes in the JSON)
WORD_GEMV_BITS = {"w4a16": 4, "w8a16": 8, "w8a8": 8, "fp16-triton": 16}


def run(args: argparse.Namespace, copy_bw: float, l2_bytes: int,
        bench: Callable[..., dict] = bench_row) -> list[dict]:
    from edgessm.ops import triton_gemv as Q

    rows: list[dict] = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for config in args.configs.split(","):
        shapes = projection_shapes(CONFIGS[config])
        for proj in args.projections.split(","):
            n, k = shapes[proj]
            for m in (int(v) for v in args.batch.split(",")):
                for impl in args.impls.split(","):
                    row = {"config": config, "proj": proj, "N": n, "K": k, "M": m, "impl": impl,
                           "conv_width": conv_width(proj, impl, args)}
                    if impl == "w4a16" and k % args.group:
                        continue  # the backend runs such a layer as W8A16
                    bits = WORD_GEMV_BITS.get(impl)
                    x = torch.empty(m, k, dtype=torch.float16, device="meta")
                    if bits and Q._words_gemv_applies(x, k, bits, a8=impl == "w8a8"):
                        row["words_config"] = dict(zip(("BLOCK_N", "VEC", "BLOCK_W", "BATCH", "num_warps"),
                                                       Q._words_gemv_config(n, k * bits // 32, bits, sms)))
                    log.info("%s %s [%d x %d] M=%d %s", config, proj, n, k, m, impl)
                    try:
                        row.update(bench(n, k, m, impl, args, l2_bytes, conv_width(proj, impl, args)))
                    except Exception as e:  # one failing row is reported in the table; the others still run
                        log.exception("%s %s %s failed", config, proj, impl)
                        row["error"] = f"{type(e).__name__}: {e}"[:300]
                    rows.append(summarize(row, copy_bw))
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=",".join(GEMV_CONFIGS), help=f"comma-separated, from {', '.join(GEMV_CONFIGS)}")
    ap.add_argument("--projections", default=",".join(PROJECTIONS), help=f"comma-separated, from {', '.join(PROJECTIONS)}")
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, from {', '.join(IMPLS)}")
    ap.add_argument("--batch", default="1", help="comma-separated rows of x (M), e.g. 1,2,4")
    ap.add_argument("--group", type=int, default=128, help="W4 quantization group")
    ap.add_argument("--copies", type=int, default=20, help="fewest weight copies (calls) per graph")
    ap.add_argument("--l2-multiple", type=float, default=2.0,
                    help="more copies until they span this many L2 sizes (0: exactly --copies)")
    ap.add_argument("--conv-width", type=int, default=0,
                    help="fuse the decode conv update of this width into in_proj's GEMV, as decode does (0: none)")
    ap.add_argument("--replays", type=int, default=50, help="timed graph replays per row")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", type=Path, default=Path(os.environ.get("OUT", "out")) / "gpu_gemv.json")
    args = ap.parse_args(argv)
    for opt, allowed in (("configs", GEMV_CONFIGS), ("projections", PROJECTIONS), ("impls", IMPLS)):
        bad = [v for v in getattr(args, opt).split(",") if v not in allowed]
        if bad:
            ap.error(f"--{opt}: unknown {bad}, expected some of {', '.join(allowed)}")
    if args.conv_width < 0:
        ap.error(f"--conv-width: expected 0 (none) or a conv width, got {args.conv_width}")
    if not all(v.isdigit() and int(v) >= 1 for v in args.batch.split(",")):
        ap.error(f"--batch: expected positive integers, got {args.batch!r}")
    return args


def write_results(path: Path, rows: list[dict], device: dict, args: argparse.Namespace) -> None:
    errs = ("err_vs_fp16", "kernel_err")  # small: shown as 1.2e-04, not as format_table's 0.000
    print(format_table([{k: f"{v:.1e}" if k in errs and isinstance(v, float) else v for k, v in r.items()} for r in rows],
                       COLUMNS))
    atomic_write_json(path, {"device": device, "rows": rows, "command": " ".join(sys.argv),
                             "args": {k: str(v) for k, v in vars(args).items()}})
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not torch.cuda.is_available():
        print("gpu_gemv: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    from edgessm.ops import triton_gemv as Q

    if Q.triton is None:
        print("gpu_gemv: needs the `triton` package for the quantized GEMV kernels", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    props = torch.cuda.get_device_properties(0)
    l2_bytes = int(getattr(props, "L2_cache_size", 50 << 20))
    bw = copy_bandwidth()
    import triton

    device = {"name": torch.cuda.get_device_name(), "copy_bandwidth_gb_s": bw / 1e9, "torch": torch.__version__,
              "triton": triton.__version__, "cuda": torch.version.cuda, "sms": props.multi_processor_count,
              "l2_bytes": l2_bytes}
    print(f"device: {device}")
    write_results(args.json, run(args, bw, l2_bytes), device, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
