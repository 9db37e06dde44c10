"""Quantized model directories: config.json + quant_config.json + model.safetensors (docs/quantization.md)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from edgessm.config import load_config
from edgessm.errors import CheckpointError, ConfigError
from edgessm.io import atomic_directory, atomic_write_json, atomic_write_text, load_safetensors
from edgessm.models.lm import MambaLM
from edgessm.ops.hadamard import hadamard_factor
from edgessm.quant.mixers import QUANT_MIXERS
from edgessm.quant.recipe import Recipe
from edgessm.quant.quantize import set_quant_mode

log = logging.getLogger(__name__)

FORMAT = "edgessm-quantized"
FORMAT_VERSION = 1
QUANT_CONFIG = "quant_config.json"
# Files of the source checkpoint that the quantized directory needs too (tokenizer, generation defaults).
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def quant_config(model: MambaLM, recipe: Recipe, calibration: dict[str, Any]) -> dict[str, Any]:
    from edgessm import __version__  # here, not at import time: edgessm/__init__ re-exports this module

    cfg = model.config
    mixer_cls = QUANT_MIXERS[cfg.arch]
    hadamard = None
    if recipe.hadamard:
        m, p = hadamard_factor(cfg.d_inner)
        hadamard = {"site": "out_in", "n": cfg.d_inner, "m": m, "pow2": p, "scale": 1.0 / cfg.d_inner**0.5}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "edgessm_version": __version__,
        "arch": cfg.arch,
        "recipe": recipe.to_dict(),
        "w_bits": recipe.w_bits,
        "a_bits": recipe.a_bits,
        "group_size": recipe.group_size,
        "weight_method": recipe.method,
        "percentile": recipe.percentile,
        "hadamard": hadamard,
        "quantized_linears": list(mixer_cls.LINEARS),
        "activation_sites": list(mixer_cls.SITES) if recipe.quantize_activations else [],
        "int4_packing": "uint8 [out, ceil(in/2)]; byte j = code(2j) in bits 0-3 | code(2j+1) in bits 4-7; 4-bit two's complement",
        "rounding": "round half to even, clamp to [-2^(b-1), 2^(b-1)-1]",
        "calibration": calibration,
    }


def save_quantized(model: MambaLM, recipe: Recipe, path: str | Path, calibration: dict[str, Any],
                   source_dir: str | Path | None = None, extra_files: dict[str, str] | None = None) -> None:
    """Write the quantized model directory atomically (``extra_files``: name → text, e.g. the report)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    with atomic_directory(path) as tmp:
        atomic_write_text(tmp / "config.json", json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
        atomic_write_json(tmp / QUANT_CONFIG, quant_config(model, recipe, calibration))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "edgessm": FORMAT})
        if source_dir is not None:
            for name in _COPIED:
                if (Path(source_dir) / name).is_file():
                    shutil.copyfile(Path(source_dir) / name, tmp / name)
        for name, text in (extra_files or {}).items():
            atomic_write_text(tmp / name, text)


def read_quant_config(directory: Path) -> dict[str, Any]:
    file = directory / QUANT_CONFIG
    if not file.is_file():
        raise ConfigError(f"{file}: not found ({directory} is not a quantized model directory; use load_model for float ones)")
    try:
        qc = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(qc, dict) or qc.get("format") != FORMAT:
        raise ConfigError(f"{file}: format is {qc.get('format') if isinstance(qc, dict) else None!r}, expected {FORMAT!r}")
    if qc.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{file}: format_version {qc.get('format_version')} is not supported (expected {FORMAT_VERSION})")
    return qc


def build_quantized_skeleton(config: Any, recipe: Recipe) -> MambaLM:
    """A MambaLM whose mixers are (uninitialised) quantized mixers of ``recipe``."""
    with torch.device("meta"):
        model = MambaLM(config)
        mixer_cls = QUANT_MIXERS[config.arch]
        for i, layer in enumerate(model.backbone.layers):
            layer.mixer = mixer_cls(config, recipe, i)  # type: ignore[assignment]
    model = model.to_empty(device="cpu")
    if config.tie_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    return model


def load_quantized(path: str | Path, mode: str = "fake", device: str | torch.device = "cpu") -> MambaLM:
    """Load a directory written by ``save_quantized`` (``edgessm quantize``) as a MambaLM with
    quantized mixers; ``mode`` "fake" (float simulation, fast) or "int" (integer-exact linears)."""
    directory = Path(path)
    config = load_config(directory)
    qc = read_quant_config(directory)
    if qc.get("arch") != config.arch:
        raise ConfigError(f"{directory / QUANT_CONFIG}: arch {qc.get('arch')!r} but config.json describes {config.arch!r}")
    recipe = Recipe.from_dict(qc["recipe"])
    model = build_quantized_skeleton(config, recipe)
    file = directory / "model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{file}: not found")
    tensors = load_safetensors(file)
    expected = model.state_dict()
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
        tensors.pop("lm_head.weight", None)
    missing, unknown = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise CheckpointError(f"{file}: missing tensors {missing[:6]}, unexpected tensors {unknown[:6]} for recipe {recipe.name}")
    for key, ref in expected.items():
        got = tensors[key]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise CheckpointError(
                f"{file}: tensor {key} is {got.dtype} {tuple(got.shape)}, expected {ref.dtype} {tuple(ref.shape)}"
            )
    model.load_state_dict(tensors, strict=False)
    set_quant_mode(model, mode)
    log.info("loaded quantized %s model %s (recipe %s)", config.arch, directory, recipe.name)
    return model.to(device).eval()
