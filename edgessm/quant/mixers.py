"""Quantized Mamba-1 / Mamba-2 mixers: the float dataflow of ``edgessm.models`` with quantization points.

A mixer goes through three phases, all with the same ``forward(hidden, state)``:

1. calibration (``start_observing``): float weights, float activations; every quantization point
   records its range (``RangeObserver``) and, for GPTQ, every linear its input Hessian;
2. ``finalize``: activation scales from the statistics, weights quantized (RTN or GPTQ) into
   ``QuantLinear``s;
3. quantized execution: each quantization point turns its tensor into a ``QTensor`` (int8 codes +
   float32 scale); linears consume codes (fake-quant or integer-exact, ``QuantLinear.mode``);
   conv and scans dequantize ``q * scale`` and run the float reference op (docs/onnx_ops.md,
   Quantized scans). With ``a_bits=None`` (W4A16) the points pass float tensors through.

Quantization points (``sites``) and their scales (buffers ``scale_<site>``):
in_proj (in_proj input), conv_in (conv input), ssm_x (scan input x = conv output, also x_proj's
input in Mamba-1), dt_in (Mamba-1 dt_proj input), ssm_dt (Mamba-1 only; Mamba-2's dt stays float),
ssm_B, ssm_C, ssm_z, out_in (out_proj input, after the Hadamard rotation when enabled).
Scales are float32 0-d tensors (per tensor) except Mamba-2 ``scale_ssm_x`` [d_inner] with Quamba2
clustering and Mamba-2 ``scale_ssm_B`` / ``scale_ssm_C`` [n_groups] with per-group scales.
"""

from __future__ import annotations

import torch
from torch import nn

from edgessm.config import MambaConfig
from edgessm.models.mamba1 import Mamba1Mixer
from edgessm.models.mamba2 import Mamba2Mixer
from edgessm.models.norm import GatedRMSNorm
from edgessm.models.sites import LayerState
from edgessm.ops.stateful import causal_conv1d_continue, selective_scan_continue, ssd_continue
from edgessm.ops.hadamard import hadamard_matrix, hadamard_transform
from edgessm.quant.linear import QuantLinear
from edgessm.quant.observers import HessianObserver, RangeObserver, SqnrMeter, check_finite
from edgessm.quant.primitives import Act, QTensor, as_float, quantize, scale_from_absmax, sqnr_db
from edgessm.quant.recipe import Recipe
from edgessm.quant.weights import quantize_gptq, quantize_rtn

DEFAULT_REPORT_PERCENTILE = 99.999


def _broadcast_scale(scale: torch.Tensor, channels: int) -> torch.Tensor:
    """A stored scale ([] per tensor, [C] per channel, [G] per group of C/G channels) → broadcastable over C."""
    if scale.numel() in (1, channels):
        return scale
    return scale.repeat_interleave(channels // scale.numel())


def _copy_linear(src: nn.Linear, weight: torch.Tensor | None = None, bias: bool = True) -> nn.Linear:
    w = src.weight if weight is None else weight
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias and src.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if lin.bias is not None:
            lin.bias.copy_(src.bias)
    return lin


class QuantMixerBase(nn.Module):
    SITES: tuple[str, ...] = ()
    LINEARS: tuple[str, ...] = ()

    def __init__(self, config: MambaConfig, recipe: Recipe, layer_idx: int) -> None:
        super().__init__()
        self.config, self.recipe, self.layer_idx = config, recipe, layer_idx
        self.hadamard = recipe.hadamard
        # False while the weights are still float (calibration phase): quantization points pass through.
        self.quantized = True
        self._observers: dict[str, RangeObserver] | None = None
        self._hessians: dict[str, HessianObserver] | None = None
        self.meters: dict[str, SqnrMeter] | None = None
        if recipe.quantize_activations:
            for site in self.SITES:
                self.register_buffer(f"scale_{site}", torch.ones(self._scale_shape(site)))

    # ---- structure ---------------------------------------------------------------------------
    def _scale_shape(self, site: str) -> tuple[int, ...]:
        return ()

    def _linear_shapes(self) -> dict[str, tuple[int, int, bool]]:
        """name → (in_features, out_features, has_bias) of the quantized linears."""
        raise NotImplementedError

    def _make_quant_linears(self) -> None:
        for name, (fin, fout, bias) in self._linear_shapes().items():
            setattr(self, name, QuantLinear(fin, fout, bias, self.recipe.w_bits, self.recipe.group_size))

    def where(self, site: str) -> str:
        return f"layer {self.layer_idx} (backbone.layers.{self.layer_idx}.mixer), site {site}"

    # ---- quantization points ---------------------------------------------------------------
    def act(self, site: str, t: torch.Tensor) -> Act:
        if self._observers is not None:
            check_finite(t, self.where(site))
            self._observers[site].update(t)
            return t
        if not (self.quantized and self.recipe.quantize_activations):
            return t
        scale = _broadcast_scale(getattr(self, f"scale_{site}"), t.shape[-1])
        qt = QTensor(quantize(t, scale, 8), scale)
        if self.meters is not None:
            self.meters.setdefault(site, SqnrMeter()).update(t, qt.dequantize(t.dtype))
        return qt

    def linear(self, name: str, a: Act) -> torch.Tensor:
        module = getattr(self, name)
        if isinstance(module, QuantLinear):
            return module(a)
        x = as_float(a)
        if self._hessians is not None:
            check_finite(x, self.where(f"{name} input"))
            self._hessians.setdefault(name, HessianObserver()).update(x)
        return module(x)

    def project_out(self, y: torch.Tensor) -> torch.Tensor:
        """out_proj(H y) with Hᵀ folded into out_proj's weight (Quamba), or plain out_proj(y)."""
        if self.hadamard:
            y = hadamard_transform(y)
        return self.linear("out_proj", self.act("out_in", y))

    def _fold_hadamard(self, out_proj: nn.Linear) -> nn.Linear:
        h = hadamard_matrix(out_proj.in_features, torch.float64, normalized=True).to(out_proj.weight.device)
        return _copy_linear(out_proj, (out_proj.weight.double() @ h.T).float())

    # ---- calibration -----------------------------------------------------------------------
    def start_observing(self, total_tokens: int, collect_hessians: bool) -> None:
        pct = self.recipe.percentile or DEFAULT_REPORT_PERCENTILE
        self._observers = {
            s: RangeObserver(pct, total_tokens * self.config.d_inner) if s == "ssm_x" else RangeObserver() for s in self.SITES
        }
        self._hessians = {} if collect_hessians else None

    def stop_observing(self) -> tuple[dict[str, RangeObserver], dict[str, HessianObserver]]:
        obs, hess = self._observers or {}, self._hessians or {}
        self._observers = self._hessians = None
        return obs, hess

    def site_absmax(self, site: str, obs: RangeObserver) -> torch.Tensor:
        """The range a site's scale covers (a tensor of the site's scale shape)."""
        if site == "ssm_x" and self.recipe.percentile is not None:
            return torch.tensor(obs.percentile())
        return torch.tensor(obs.absmax)

    def finalize(self, observers: dict[str, RangeObserver], hessians: dict[str, HessianObserver]) -> dict[str, float]:
        """Set activation scales and quantize the linears; returns each linear's weight SQNR (dB)."""
        if self.recipe.quantize_activations:
            for site in self.SITES:
                with torch.no_grad():
                    getattr(self, f"scale_{site}").copy_(scale_from_absmax(self.site_absmax(site, observers[site]), 8))
        self.quantized = True
        weight_sqnr = {}
        for name in self.LINEARS:
            float_lin: nn.Linear = getattr(self, name)
            w = float_lin.weight.detach().float()
            if self.recipe.method == "gptq":
                if name not in hessians:
                    raise ValueError(f"{self.where(name)}: no Hessian collected for GPTQ")
                codes, scales = quantize_gptq(w, hessians[name].hessian(), self.recipe.w_bits, self.recipe.group_size,
                                              self.recipe.gptq_damp)
            else:
                codes, scales = quantize_rtn(w, self.recipe.w_bits, self.recipe.group_size)
            qlin = QuantLinear.from_codes(codes, scales, float_lin.bias, self.recipe.w_bits, self.recipe.group_size).to(w.device)
            weight_sqnr[name] = sqnr_db(w, qlin.dequantized_weight())
            setattr(self, name, qlin)
        return weight_sqnr

    def _conv(self, x: torch.Tensor, state: LayerState | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, C, L] float → (silu(conv) [B, C, L], conv_state)."""
        w, state_conv = self.conv1d.weight.squeeze(1), None if state is None else state.conv
        return causal_conv1d_continue(x, w, self.conv1d.bias, state_conv)


class QuantMamba1Mixer(QuantMixerBase):
    SITES = ("in_proj", "conv_in", "ssm_x", "dt_in", "ssm_dt", "ssm_B", "ssm_C", "ssm_z", "out_in")
    LINEARS = ("in_proj", "x_proj", "dt_proj", "out_proj")

    def __init__(self, config: MambaConfig, recipe: Recipe, layer_idx: int) -> None:
        super().__init__(config, recipe, layer_idx)
        di, n = config.d_inner, config.d_state
        self.conv1d = nn.Conv1d(di, di, config.d_conv, groups=di, padding=config.d_conv - 1, bias=config.conv_bias)
        self.A_log = nn.Parameter(torch.zeros(di, n))
        self.D = nn.Parameter(torch.ones(di))
        self.dt_bias = nn.Parameter(torch.zeros(di))  # dt_proj's bias, added inside the scan
        self._make_quant_linears()

    def _linear_shapes(self) -> dict[str, tuple[int, int, bool]]:
        c = self.config
        return {
            "in_proj": (c.d_model, 2 * c.d_inner, c.proj_bias),
            "x_proj": (c.d_inner, c.dt_rank + 2 * c.d_state, False),
            "dt_proj": (c.dt_rank, c.d_inner, False),
            "out_proj": (c.d_inner, c.d_model, c.proj_bias),
        }

    @classmethod
    def from_float(cls, mixer: Mamba1Mixer, recipe: Recipe, layer_idx: int) -> QuantMamba1Mixer:
        q = cls(mixer.config, recipe, layer_idx)
        q.quantized = False
        q.conv1d.load_state_dict(mixer.conv1d.state_dict())
        with torch.no_grad():
            q.A_log.copy_(mixer.A_log)
            q.D.copy_(mixer.D)
            q.dt_bias.copy_(mixer.dt_proj.bias)
        q.in_proj, q.x_proj = _copy_linear(mixer.in_proj), _copy_linear(mixer.x_proj)
        q.dt_proj = _copy_linear(mixer.dt_proj, bias=False)
        q.out_proj = q._fold_hadamard(mixer.out_proj) if recipe.hadamard else _copy_linear(mixer.out_proj)
        return q

    def forward(self, hidden: torch.Tensor, state: LayerState | None = None) -> tuple[torch.Tensor, LayerState]:
        cfg = self.config
        x, z = self.linear("in_proj", self.act("in_proj", hidden)).chunk(2, dim=-1)
        xc, conv_state = self._conv(as_float(self.act("conv_in", x)).transpose(1, 2), state)
        u = self.act("ssm_x", xc.transpose(1, 2))  # [B, L, d_inner]
        dt, Bm, Cm = torch.split(self.linear("x_proj", u), [cfg.dt_rank, cfg.d_state, cfg.d_state], dim=-1)
        dt = as_float(self.act("ssm_dt", self.linear("dt_proj", self.act("dt_in", dt))))
        y, ssm_state = selective_scan_continue(
            as_float(u), dt, -torch.exp(self.A_log.float()), as_float(self.act("ssm_B", Bm)),
            as_float(self.act("ssm_C", Cm)), self.D, as_float(self.act("ssm_z", z)), self.dt_bias,
            None if state is None else state.ssm,
        )
        return self.project_out(y.to(hidden.dtype)), LayerState(conv_state, ssm_state)


class QuantMamba2Mixer(QuantMixerBase):
    SITES = ("in_proj", "conv_in", "ssm_x", "ssm_B", "ssm_C", "ssm_z", "out_in")
    LINEARS = ("in_proj", "out_proj")

    def __init__(self, config: MambaConfig, recipe: Recipe, layer_idx: int) -> None:
        super().__init__(config, recipe, layer_idx)
        h = config.n_heads
        self.conv1d = nn.Conv1d(
            config.conv_dim, config.conv_dim, config.d_conv, groups=config.conv_dim, padding=config.d_conv - 1,
            bias=config.conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.zeros(h))
        self.A_log = nn.Parameter(torch.zeros(h))
        self.D = nn.Parameter(torch.ones(h))
        self.norm = GatedRMSNorm(config.d_inner, group_size=config.d_inner // config.n_groups, eps=config.norm_eps)
        # Quamba2 reordering: original index of each d_inner channel (identity when not reordered).
        self.register_buffer("channel_perm", torch.arange(config.d_inner))
        self.cluster_labels: torch.Tensor | None = None  # cluster of each (reordered) channel, calibration only
        self._make_quant_linears()

    def _scale_shape(self, site: str) -> tuple[int, ...]:
        if site == "ssm_x" and self.recipe.cluster_x:
            return (self.config.d_inner,)
        if site in ("ssm_B", "ssm_C") and self.recipe.group_bc:
            return (self.config.n_groups,)
        return ()

    def _linear_shapes(self) -> dict[str, tuple[int, int, bool]]:
        c = self.config
        return {
            "in_proj": (c.d_model, c.d_inner + c.conv_dim + c.n_heads, c.proj_bias),
            "out_proj": (c.d_inner, c.d_model, c.proj_bias),
        }

    @classmethod
    def from_float(cls, mixer: Mamba2Mixer, recipe: Recipe, layer_idx: int) -> QuantMamba2Mixer:
        q = cls(mixer.config, recipe, layer_idx)
        q.quantized = False
        q.conv1d.load_state_dict(mixer.conv1d.state_dict())
        q.norm.load_state_dict(mixer.norm.state_dict())
        with torch.no_grad():
            for name in ("dt_bias", "A_log", "D"):
                getattr(q, name).copy_(getattr(mixer, name))
        q.in_proj = _copy_linear(mixer.in_proj)
        q.out_proj = q._fold_hadamard(mixer.out_proj) if recipe.hadamard else _copy_linear(mixer.out_proj)
        return q

    def site_absmax(self, site: str, obs: RangeObserver) -> torch.Tensor:
        cfg = self.config
        if site == "ssm_x" and self.recipe.cluster_x:
            return self.cluster_absmax(obs.channel_absmax)
        if site in ("ssm_B", "ssm_C") and self.recipe.group_bc:
            return obs.channel_absmax.reshape(cfg.n_groups, cfg.d_state).amax(1)
        return super().site_absmax(site, obs)

    def cluster_absmax(self, channel_absmax: torch.Tensor) -> torch.Tensor:
        """Per-channel ranges → each channel's cluster range (set by ``edgessm.quant.reorder``)."""
        labels = self.cluster_labels
        if labels is None:
            raise ValueError(f"{self.where('ssm_x')}: cluster_x is set but the channels were not clustered")
        labels = labels.to(channel_absmax.device)
        cluster_max = channel_absmax.new_zeros(int(labels.max()) + 1).scatter_reduce(0, labels, channel_absmax, "amax")
        return cluster_max[labels]

    def forward(self, hidden: torch.Tensor, state: LayerState | None = None) -> tuple[torch.Tensor, LayerState]:
        cfg = self.config
        batch, length, _ = hidden.shape
        z, xBC, dt = torch.split(
            self.linear("in_proj", self.act("in_proj", hidden)), [cfg.d_inner, cfg.conv_dim, cfg.n_heads], dim=-1
        )
        xc, conv_state = self._conv(as_float(self.act("conv_in", xBC)).transpose(1, 2), state)
        gn = cfg.n_groups * cfg.d_state
        x, Bm, Cm = torch.split(xc.transpose(1, 2), [cfg.d_inner, gn, gn], dim=-1)
        y, ssm_state = ssd_continue(
            as_float(self.act("ssm_x", x)).reshape(batch, length, cfg.n_heads, cfg.head_dim), dt,
            -torch.exp(self.A_log.float()),
            as_float(self.act("ssm_B", Bm)).reshape(batch, length, cfg.n_groups, cfg.d_state),
            as_float(self.act("ssm_C", Cm)).reshape(batch, length, cfg.n_groups, cfg.d_state),
            self.D, self.dt_bias, None if state is None else state.ssm, cfg.dt_limit, cfg.chunk_size,
        )
        y = self.norm(y.reshape(batch, length, cfg.d_inner), as_float(self.act("ssm_z", z)))
        return self.project_out(y.to(hidden.dtype)), LayerState(conv_state, ssm_state)


QUANT_MIXERS: dict[str, type[QuantMixerBase]] = {"mamba1": QuantMamba1Mixer, "mamba2": QuantMamba2Mixer}
