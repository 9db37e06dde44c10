"""Model configuration shared by every part of edgessm.

One dataclass describes both architectures. It is built from either checkpoint layout:
Hugging Face (`MambaForCausalLM` / `Mamba2ForCausalLM` config.json) or the original
`mamba_ssm` layout (config.json with `d_model`, `n_layer`, `ssm_cfg`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgessm.errors import ConfigError
from edgessm.io import read_json_object

Arch = Literal["mamba1", "mamba2"]


@dataclass(frozen=True)
class MambaConfig:
    arch: Arch
    vocab_size: int
    d_model: int
    n_layer: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0  # Mamba-1 only; 0 means ceil(d_model / 16)
    conv_bias: bool = True
    proj_bias: bool = False  # bias of in_proj / out_proj
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    # Mamba-2 only
    head_dim: int = 64
    n_groups: int = 1
    chunk_size: int = 256
    dt_limit: tuple[float, float] = (0.0, math.inf)
    # token ids (informational; generation stops at eos when asked to)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.arch not in ("mamba1", "mamba2"):
            raise ConfigError(f"unsupported architecture {self.arch!r}: expected 'mamba1' or 'mamba2'")
        for name in ("vocab_size", "d_model", "n_layer", "d_state", "d_conv", "expand"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config field {name} must be positive, got {getattr(self, name)}")
        if self.dt_rank == 0:
            object.__setattr__(self, "dt_rank", math.ceil(self.d_model / 16))
        if self.arch == "mamba2":
            if self.d_inner % self.head_dim:
                raise ConfigError(
                    f"Mamba-2 d_inner={self.d_inner} (expand*d_model) is not a multiple of head_dim={self.head_dim}"
                )
            if self.n_heads % self.n_groups:
                raise ConfigError(f"Mamba-2 n_heads={self.n_heads} is not a multiple of n_groups={self.n_groups}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def n_heads(self) -> int:
        return self.d_inner // self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels that go through the causal conv: x only (Mamba-1), x|B|C (Mamba-2)."""
        if self.arch == "mamba1":
            return self.d_inner
        return self.d_inner + 2 * self.n_groups * self.d_state

    def state_shapes(self, batch: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(conv_state, ssm_state) shapes of one layer for a batch."""
        conv = (batch, self.conv_dim, self.d_conv - 1)
        if self.arch == "mamba1":
            return conv, (batch, self.d_inner, self.d_state)
        return conv, (batch, self.n_heads, self.head_dim, self.d_state)

    # ---- serialisation -------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face config.json this config corresponds to."""
        common = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layer,
            "state_size": self.d_state,
            "conv_kernel": self.d_conv,
            "expand": self.expand,
            "use_bias": self.proj_bias,
            "use_conv_bias": self.conv_bias,
            "layer_norm_epsilon": self.norm_eps,
            "residual_in_fp32": self.residual_in_fp32,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.arch == "mamba1":
            return {"model_type": "mamba", "architectures": ["MambaForCausalLM"], "time_step_rank": self.dt_rank, **common}
        lo, hi = self.dt_limit
        return {
            "model_type": "mamba2",
            "architectures": ["Mamba2ForCausalLM"],
            "num_heads": self.n_heads,
            "head_dim": self.head_dim,
            "n_groups": self.n_groups,
            "chunk_size": self.chunk_size,
            "time_step_limit": [lo, hi if math.isfinite(hi) else float("inf")],
            **common,
        }

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d.pop("extra")
        d["dt_limit"] = [self.dt_limit[0], self.dt_limit[1] if math.isfinite(self.dt_limit[1]) else "inf"]
        return json.dumps(d, indent=2)


def _require(cfg: dict[str, Any], key: str, path: Path) -> Any:
    if key not in cfg:
        raise ConfigError(f"{path}: missing required config key {key!r}")
    return cfg[key]


def _dt_limit(value: Any) -> tuple[float, float]:
    if value is None:
        return (0.0, math.inf)
    lo, hi = (_json_float(v) for v in value)
    return (lo, hi)


def _json_float(v: Any) -> float:
    """transformers >= 5 writes non-finite floats as {"__float__": "Infinity"}; older ones as Infinity."""
    if isinstance(v, dict) and "__float__" in v:
        return float(v["__float__"])
    return float(v)


def config_from_hf(cfg: dict[str, Any], path: Path) -> MambaConfig:
    model_type = cfg.get("model_type")
    if model_type not in ("mamba", "mamba2"):
        raise ConfigError(f"{path}: model_type {model_type!r} is not supported (expected 'mamba' or 'mamba2')")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{path}: hidden_act {act!r} is not supported (only 'silu')")
    d_model = int(_require(cfg, "hidden_size", path))
    expand = cfg.get("expand", 2)
    if cfg.get("intermediate_size") not in (None, int(expand * d_model)):
        raise ConfigError(f"{path}: intermediate_size {cfg['intermediate_size']} != expand*hidden_size")
    common: dict[str, Any] = dict(
        vocab_size=int(_require(cfg, "vocab_size", path)),
        d_model=d_model,
        n_layer=int(_require(cfg, "num_hidden_layers", path)),
        d_state=int(cfg.get("state_size", 16 if model_type == "mamba" else 128)),
        d_conv=int(cfg.get("conv_kernel", 4)),
        expand=int(expand),
        conv_bias=bool(cfg.get("use_conv_bias", True)),
        proj_bias=bool(cfg.get("use_bias", False)),
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        residual_in_fp32=bool(cfg.get("residual_in_fp32", True)),
        pad_token_id=cfg.get("pad_token_id"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=_single_id(cfg.get("eos_token_id")),
    )
    if model_type == "mamba":
        rank = cfg.get("time_step_rank", "auto")
        return MambaConfig(
            arch="mamba1",
            dt_rank=0 if rank == "auto" else int(rank),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            **common,
        )
    cfg_heads = cfg.get("num_heads")
    head_dim = int(cfg.get("head_dim", 64))
    config = MambaConfig(
        arch="mamba2",
        head_dim=head_dim,
        n_groups=int(cfg.get("n_groups", 8)),
        chunk_size=int(cfg.get("chunk_size", 256)),
        dt_limit=_dt_limit(cfg.get("time_step_limit")),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        **common,
    )
    if cfg_heads is not None and int(cfg_heads) != config.n_heads:
        raise ConfigError(
            f"{path}: num_heads={cfg_heads} but hidden_size*expand/head_dim = {config.n_heads}"
        )
    return config


def config_from_mamba_ssm(cfg: dict[str, Any], path: Path) -> MambaConfig:
    """The original `state-spaces/mamba` (mamba_ssm) config.json layout."""
    ssm_cfg = dict(cfg.get("ssm_cfg") or {})
    layer = ssm_cfg.pop("layer", "Mamba1")
    if not cfg.get("rms_norm", True):
        raise ConfigError(f"{path}: rms_norm=false (LayerNorm blocks) is not supported")
    if cfg.get("attn_layer_idx"):
        raise ConfigError(f"{path}: hybrid attention layers (attn_layer_idx) are not supported")
    vocab = int(_require(cfg, "vocab_size", path))
    multiple = int(cfg.get("pad_vocab_size_multiple", 1))
    vocab += (-vocab) % multiple
    common: dict[str, Any] = dict(
        vocab_size=vocab,
        d_model=int(_require(cfg, "d_model", path)),
        n_layer=int(_require(cfg, "n_layer", path)),
        d_conv=int(ssm_cfg.pop("d_conv", 4)),
        expand=int(ssm_cfg.pop("expand", 2)),
        conv_bias=bool(ssm_cfg.pop("conv_bias", True)),
        proj_bias=bool(ssm_cfg.pop("bias", False)),
        norm_eps=float(cfg.get("norm_epsilon", 1e-5)),
        residual_in_fp32=bool(cfg.get("residual_in_fp32", True)),
        tie_embeddings=bool(cfg.get("tie_embeddings", True)),
    )
    if layer == "Mamba1":
        rank = ssm_cfg.pop("dt_rank", "auto")
        config = MambaConfig(
            arch="mamba1", d_state=int(ssm_cfg.pop("d_state", 16)), dt_rank=0 if rank == "auto" else int(rank), **common
        )
    elif layer == "Mamba2":
        if not ssm_cfg.pop("rmsnorm", True) or ssm_cfg.pop("norm_before_gate", False):
            raise ConfigError(f"{path}: Mamba-2 without gated RMSNorm (or norm_before_gate=true) is not supported")
        config = MambaConfig(
            arch="mamba2",
            d_state=int(ssm_cfg.pop("d_state", 128)),
            head_dim=int(ssm_cfg.pop("headdim", 64)),
            n_groups=int(ssm_cfg.pop("ngroups", 1)),
            chunk_size=int(ssm_cfg.pop("chunk_size", 256)),
            dt_limit=_dt_limit(ssm_cfg.pop("dt_limit", None)),
            **common,
        )
    else:
        raise ConfigError(f"{path}: ssm_cfg.layer {layer!r} is not supported (expected Mamba1 or Mamba2)")
    for harmless in ("dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "A_init_range", "use_fast_path", "d_ssm"):
        if harmless == "d_ssm" and ssm_cfg.get("d_ssm") not in (None, config.d_inner):
            raise ConfigError(f"{path}: ssm_cfg.d_ssm != d_inner is not supported")
        ssm_cfg.pop(harmless, None)
    if ssm_cfg:
        raise ConfigError(f"{path}: unsupported ssm_cfg keys {sorted(ssm_cfg)}")
    return config


def _single_id(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def load_config(path: str | Path) -> MambaConfig:
    """Read config.json from a checkpoint directory (either layout)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    cfg = read_json_object(file, "a model directory needs the config.json of its checkpoint")
    if "model_type" in cfg:
        return config_from_hf(cfg, file)
    if "d_model" in cfg:
        return config_from_mamba_ssm(cfg, file)
    raise ConfigError(f"{file}: neither a Hugging Face (model_type) nor a mamba_ssm (d_model) config")
