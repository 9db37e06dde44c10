"""`edgessm quantize` as a library call: load, calibrate, quantize, evaluate, write the directory."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from edgessm.models.loading import load_model
from edgessm.quant.calibration import read_texts, sample_windows, token_stream
from edgessm.quant.quantize import quantize_model
from edgessm.quant.recipe import Recipe
from edgessm.quant.report import report_json, report_markdown
from edgessm.quant.serialize import save_quantized
from edgessm.runtime.backend import TorchBackend
from edgessm.runtime.evaluate import evaluate_tokens
from edgessm.runtime.tokenizer import ByteTokenizer, load_tokenizer

log = logging.getLogger(__name__)


def quantize_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    recipe: Recipe,
    calib: str | Path | None = None,
    num_samples: int = 128,
    seq_len: int = 512,
    eval_data: str | Path | None = None,
    eval_window: int = 256,
    batch_size: int = 8,
    progress: bool = True,
    device: str = "cpu",
) -> dict[str, Any]:
    """Quantize the checkpoint in ``model_dir`` into ``out_dir``; returns the report (also written there)."""
    torch.set_grad_enabled(False)
    model = load_model(model_dir, device=device)
    tokenizer = load_tokenizer(model_dir, model.config.vocab_size)
    source = read_texts(calib)
    tokens = sample_windows(token_stream(source.texts, tokenizer), num_samples, seq_len)
    log.info("calibrating %s on %d samples x %d tokens from %s", recipe.name, tokens.shape[0], tokens.shape[1], source.description)
    qmodel, report = quantize_model(model, recipe, tokens, batch_size=batch_size, progress=progress)
    calibration = {
        "source": source.description,
        "sha256": source.sha256,
        "num_samples": tokens.shape[0],
        "seq_len": tokens.shape[1],
        "tokenizer": "bytes" if isinstance(tokenizer, ByteTokenizer) else "tokenizer.json",
    }
    report["calibration"] = calibration
    if eval_data is not None:
        ev = read_texts(eval_data)
        stream = token_stream(ev.texts, tokenizer).numpy()
        results = {name: evaluate_tokens(TorchBackend(m, device), stream, eval_window, batch=batch_size, progress=progress)
                   for name, m in (("float", model), ("quantized", qmodel))}
        report["perplexity"] = {
            "source": ev.description,
            "sha256": ev.sha256,
            "window": eval_window,
            "tokens": results["float"].tokens,
            "float": results["float"].perplexity,
            "quantized": results["quantized"].perplexity,
            "float_accuracy": results["float"].accuracy,
            "quantized_accuracy": results["quantized"].accuracy,
        }
    save_quantized(qmodel.cpu(), recipe, out_dir, calibration, source_dir=model_dir,
                   extra_files={"quant_report.json": report_json(report), "quant_report.md": report_markdown(report)})
    return report
