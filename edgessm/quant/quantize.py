"""Post-training quantization of a MambaLM, layer by layer (Quamba / Quamba2).

For each layer, in order: (1) run the float layer on the calibration hidden states and record
activation ranges and GPTQ Hessians; (2) Mamba-2 with ``cluster_x``: sort-and-cluster x, reorder
the weights, and observe again in the new order; (3) set activation scales and quantize the
weights; (4) run the quantized layer on the same inputs: its outputs feed the next layer (so GPTQ
and the scales of later layers see the quantized model's activations), and per-site activation
SQNR and the mixer-output SQNR against the float layer are measured.
Embeddings, norms, lm_head, conv weights, A, D and dt biases stay float32.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from tqdm import tqdm

from edgessm.errors import ConfigError
from edgessm.models.lm import Block, MambaLM
from edgessm.ops.hadamard import hadamard_factor
from edgessm.quant.linear import QuantLinear
from edgessm.quant.mixers import DEFAULT_REPORT_PERCENTILE, QUANT_MIXERS, QuantMamba2Mixer, QuantMixerBase
from edgessm.quant.observers import HessianObserver, RangeObserver, SqnrMeter
from edgessm.quant.recipe import Recipe
from edgessm.quant.reorder import apply_reorder, sort_and_cluster

log = logging.getLogger(__name__)


def check_supported(model: MambaLM, recipe: Recipe) -> None:
    if recipe.hadamard:
        try:
            hadamard_factor(model.config.d_inner)
        except ValueError as e:
            raise ConfigError(f"recipe {recipe.name}: Hadamard rotation of d_inner={model.config.d_inner}: {e}") from e


def prepare(model: MambaLM, recipe: Recipe) -> MambaLM:
    """A float32 copy of ``model`` whose mixers are float-phase quant mixers (Hadamard folded)."""
    check_supported(model, recipe)
    qmodel = copy.deepcopy(model).float().eval()
    mixer_cls = QUANT_MIXERS[model.config.arch]
    for i, layer in enumerate(qmodel.backbone.layers):
        layer.mixer = mixer_cls.from_float(layer.mixer, recipe, i)  # type: ignore[attr-defined]
    return qmodel.to(model.lm_head.weight.device)


def _observe(
    layer: Block, hidden: list[torch.Tensor], total_tokens: int, recipe: Recipe
) -> tuple[dict[str, RangeObserver], dict[str, HessianObserver], list[torch.Tensor]]:
    mixer: QuantMixerBase = layer.mixer  # type: ignore[assignment]
    mixer.start_observing(total_tokens, collect_hessians=recipe.method == "gptq")
    try:
        outputs = [layer(h, None)[0] for h in hidden]
    finally:
        observers, hessians = mixer.stop_observing()
    return observers, hessians, outputs


def _x_summary(mixer: QuantMixerBase, obs: RangeObserver) -> dict[str, Any]:
    pct = mixer.recipe.percentile or DEFAULT_REPORT_PERCENTILE
    value = obs.percentile()
    out: dict[str, Any] = {"absmax": obs.absmax, "percentile": pct, "percentile_value": value,
                           "percentile_over_max": value / obs.absmax if obs.absmax > 0 else None}
    if isinstance(mixer, QuantMamba2Mixer) and mixer.cluster_labels is not None:
        out["clusters"] = int(mixer.cluster_labels.max()) + 1
    return out


def _scale_summary(mixer: QuantMixerBase) -> dict[str, Any]:
    if not mixer.recipe.quantize_activations:
        return {}
    out: dict[str, Any] = {}
    for site in mixer.SITES:
        s = getattr(mixer, f"scale_{site}")
        out[site] = float(s) if s.numel() == 1 else {"min": float(s.min()), "max": float(s.max()), "count": s.numel()}
    return out


@torch.no_grad()
def quantize_model(
    model: MambaLM, recipe: Recipe, tokens: torch.Tensor, batch_size: int = 8, progress: bool = True
) -> tuple[MambaLM, dict[str, Any]]:
    """Quantize ``model`` with ``recipe`` calibrated on ``tokens`` [N, L]. Returns (quantized model, report)."""
    qmodel = prepare(model, recipe)
    cfg = qmodel.config
    tokens = tokens.to(qmodel.lm_head.weight.device)
    total_tokens = tokens.numel()
    hidden = [qmodel.backbone.embeddings(b) for b in tokens.split(batch_size)]
    layers: list[dict[str, Any]] = []
    for i, layer in enumerate(tqdm(qmodel.backbone.layers, desc=f"quantize {recipe.name}", disable=not progress)):
        mixer: QuantMixerBase = layer.mixer  # type: ignore[assignment]
        observers, hessians, reference = _observe(layer, hidden, total_tokens, recipe)
        if isinstance(mixer, QuantMamba2Mixer) and recipe.cluster_x and recipe.quantize_activations:
            perm, head_perm, labels = sort_and_cluster(
                observers["ssm_x"].channel_absmax, cfg.n_groups, cfg.head_dim, recipe.head_clusters, recipe.dim_clusters
            )
            apply_reorder(mixer, perm, head_perm, labels)
            observers, hessians, reference = _observe(layer, hidden, total_tokens, recipe)
        weight_sqnr = mixer.finalize(observers, hessians)
        mixer.meters = {}
        out_meter = SqnrMeter()
        new_hidden = []
        for h, ref in zip(hidden, reference):
            out = layer(h, None)[0]
            out_meter.update(ref - h, out - h)  # the mixer's contribution, without the residual
            new_hidden.append(out)
        layers.append({
            "layer": i,
            "weight_sqnr_db": weight_sqnr,
            "activation_sqnr_db": {k: m.db() for k, m in mixer.meters.items()},
            "activation_absmax": {k: o.absmax for k, o in observers.items()},
            "scales": _scale_summary(mixer),
            "ssm_x": _x_summary(mixer, observers["ssm_x"]),
            "mixer_output_sqnr_db": out_meter.db(),
        })
        mixer.meters = None
        hidden = new_hidden
        log.info("layer %d: mixer output SQNR %.2f dB", i, out_meter.db())
    report = {"recipe": recipe.to_dict(), "calibration_tokens": total_tokens, "layers": layers}
    return qmodel, report


def set_quant_mode(model: MambaLM, mode: str) -> None:
    """``"fake"`` (float simulation) or ``"int"`` (integer-exact linears) for every QuantLinear."""
    if mode not in ("fake", "int"):
        raise ConfigError(f"quantized execution mode must be 'fake' or 'int', got {mode!r}")
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.mode = mode  # type: ignore[assignment]
