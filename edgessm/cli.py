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
@click.option("--backend", type=click.Choice(["auto", "torch", "ort", "trt"]), default="auto", show_default=True,
              help="auto: ONNX dirs run on ORT, engine dirs on TensorRT, checkpoints on torch.")
@click.option("--device", default="cpu", show_default=True, help="torch backend device (cpu, cuda).")
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


if __name__ == "__main__":
    main()
