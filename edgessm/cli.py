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
@click.option("--stop-at-eos/--no-stop-at-eos", default=False, show_default=True)
def generate(model: Path, prompt: str, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
             seed: int | None, backend: str, device: str, stop_at_eos: bool) -> None:
    """Generate text from MODEL (checkpoint, quantized dir, ONNX export or engine dir)."""
    from edgessm.runtime import open_backend
    from edgessm.runtime.generation import Sampling, generate as run_generate
    from edgessm.runtime.tokenizer import load_tokenizer

    session = open_backend(model, backend, device)
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
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the result as JSON.")
def eval_cmd(model: Path, data: Path, window: int, max_windows: int | None, backend: str, device: str,
             json_out: Path | None) -> None:
    """Perplexity and next-token accuracy of MODEL (any backend) on held-out text."""
    from edgessm.io import atomic_write_json
    from edgessm.runtime import open_backend
    from edgessm.runtime.evaluate import evaluate_file
    from edgessm.runtime.tokenizer import load_tokenizer

    session = open_backend(model, backend, device)
    result = evaluate_file(session, data, load_tokenizer(model, session.config.vocab_size), window, max_windows, progress=True)
    click.echo(f"[{session.name}] perplexity {result.perplexity:.4f}  accuracy {100 * result.accuracy:.2f}%  "
               f"({result.tokens} tokens, {result.windows} windows of {window})")
    if json_out:
        atomic_write_json(json_out, {"model": str(model), "backend": session.name, "data": str(data), **result.as_dict()})


@main.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_BACKEND
@_DEVICE
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1))
@click.option("--prompt-len", default=128, show_default=True, type=click.IntRange(1))
@click.option("--new-tokens", default=32, show_default=True, type=click.IntRange(1))
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1))
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the result as JSON.")
def bench(model: Path, backend: str, device: str, batch: int, prompt_len: int, new_tokens: int, repeats: int,
          json_out: Path | None) -> None:
    """Prefill tokens/s, decode ms/token and peak memory of MODEL on a backend."""
    from edgessm.io import atomic_write_json
    from edgessm.runtime import open_backend
    from edgessm.runtime.bench import bench_backend, format_table

    result = bench_backend(open_backend(model, backend, device), batch, prompt_len, new_tokens, repeats).as_dict()
    click.echo(format_table([result], list(result)))
    if json_out:
        atomic_write_json(json_out, {"model": str(model), **result})


if __name__ == "__main__":
    main()
