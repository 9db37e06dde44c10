"""Quantization recipes: one small dataclass of switches; the named recipes are presets of it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from edgessm.errors import ConfigError

WeightMethod = Literal["rtn", "gptq"]


@dataclass(frozen=True)
class Recipe:
    """What gets quantized how.

    w_bits: weight bits of the mixer linears (8: per output channel; 4: per group of ``group_size``
        input columns, ``group_size=0`` meaning one group per row).
    a_bits: activation bits (8: static symmetric scales from calibration) or None (activations stay
        float: W4A16).
    percentile: clip the SSM input x (``ssm_x``) at this percentile of |x| instead of its max
        (Quamba); None = max.
    hadamard: rotate out_proj's input online by an orthonormal Hadamard H and fold Hᵀ into out_proj's
        weight (Quamba), so the SSM output is quantized in an outlier-free basis.
    cluster_x: Quamba2 sort-and-cluster of Mamba-2's x (per-cluster scales, heads and channels
        reordered offline); ``head_clusters`` x ``dim_clusters`` scales per SSM group.
    group_bc: one scale per SSM state group for B and C (Quamba2) instead of one per tensor.
    """

    name: str
    w_bits: int = 8
    a_bits: int | None = 8
    group_size: int = 0
    method: WeightMethod = "rtn"
    percentile: float | None = 99.999
    hadamard: bool = True
    cluster_x: bool = False
    head_clusters: int = 4
    dim_clusters: int = 4
    group_bc: bool = False
    gptq_damp: float = 0.01

    def __post_init__(self) -> None:
        if self.w_bits not in (4, 8):
            raise ConfigError(f"recipe {self.name}: w_bits must be 4 or 8, got {self.w_bits}")
        if self.a_bits not in (8, None):
            raise ConfigError(f"recipe {self.name}: a_bits must be 8 or None (float), got {self.a_bits}")
        if self.group_size < 0:
            raise ConfigError(f"recipe {self.name}: group_size must be >= 0, got {self.group_size}")
        if self.method not in ("rtn", "gptq"):
            raise ConfigError(f"recipe {self.name}: method must be 'rtn' or 'gptq', got {self.method!r}")
        if self.percentile is not None and not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"recipe {self.name}: percentile must be in (50, 100], got {self.percentile}")
        if self.head_clusters < 1 or self.dim_clusters < 1:
            raise ConfigError(f"recipe {self.name}: head_clusters and dim_clusters must be >= 1")

    @property
    def quantize_activations(self) -> bool:
        return self.a_bits is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"recipe has unknown fields {unknown}")
        return cls(**d)


RECIPES: dict[str, Recipe] = {
    # Quamba: percentile-clipped x, Hadamard-rotated out_proj input, int8 per-channel weights.
    "w8a8": Recipe("w8a8"),
    # Ablations: plain max scales everywhere; percentile clipping of x without the rotation.
    "w8a8-naive": Recipe("w8a8-naive", percentile=None, hadamard=False),
    "w8a8-percentile": Recipe("w8a8-percentile", hadamard=False),
    # Quamba2
    "w4a8": Recipe("w4a8", w_bits=4, group_size=128, method="gptq", cluster_x=True, group_bc=True),
    "w4a16": Recipe("w4a16", w_bits=4, a_bits=None, group_size=128, method="gptq", percentile=None, hadamard=False),
}


def get_recipe(name: str, **overrides: Any) -> Recipe:
    """A preset by name, with some fields replaced (None values are ignored)."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}: choose one of {sorted(RECIPES)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(RECIPES[name], **changes) if changes else RECIPES[name]
