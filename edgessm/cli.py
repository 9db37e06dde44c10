"""The `edgessm` command line: thin wrappers over library functions (each command has a Python twin)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click
import numpy as np

from edgessm.errors import EdgessmError

log = logging.getLogger("edgessm")


class _Group(click.Group):
    """Turns edgessm's own errors into one clear line and exit status 2, without a traceback."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except EdgessmError as e:
            raise click.ClickException(str(e)) from e


@click.group(cls=_Group)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="edgessm")
def main(verbose: int) -> None:
    """edgessm: Mamba models to quantized ONNX / TensorRT engines for NVIDIA edge GPUs."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


_BACKEND = click.option("--backend", type=click.Choice(["auto", "torch", "ort", "trt"]), default="auto", show_default=True,
                        help="auto: ONNX dirs run on ORT, engine dirs on TensorRT, checkpoints on torch.")
_DEVICE = click.option("--device", default="cpu", show_default=True, help="torch backend device (cpu, cuda).")
_GPU_WEIGHTS = click.option(
    "--gpu-weights", type=click.Choice(["float", "w8a16", "w4a16"]), default="float", show_default=True,
    help="With --device cuda, a float checkpoint's linear layers: float16 or weight-only int8 / int4 "
         "quantized at load time (Triton GEMV kernels for decode, CUDA-graph decode).")


@main.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info(model: Path, as_json: bool) -> None:
    """Architecture, sizes, parameter count and weight memory of MODEL (a checkpoint directory)."""
    from edgessm.info import model_info

    data = model_info(model).as_dict()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        if value is None:
            continue
        click.echo(f"{key:<24} {value:,.2f}" if isinstance(value, float) else f"{key:<24} {value:,}" if isinstance(value, int) else f"{key:<24} {value}")


@main.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--prompt", default="", help="Text prompt (tokenized with the model's tokenizer.json, else bytes).")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(0))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0), help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(0))
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", default=None, type=int, help="Seed for sampling (reproducible output).")
@_BACKEND
@_DEVICE
@_GPU_WEIGHTS
@click.option("--stop-at-eos/--no-stop-at-eos", default=False, show_default=True)
def generate(model: Path, prompt: str, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
             seed: int | None, backend: str, device: str, gpu_weights: str, stop_at_eos: bool) -> None:
    """Generate text from MODEL (checkpoint, quantized dir, ONNX export or engine dir)."""
    from edgessm.runtime import open_backend
    from edgessm.runtime.generation import Sampling, generate as run_generate
    from edgessm.runtime.tokenizer import load_tokenizer

    session = open_backend(model, backend, device, gpu_weights=gpu_weights)
    tokenizer = load_tokenizer(model, session.config.vocab_size)
    ids = tokenizer.encode(prompt) or [session.config.bos_token_id or 0]
    result = run_generate(
        session, np.array([ids], dtype=np.int64), max_new_tokens,
        Sampling(temperature, top_k, top_p, seed), session.config.eos_token_id if stop_at_eos else None,
    )
    click.echo(tokenizer.decode(result.tokens[0].tolist()))
    click.echo(
        f"[{session.name}] prompt {len(ids)} tokens in {1e3 * result.prefill_seconds:.1f} ms, "
        f"{result.new_tokens.shape[1]} new tokens at {result.decode_ms_per_token:.2f} ms/token",
        err=True,
    )


@main.command("eval")
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Held-out text file.")
@click.option("--window", default=256, show_default=True, type=click.IntRange(2), help="Tokens per evaluation window.")
@click.option("--max-windows", default=None, type=click.IntRange(1), help="Evaluate at most this many windows.")
@_BACKEND
@_DEVICE
@_GPU_WEIGHTS
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the result as JSON.")
def eval_cmd(model: Path, data: Path, window: int, max_windows: int | None, backend: str, device: str,
             gpu_weights: str, json_out: Path | None) -> None:
    """Perplexity and next-token accuracy of MODEL (any backend) on held-out text."""
    from edgessm.io import atomic_write_json
    from edgessm.runtime import open_backend
    from edgessm.runtime.evaluate import evaluate_file
    from edgessm.runtime.tokenizer import load_tokenizer

    session = open_backend(model, backend, device, gpu_weights=gpu_weights)
    result = evaluate_file(session, data, load_tokenizer(model, session.config.vocab_size), window, max_windows, progress=True)
    click.echo(f"[{session.name}] perplexity {result.perplexity:.4f}  accuracy {100 * result.accuracy:.2f}%  "
               f"({result.tokens} tokens, {result.windows} windows of {window})")
    if json_out:
        atomic_write_json(json_out, {"model": str(model), "backend": session.name, "data": str(data), **result.as_dict()})


@main.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_BACKEND
@_DEVICE
@_GPU_WEIGHTS
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1))
@click.option("--prompt-len", default=128, show_default=True, type=click.IntRange(1))
@click.option("--new-tokens", default=32, show_default=True, type=click.IntRange(1))
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1))
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the result as JSON.")
def bench(model: Path, backend: str, device: str, gpu_weights: str, batch: int, prompt_len: int, new_tokens: int,
          repeats: int, json_out: Path | None) -> None:
    """Prefill tokens/s, decode ms/token and peak memory of MODEL on a backend."""
    from edgessm.io import atomic_write_json
    from edgessm.runtime import open_backend
    from edgessm.runtime.bench import bench_backend, format_table

    session = open_backend(model, backend, device, gpu_weights=gpu_weights)
    result = bench_backend(session, batch, prompt_len, new_tokens, repeats).as_dict()
    click.echo(format_table([result], list(result)))
    if json_out:
        atomic_write_json(json_out, {"model": str(model), **result})


@main.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output directory.")
@click.option("--recipe", "recipe_name", default="w8a8", show_default=True,
              type=click.Choice(["w8a8", "w8a8-naive", "w8a8-percentile", "w4a8", "w4a16"]))
@click.option("--calib", type=click.Path(exists=True, path_type=Path),
              help="Calibration text: file, directory of files, or JSON-lines (field \"text\"). Default: calibration/default.txt.")
@click.option("--num-samples", default=128, show_default=True, type=click.IntRange(1))
@click.option("--seq-len", default=512, show_default=True, type=click.IntRange(2))
@click.option("--percentile", type=click.FloatRange(50, 100, min_open=True), help="Clip x at this percentile (recipe default).")
@click.option("--group-size", type=click.IntRange(0), help="Weight group size (0 = per channel; recipe default).")
@click.option("--method", type=click.Choice(["gptq", "rtn"]), help="Weight rounding (recipe default).")
@click.option("--eval-data", type=click.Path(exists=True, path_type=Path), help="Held-out text: report float vs quantized perplexity.")
@click.option("--eval-window", default=256, show_default=True, type=click.IntRange(2))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--device", default="cpu", show_default=True, help="torch device for calibration (cpu, cuda).")
def quantize(model: Path, out: Path, recipe_name: str, calib: Path | None, num_samples: int, seq_len: int,
             percentile: float | None, group_size: int | None, method: str | None, eval_data: Path | None,
             eval_window: int, batch_size: int, device: str) -> None:
    """Quantize MODEL (Quamba W8A8 / Quamba2 W4A8, W4A16) into OUT, with quant_report.{json,md}."""
    from edgessm.quant import get_recipe, quantize_checkpoint

    recipe = get_recipe(recipe_name, percentile=percentile, group_size=group_size, method=method)
    report = quantize_checkpoint(model, out, recipe, calib, num_samples, seq_len, eval_data, eval_window, batch_size,
                                 device=device)
    sqnr = [layer["mixer_output_sqnr_db"] for layer in report["layers"]]
    click.echo(f"wrote {out} ({recipe.name}); mixer output SQNR per layer: min {min(sqnr):.2f} dB, mean {sum(sqnr) / len(sqnr):.2f} dB")
    if "perplexity" in report:
        p = report["perplexity"]
        click.echo(f"perplexity on {p['source']} ({p['tokens']} tokens): float {p['float']:.4f}, quantized {p['quantized']:.4f}")



@main.command("export")
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output directory.")
@click.option("--scan", type=click.Choice(["plugin", "portable"]), default="plugin", show_default=True,
              help="plugin: edgessm custom ops (TensorRT plugins); portable: standard ONNX ops only.")
@click.option("--graphs", default="prefill,decode", show_default=True, help="Comma-separated: prefill, decode.")
@click.option("--opset", default=21, show_default=True, type=int)
@click.option("--external-data-threshold", default=2 * 1024 * 1024, show_default=True, type=click.IntRange(0),
              help="Total initializer bytes above which weights go to weights.onnx.data.")
def export_cmd(model: Path, out: Path, scan: str, graphs: str, opset: int, external_data_threshold: int) -> None:
    """Export MODEL to ONNX: prefill.onnx, decode.onnx, manifest.json (docs/export.md)."""
    from edgessm.export import export_onnx

    result = export_onnx(model, out, scan=scan, graphs=tuple(g.strip() for g in graphs.split(",") if g.strip()),
                         opset=opset, external_data_threshold=external_data_threshold)
    ops = ", ".join(result.manifest["custom_ops"]) or "none"
    click.echo(f"wrote {out}: {', '.join(result.files)} (scan {scan}, opset {opset}, custom ops: {ops})")


@main.command("run")
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--tokens", "token_ids", help="Comma-separated prompt token ids (default: --prompt through the tokenizer).")
@click.option("--prompt", default="", help="Text prompt (the directory's tokenizer.json, else bytes).")
@click.option("--new-tokens", default=16, show_default=True, type=click.IntRange(0))
@_BACKEND
@_DEVICE
@_GPU_WEIGHTS
@click.option("--compare", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Source checkpoint: also report the logits error vs PyTorch (float64) and greedy agreement.")
@click.option("--threads", type=click.IntRange(1), help="ONNX Runtime intra-op threads.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def run_cmd(model: Path, token_ids: str | None, prompt: str, new_tokens: int, backend: str, device: str,
            gpu_weights: str, compare: Path | None, threads: int | None, as_json: bool) -> None:
    """Run MODEL (usually an ONNX export or engine dir): greedy tokens after a prompt, timings, optional check."""
    from edgessm.config import load_config
    from edgessm.runtime import run_model
    from edgessm.runtime.tokenizer import load_tokenizer

    tokenizer = None
    if token_ids:
        try:
            ids = [int(t) for t in token_ids.split(",")]
        except ValueError as e:
            raise click.BadParameter(f"expected comma-separated integers, got {token_ids!r}", param_hint="--tokens") from e
    else:
        tokenizer = load_tokenizer(model, load_config(model).vocab_size)
        ids = tokenizer.encode(prompt) or [0]
    report = run_model(model, np.array([ids], dtype=np.int64), new_tokens, backend, device, compare, threads,
                       gpu_weights)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    new = report["new_tokens"][0]
    click.echo(tokenizer.decode(ids + new) if tokenizer else " ".join(map(str, ids + new)))
    scan = f", {report['scan']} scan" if report["scan"] else ""
    click.echo(f"[{report['backend']}{scan}] prefill {report['prefill_ms']:.1f} ms, "
               f"decode {report['decode_ms_per_token']:.2f} ms/token", err=True)
    if "compare" in report:
        c = report["compare"]
        click.echo(f"vs PyTorch float64: prefill logits rel err {c['prefill_rel_err']:.2e}; "
                   f"greedy tokens equal: {c['tokens_equal']}", err=True)


@main.command()
@click.argument("onnx_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Engine directory to write (prefill.engine, decode.engine, engine.json).")
@click.option("--fp16/--no-fp16", default=True, show_default=True, help="Allow float16 kernels (float32 graphs).")
@click.option("--int8", is_flag=True, help="Allow int8 kernels (graphs with Q/DQ or quantized edgessm ops).")
@click.option("--prefill-batch", default="1", show_default=True, help="Batch range N or MIN:OPT:MAX.")
@click.option("--prefill-len", default="1:128:1024", show_default=True, help="Prompt-length range MIN:OPT:MAX.")
@click.option("--decode-batch", default="1", show_default=True, help="Decode batch range N or MIN:OPT:MAX.")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), help="Reused/updated timing cache file.")
@click.option("--plugin", "plugin_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="libedgessm_plugins.so (default: $EDGESSM_PLUGIN_PATH, then plugins/build*/).")
@click.option("--workspace-mib", type=click.IntRange(1), default=None, help="Builder workspace limit.")
def build(onnx_dir: Path, out_dir: Path, fp16: bool, int8: bool, prefill_batch: str, prefill_len: str,
          decode_batch: str, timing_cache: Path | None, plugin_path: Path | None, workspace_mib: int | None) -> None:
    """Build TensorRT engines (prefill + decode) from an `edgessm export` directory."""
    from edgessm.build import EngineShapes, Range, build_engine

    shapes = EngineShapes(Range.parse(prefill_batch), Range.parse(prefill_len), Range.parse(decode_batch))
    out = build_engine(onnx_dir, out_dir, fp16=fp16, int8=int8, shapes=shapes, timing_cache=timing_cache,
                       plugin_path=plugin_path, workspace_mib=workspace_mib)
    click.echo(f"engines written to {out}")


@main.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Report directory: report.json, report.md, ranges.png and one quantized model per recipe.")
@click.option("--data", required=True, type=click.Path(exists=True, path_type=Path), help="Held-out text.")
@click.option("--recipes", default="w8a8-naive,w8a8-percentile,w8a8,w4a16,w4a8", show_default=True)
@click.option("--calib", type=click.Path(exists=True, path_type=Path), help="Calibration text (default: calibration/default.txt).")
@click.option("--num-samples", default=64, show_default=True, type=click.IntRange(1))
@click.option("--seq-len", default=256, show_default=True, type=click.IntRange(2))
@click.option("--window", default=256, show_default=True, type=click.IntRange(2))
@click.option("--max-windows", default=None, type=click.IntRange(1), help="Evaluate at most this many windows.")
def report(model: Path, out: Path, data: Path, recipes: str, calib: Path | None, num_samples: int, seq_len: int,
           window: int, max_windows: int | None) -> None:
    """Float vs every recipe: perplexity, per-layer SQNR, and a plot of activation ranges before/after Hadamard."""
    from edgessm.quant.compare import compare_recipes, report_markdown

    result = compare_recipes(model, out, data, tuple(r.strip() for r in recipes.split(",") if r.strip()), calib,
                             num_samples, seq_len, window, max_windows)
    click.echo(report_markdown(result))
    click.echo(f"written: {out / 'report.json'}, {out / 'report.md'}, {out / 'ranges.png'}")


if __name__ == "__main__":
    main()
