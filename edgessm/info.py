"""What `edgessm info` reports about a checkpoint: architecture, sizes, weight memory per precision."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from edgessm.config import MambaConfig, load_config

INT4_GROUP = 128


@dataclass(frozen=True)
class ModelInfo:
    arch: str
    n_layer: int
    d_model: int
    d_inner: int
    d_state: int
    d_conv: int
    vocab_size: int
    n_heads: int | None
    head_dim: int | None
    n_groups: int | None
    parameters: int
    linear_parameters: int
    weight_mib_fp16: float
    weight_mib_int8: float
    weight_mib_int4: float
    state_kib_per_sequence: float

    def as_dict(self) -> dict:
        return asdict(self)


def count_parameters(cfg: MambaConfig) -> tuple[int, int]:
    """(all parameters, parameters in the quantizable linears) computed from the config alone."""
    d, di, n = cfg.d_model, cfg.d_inner, cfg.d_state
    if cfg.arch == "mamba1":
        in_proj = d * 2 * di + (2 * di if cfg.proj_bias else 0)
        x_proj = di * (cfg.dt_rank + 2 * n)
        dt_proj = cfg.dt_rank * di + di
        linears = in_proj + x_proj + dt_proj + di * d + (d if cfg.proj_bias else 0)
        other = cfg.conv_dim * (cfg.d_conv + int(cfg.conv_bias)) + di * n + di
    else:
        proj = di + cfg.conv_dim + cfg.n_heads
        linears = d * proj + (proj if cfg.proj_bias else 0) + di * d + (d if cfg.proj_bias else 0)
        other = cfg.conv_dim * (cfg.d_conv + int(cfg.conv_bias)) + 3 * cfg.n_heads + di
    per_layer_norm = d
    embed = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    total = cfg.n_layer * (linears + other + per_layer_norm) + embed + head + d
    return total, cfg.n_layer * linears


def model_info(path: str | Path) -> ModelInfo:
    cfg = load_config(path)
    total, linear = count_parameters(cfg)
    rest = total - linear
    mib = 1024 * 1024
    conv, ssm = cfg.state_shapes(1)
    state_bytes = cfg.n_layer * 4 * (conv[1] * conv[2] + _prod(ssm))
    return ModelInfo(
        arch=cfg.arch,
        n_layer=cfg.n_layer,
        d_model=cfg.d_model,
        d_inner=cfg.d_inner,
        d_state=cfg.d_state,
        d_conv=cfg.d_conv,
        vocab_size=cfg.vocab_size,
        n_heads=cfg.n_heads if cfg.arch == "mamba2" else None,
        head_dim=cfg.head_dim if cfg.arch == "mamba2" else None,
        n_groups=cfg.n_groups if cfg.arch == "mamba2" else None,
        parameters=total,
        linear_parameters=linear,
        weight_mib_fp16=2 * total / mib,
        # quantized linears + fp16 for the rest; int4 adds one fp16 scale per group of 128
        # (int8 per-channel scales are negligible)
        weight_mib_int8=(linear + 2 * rest) / mib,
        weight_mib_int4=(linear / 2 + 2 * linear / INT4_GROUP + 2 * rest) / mib,
        state_kib_per_sequence=state_bytes / 1024,
    )


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out
