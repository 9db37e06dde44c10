"""`edgessm report`: one model, every recipe — perplexity, per-layer SQNR, and why Hadamard helps.

For each recipe the checkpoint is quantized (the quantized directories are kept under the
report directory), then float and quantized models are scored on the same held-out text with the
`edgessm eval` protocol. A PNG shows, per layer, the range of the out_proj input before and after
the Hadamard rotation (max |x| over its RMS: the outlier ratio that sets an int8 scale's
resolution).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgessm.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from edgessm.models import MambaLM, load_model
from edgessm.ops.hadamard import hadamard_transform
from edgessm.quant.api import quantize_checkpoint
from edgessm.quant.calibration import read_texts, sample_windows, token_stream
from edgessm.quant.recipe import get_recipe
from edgessm.runtime import load_any_model
from edgessm.runtime.backend import TorchBackend
from edgessm.runtime.evaluate import EvalResult, evaluate_tokens
from edgessm.runtime.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

DEFAULT_RECIPES = ("w8a8-naive", "w8a8-percentile", "w8a8", "w4a16", "w4a8")


@torch.no_grad()
def out_proj_input_ranges(model: MambaLM, tokens: torch.Tensor) -> list[dict[str, float]]:
    """Per layer: max|x| and RMS of the out_proj input, as computed and after the Hadamard rotation."""
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(model.mixers))}
    for i, mixer in enumerate(model.mixers):
        mixer.site_fns["out_in"] = lambda t, i=i: captured[i].append(t.detach().flatten(0, -2)) or t
    try:
        model(tokens)
    finally:
        for mixer in model.mixers:
            mixer.site_fns.pop("out_in", None)
    rows = []
    for i in range(len(model.mixers)):
        x = torch.cat(captured[i]).double()
        hx = hadamard_transform(x)
        rows.append({
            "layer": i,
            "absmax": x.abs().max().item(),
            "rms": x.pow(2).mean().sqrt().item(),
            "absmax_rotated": hx.abs().max().item(),
            "rms_rotated": hx.pow(2).mean().sqrt().item(),
        })
    return rows


def plot_ranges(rows: list[dict[str, float]], title: str) -> bytes:
    """A PNG: per-layer max|x|/RMS of the out_proj input, before vs after rotation."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = np.array([r["layer"] for r in rows])
    before = np.array([r["absmax"] / r["rms"] for r in rows])
    after = np.array([r["absmax_rotated"] / r["rms_rotated"] for r in rows])
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    ax.bar(layers - 0.2, before, width=0.4, label="out_proj input")
    ax.bar(layers + 0.2, after, width=0.4, label="after Hadamard rotation")
    ax.set_xlabel("layer")
    ax.set_ylabel("max |x| / RMS(x)")
    ax.set_title(title)
    ax.set_xticks(layers)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _score(model: Any, stream: np.ndarray, window: int, max_windows: int | None) -> EvalResult:
    return evaluate_tokens(TorchBackend(model), stream, window, max_windows)


def compare_recipes(
    model_dir: str | Path,
    out_dir: str | Path,
    eval_data: str | Path,
    recipes: tuple[str, ...] = DEFAULT_RECIPES,
    calib: str | Path | None = None,
    num_samples: int = 64,
    seq_len: int = 256,
    window: int = 256,
    max_windows: int | None = None,
) -> dict[str, Any]:
    """Quantize ``model_dir`` with each recipe and write report.json, report.md and ranges.png to ``out_dir``."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir, model.config.vocab_size)
    stream = token_stream(read_texts(eval_data).texts, tokenizer).numpy()
    float_result = _score(model, stream, window, max_windows)
    rows = [{"recipe": "fp32", **float_result.as_dict()}]
    layers: dict[str, list[dict[str, Any]]] = {}
    for name in recipes:
        report = quantize_checkpoint(model_dir, out_dir / name, get_recipe(name), calib, num_samples, seq_len)
        result = _score(load_any_model(out_dir / name), stream, window, max_windows)
        rows.append({"recipe": name, **result.as_dict()})
        layers[name] = [{"layer": layer["layer"], "mixer_output_sqnr_db": layer["mixer_output_sqnr_db"],
                         "weight_sqnr_db": layer["weight_sqnr_db"]} for layer in report["layers"]]
        log.info("%s: perplexity %.4f (fp32 %.4f)", name, result.perplexity, float_result.perplexity)
    calib_tokens = sample_windows(token_stream(read_texts(calib).texts, tokenizer), min(num_samples, 16), seq_len)
    ranges = out_proj_input_ranges(model, calib_tokens)
    report = {"model": str(model_dir), "eval_data": str(eval_data), "window": window, "perplexity": rows,
              "layers": layers, "out_proj_input_ranges": ranges}
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", report_markdown(report))
    atomic_write_bytes(out_dir / "ranges.png", plot_ranges(ranges, f"{model.config.arch} {model_dir.name}: out_proj input"))
    return report


def report_markdown(report: dict[str, Any]) -> str:
    fp32 = report["perplexity"][0]["perplexity"]
    lines = [f"# Quantization report: {report['model']}", "",
             f"Held-out text: `{report['eval_data']}`, windows of {report['window']} tokens "
             f"({report['perplexity'][0]['tokens']} predicted tokens).", "",
             "| recipe | perplexity | vs fp32 | next-token accuracy |", "| --- | --- | --- | --- |"]
    for r in report["perplexity"]:
        lines.append(f"| {r['recipe']} | {r['perplexity']:.4f} | {100 * (r['perplexity'] / fp32 - 1):+.2f}% | "
                     f"{100 * r['accuracy']:.2f}% |")
    lines += ["", "Mixer-output SQNR per layer (dB; the quantized layer vs the float layer on the same input):", ""]
    names = list(report["layers"])
    lines += ["| layer | " + " | ".join(names) + " |", "| --- " * (len(names) + 1) + "|"]
    for i in range(len(report["out_proj_input_ranges"])):
        lines.append(f"| {i} | " + " | ".join(f"{report['layers'][n][i]['mixer_output_sqnr_db']:.1f}" for n in names) + " |")
    lines += ["", "out_proj input range per layer, before → after the Hadamard rotation (`ranges.png`):", "",
              "| layer | max\\|x\\| | max/RMS | max\\|Hx\\| | max/RMS rotated |", "| --- | --- | --- | --- | --- |"]
    for r in report["out_proj_input_ranges"]:
        lines.append(f"| {r['layer']} | {r['absmax']:.3f} | {r['absmax'] / r['rms']:.1f} | {r['absmax_rotated']:.3f} | "
                     f"{r['absmax_rotated'] / r['rms_rotated']:.1f} |")
    return "\n".join(lines) + "\n"
