"""Decode-step latency of whole models on one GPU: edgessm's CUDA backend vs its floor and baselines.

For each model config (random weights from edgessm.models.loading.random_model, batch 1) and each
weights mode of edgessm.runtime.cuda_backend (float16, W8A16, W8A8, W4A16: the quantized weights are
quantized from the random float16 weights; W8A8 activation scales are calibrated on random tokens,
which is fine for speed only), it measures:

- ``cuda-graph``: one decode step = one CUDA graph replay (CUDA kernels + Triton GEMV), median over
  ``--steps`` replays timed with CUDA events after ``--warmup`` replays;
- ``floor``: bytes one step must move (every weight once, + the recurrent states read and written)
  / the device-to-device copy bandwidth measured in the same run (bytes read + written per second);
- baselines on the same GPU, float16: ``cuda-eager`` (the same kernels without the graph),
  ``torch-eager`` (edgessm's reference PyTorch model, MambaLM.step) and ``hf-slow`` (Hugging Face
  transformers' Mamba(2)ForCausalLM with use_cache=True, one token at a time; the slow path, as no
  mamba_ssm/causal_conv1d kernels are installed), each the median of CUDA-event-timed steps.

    python benchmarks/gpu_decode.py --json $OUT/gpu_decode.json

Prints a table and writes JSON (atomically) with every number and the device.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgessm.config import MambaConfig  # noqa: E402
from edgessm.io import atomic_write_json  # noqa: E402
from edgessm.models.loading import random_model  # noqa: E402
from edgessm.runtime.bench import format_table  # noqa: E402
from edgessm.runtime.gpu_profile import KernelTime, format_kernel_times, kernel_times  # noqa: E402

log = logging.getLogger("gpu_decode")

CONFIGS = {
    "mamba1-130m": MambaConfig(arch="mamba1", vocab_size=50280, d_model=768, n_layer=24, d_state=16),
    "mamba1-1.4b": MambaConfig(arch="mamba1", vocab_size=50280, d_model=2048, n_layer=48, d_state=16),
    "mamba2-130m": MambaConfig(arch="mamba2", vocab_size=50280, d_model=768, n_layer=24, d_state=128, head_dim=64,
                               n_groups=1, chunk_size=256),
}
MODES = ("float", "w8a16", "w8a8", "w4a16")
PROMPT_LEN = 16


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read + written (median of ``repeats``)."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    if not torch.equal(dst, src):
        raise RuntimeError("device copy produced a wrong result")
    return 2 * src.numel() * 4 / statistics.median(times)


def release_cuda_memory() -> None:
    """Frees what the last backend or model left behind, so that the next one is measured alone."""
    gc.collect()
    torch.cuda.empty_cache()


def time_steps(step: Callable[[], None], steps: int, warmup: int) -> dict[str, float]:
    """CUDA-event time of each call of ``step`` on the current stream; median/p10/p90 in ms."""
    for _ in range(warmup):
        step()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
    for s, e in zip(starts, ends):
        s.record()
        step()
        e.record()
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return {"ms_per_token": statistics.median(ms), "p10_ms": ms[len(ms) // 10], "p90_ms": ms[(9 * len(ms)) // 10],
            "steps": steps}


def _backend_after_prompt(model, mode: str, prompt: torch.Tensor, bw: float):
    from edgessm.runtime.cuda_backend import CudaBackend

    backend = CudaBackend(model, weights=mode)
    logits, states = backend.prefill_tensors(prompt)
    nbytes = backend.decode_weight_bytes(1) + 2 * backend.state_bytes(1)
    return backend, logits[:, -1].argmax(-1), states, {"bytes_per_token": nbytes, "floor_ms": 1e3 * nbytes / bw}


def bench_cuda_graph(model, mode: str, prompt: torch.Tensor, steps: int, warmup: int, bw: float,
                     profile: bool = False) -> list[dict]:
    """One decode step replayed from a CUDA graph; with `profile`, also each kernel's own time in it."""
    t0 = time.perf_counter()
    backend, token, states, floor = _backend_after_prompt(model, mode, prompt, bw)
    g = backend.decode_graph(1)
    g.states.copy_(states)
    g.token.copy_(token)
    row = {"impl": "cuda-graph", "weights": mode, "setup_s": time.perf_counter() - t0, **floor,
           **time_steps(g.graph.replay, steps, warmup)}
    if profile:
        row["kernels"] = [asdict(k) for k in kernel_times(lambda i: g.graph.replay())]
    if not torch.isfinite(g.logits).all():
        raise RuntimeError(f"{mode}: non-finite logits after {steps + warmup} graph replays")
    return [row]


def bench_cuda_eager(model, prompt: torch.Tensor, steps: int, warmup: int, bw: float) -> list[dict]:
    """The same kernels launched one by one from Python (no graph): what the graph saves."""
    backend, token, states, floor = _backend_after_prompt(model, "float", prompt, bw)
    return [{"impl": "cuda-eager", "weights": "float", **floor,
             **time_steps(lambda: backend._decode(token, states), steps, warmup)}]


def bench_torch_eager(model, prompt: torch.Tensor, steps: int, warmup: int) -> dict:
    with torch.no_grad():
        logits, states = model(prompt)
        token = logits[:, -1].argmax(-1)
        holder = {"states": states}

        def step() -> None:
            _, holder["states"] = model.step(token, holder["states"])

        return {"impl": "torch-eager", "weights": "float", **time_steps(step, steps, warmup)}


def bench_hf(model, prompt: torch.Tensor, steps: int, warmup: int) -> dict:
    """transformers' model with our weights (same key names), fp16, slow path, one token per call."""
    import transformers

    cfg = model.config
    hf_cfg = cfg.to_hf_dict()
    cls, cfg_cls = ((transformers.MambaForCausalLM, transformers.MambaConfig) if cfg.arch == "mamba1"
                    else (transformers.Mamba2ForCausalLM, transformers.Mamba2Config))
    kw = {k: v for k, v in hf_cfg.items() if k not in ("model_type", "architectures")}
    with torch.device("cuda"):
        hf = cls(cfg_cls(**kw)).half().eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"state dict mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}")
    with torch.no_grad():
        out = hf(input_ids=prompt, use_cache=True)
        cache, pos = out.cache_params, prompt.shape[1]
        token = out.logits[:, -1].argmax(-1)
        ours, st = model(prompt)
        ours_step, _ = model.step(token, st)
        first = hf(input_ids=token[:, None], cache_params=cache, use_cache=True,
                   cache_position=torch.tensor([pos], device="cuda"))
        agree = float((first.logits[:, -1].double() - ours_step.double()).norm() / ours_step.double().norm())

        def step() -> None:
            hf(input_ids=token[:, None], cache_params=cache, use_cache=True,
               cache_position=torch.tensor([pos], device="cuda"))

        row = {"impl": "hf-slow", "weights": "float", **time_steps(step, steps, warmup),
               "logits_rel_err_vs_edgessm": agree, "transformers": transformers.__version__}
    del hf
    return row


def run_config(name: str, modes: list[str], steps: int, warmup: int, bw: float, baselines: bool,
               profile: bool = False) -> list[dict]:
    cfg = CONFIGS[name]
    with torch.device("cuda"):
        model = random_model(cfg, seed=0).half()
    prompt = torch.randint(0, cfg.vocab_size, (1, PROMPT_LEN), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    params = model.num_parameters()
    rows: list[dict] = []
    jobs: list[tuple[str, str, Callable[[], list[dict]]]] = [
        ("cuda-graph", mode, lambda mode=mode: bench_cuda_graph(model, mode, prompt, steps, warmup, bw, profile)) for mode in modes
    ]
    if baselines:
        jobs.append(("cuda-eager", "float", lambda: bench_cuda_eager(model, prompt, max(steps // 4, 20), 5, bw)))
        jobs.append(("torch-eager", "float", lambda: [bench_torch_eager(model, prompt, max(steps // 4, 20), 5)]))
        jobs.append(("hf-slow", "float", lambda: [bench_hf(model, prompt, max(steps // 10, 20), 3)]))
    for impl, mode, job in jobs:
        log.info("%s: %s, %s weights", name, impl, mode)
        try:
            rows += job()
        except Exception as e:  # one failing row is reported in the table; the others still run
            log.exception("%s %s %s failed", name, impl, mode)
            rows.append({"impl": impl, "weights": mode, "error": f"{type(e).__name__}: {e}"[:300]})
        release_cuda_memory()
    fp16 = next((r for r in rows if r["impl"] == "cuda-graph" and r["weights"] == "float" and "floor_ms" in r), None)
    for r in rows:
        r.update(config=name, params_m=params / 1e6)
        if fp16 is not None and r["weights"] == "float" and "floor_ms" not in r:  # baselines read fp16 weights too
            r.update(floor_ms=fp16["floor_ms"], bytes_per_token=fp16["bytes_per_token"])
        if "ms_per_token" in r and "floor_ms" in r:
            r["pct_of_floor"] = 100 * r["floor_ms"] / r["ms_per_token"]
        if "ms_per_token" in r:
            r["tokens_per_s"] = 1e3 / r["ms_per_token"]
    del model
    release_cuda_memory()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    ap.add_argument("--steps", type=int, default=400, help="timed graph replays per row (baselines use fewer)")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--no-baselines", action="store_true", help="skip torch-eager and transformers")
    ap.add_argument("--kernel-times", action="store_true",
                    help="cuda-graph rows: also each kernel's GPU time per step (torch profiler), printed and in the JSON")
    ap.add_argument("--json", type=Path, default=Path(os.environ.get("OUT", "out")) / "gpu_decode.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not torch.cuda.is_available():
        print("gpu_decode: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    bw = copy_bandwidth()
    device = {"name": torch.cuda.get_device_name(), "copy_bandwidth_gb_s": bw / 1e9, "torch": torch.__version__,
              "cuda": torch.version.cuda, "sms": torch.cuda.get_device_properties(0).multi_processor_count}
    print(f"device: {device}")
    rows: list[dict] = []
    for name in args.configs.split(","):
        rows += run_config(name, args.modes.split(","), args.steps, args.warmup, bw, not args.no_baselines,
                           args.kernel_times)
    cols = ["config", "impl", "weights", "ms_per_token", "p10_ms", "p90_ms", "floor_ms", "pct_of_floor", "tokens_per_s",
            "bytes_per_token", "error"]
    print(format_table(rows, cols))
    for r in rows:
        if "kernels" in r:
            ks = [KernelTime(**k) for k in r["kernels"]]
            print(f"{r['config']} {r['weights']}: {sum(k.us_per_call for k in ks):.1f} us of kernels in "
                  f"{sum(k.launches_per_call for k in ks):g} launches per step; {format_kernel_times(ks, 12)}")
    atomic_write_json(args.json, {"device": device, "batch": 1, "prompt_len": PROMPT_LEN, "rows": rows,
                                  "command": " ".join(sys.argv)})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
