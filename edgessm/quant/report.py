"""quant_report.json / quant_report.md: per-layer weight and activation SQNR, x clipping, perplexity."""

from __future__ import annotations

import json
import math
from typing import Any


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.{digits}f}"
    return str(v)


def _json_safe(obj: Any) -> Any:
    """JSON has no Infinity: SQNR of an exactly represented tensor is written as the string "inf"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else "-inf" if obj < 0 else "nan"
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(_json_safe(report), indent=2, sort_keys=True) + "\n"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def report_markdown(report: dict[str, Any]) -> str:
    recipe = report["recipe"]
    layers = report["layers"]
    out = [f"# Quantization report: {recipe['name']}", ""]
    out.append(
        f"w_bits={recipe['w_bits']}, a_bits={recipe['a_bits'] or 'float'}, group_size={recipe['group_size'] or 'per-channel'}, "
        f"method={recipe['method']}, percentile={recipe['percentile']}, hadamard={recipe['hadamard']}, "
        f"cluster_x={recipe['cluster_x']}, group_bc={recipe['group_bc']}; calibration tokens: {report['calibration_tokens']}"
    )
    ppl = report.get("perplexity")
    if ppl:
        out += ["", "## Perplexity", ""]
        out += _table(["eval text", "tokens", "float", "quantized", "ratio"],
                      [[ppl["source"], str(ppl["tokens"]), _fmt(ppl["float"], 3), _fmt(ppl["quantized"], 3),
                        _fmt(ppl["quantized"] / ppl["float"], 4)]])
    linears = list(layers[0]["weight_sqnr_db"]) if layers else []
    out += ["", "## Weight SQNR (dB) and mixer output SQNR (dB)", ""]
    out += _table(["layer", *linears, "mixer output"],
                  [[str(l["layer"]), *(_fmt(l["weight_sqnr_db"][n]) for n in linears), _fmt(l["mixer_output_sqnr_db"])] for l in layers])
    sites = list(layers[0]["activation_sqnr_db"]) if layers else []
    if sites:
        out += ["", "## Activation SQNR per site (dB)", ""]
        out += _table(["layer", *sites], [[str(l["layer"]), *(_fmt(l["activation_sqnr_db"].get(s)) for s in sites)] for l in layers])
    out += ["", "## SSM input x: percentile vs max of |x|", ""]
    out += _table(["layer", "max", "percentile", "value", "value / max", "clusters"],
                  [[str(l["layer"]), _fmt(l["ssm_x"]["absmax"], 4), _fmt(l["ssm_x"]["percentile"], 3),
                    _fmt(l["ssm_x"]["percentile_value"], 4), _fmt(l["ssm_x"]["percentile_over_max"], 4),
                    _fmt(l["ssm_x"].get("clusters"))] for l in layers])
    return "\n".join(out) + "\n"
