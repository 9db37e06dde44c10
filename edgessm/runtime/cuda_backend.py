"""GPU backend: a MambaLM run with the project's CUDA kernels, its decode step replayed as a CUDA graph.

The model's own parameters are used; what changes is how a step executes:

- scan, conv and state update go through libedgessm_kernels.so (``edgessm.ops.cuda_kernels``), but
  for Mamba-1's decode state update (below) and the decode conv update, which runs in the epilogue of
  in_proj's GEMV kernel where it can (``ConvUpdate``: batch <= 4, 16-bit activations);
- residual add + RMSNorm is one Triton kernel per layer (``edgessm.ops.triton_gemv.add_rmsnorm``), and
  so is Mamba-2's gated RMSNorm (``gated_rmsnorm``, reading z in place from in_proj's output);
- Mamba-1's decode step runs dt_proj inside its state update (``dt_proj_state_update``, a Triton kernel;
  float, W8 and W4 weights; W8A8 keeps the separate GEMV and CUDA kernel); its prefill and Mamba-2's
  state update are the CUDA kernels;
- the linear layers run as Triton GEMV kernels on float16/bfloat16 weights (``weights="float"``; cuBLAS
  for float32 and for prefill-sized inputs) or on quantized weights (``"w8a16"``, ``"w4a16"``,
  ``"w8a8"``; formats in ``edgessm.ops.triton_gemv``). Quantized modes
  quantize every mixer projection and the LM head from the model's weights (a layer whose input size
  is not a multiple of the W4 group falls back to W8, e.g. Mamba-1's dt_proj); embeddings, norms and
  SSM parameters stay in the model dtype;
- the whole decode step (embedding, all layers, head) is captured once per batch size in a CUDA
  graph over static state buffers, and each ``step`` is one graph replay. Prefill runs eagerly.

States are ``CudaStates``. ``step`` returns the graph's static buffers: they are overwritten by the
next step, so ``clone()`` a state you want to keep. Prefill always starts from zero states.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgessm.config import MambaConfig
from edgessm.errors import BackendUnavailable, ConfigError
from edgessm.models import LayerState, MambaLM
from edgessm.ops import cuda_kernels as K
from edgessm.ops import triton_gemv as Q

log = logging.getLogger(__name__)

WEIGHT_MODES = ("float", "w8a16", "w4a16", "w8a8")


# ---- states -------------------------------------------------------------------------------------------
@dataclass
class CudaStates:
    """Per-layer recurrent states, stacked: conv [n_layer, B, conv_dim, d_conv-1] (io dtype), ssm float32."""

    conv: torch.Tensor
    ssm: torch.Tensor

    @classmethod
    def zeros(cls, config: MambaConfig, batch: int, dtype: torch.dtype, device: torch.device) -> CudaStates:
        conv_shape, ssm_shape = config.state_shapes(batch)
        return cls(torch.zeros((config.n_layer, *conv_shape), dtype=dtype, device=device),
                   torch.zeros((config.n_layer, *ssm_shape), dtype=torch.float32, device=device))

    @classmethod
    def from_layer_states(cls, states: list[LayerState]) -> CudaStates:
        return cls(torch.stack([s.conv for s in states]).contiguous(), torch.stack([s.ssm.float() for s in states]).contiguous())

    def to_layer_states(self) -> list[LayerState]:
        return [LayerState(c, s) for c, s in zip(self.conv, self.ssm)]

    @property
    def batch(self) -> int:
        return self.conv.shape[1]

    def clone(self) -> CudaStates:
        return CudaStates(self.conv.clone(), self.ssm.clone())

    def copy_(self, other: CudaStates) -> None:
        if other.conv.shape != self.conv.shape or other.ssm.shape != self.ssm.shape:
            raise ValueError(
                f"states of shapes conv {tuple(other.conv.shape)} / ssm {tuple(other.ssm.shape)} do not fit the decode "
                f"graph's buffers conv {tuple(self.conv.shape)} / ssm {tuple(self.ssm.shape)}"
            )
        self.conv.copy_(other.conv)
        self.ssm.copy_(other.ssm)

    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.ssm.numel() * self.ssm.element_size()


# ---- linear layers -------------------------------------------------------------------------------------
class DecodeLinear:
    """One linear layer as the backend runs it: a Triton GEMV (float16/bfloat16 or quantized weights) for
    decode-sized inputs, cuBLAS for larger ones and for float32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, mode: str, group_size: int = 128,
                 act_scale: float | None = None) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        if mode == "w4a16" and self.in_features % group_size:
            mode = "w8a16"  # too narrow for a whole group (e.g. Mamba-1's dt_proj with dt_rank 48)
        self.mode = mode
        self.tensors: tuple[torch.Tensor, ...]
        if mode == "float":
            self.tensors = (weight,)
        elif mode == "w4a16":
            self.tensors = Q.quantize_w4(weight, group_size)
        else:
            self.tensors = Q.quantize_w8(weight)
        if mode == "w8a8":
            if act_scale is None or not act_scale > 0:
                raise ValueError(f"w8a8 linear [{self.out_features}x{self.in_features}] needs a positive activation scale")
        self.act_scale = act_scale
        self._fn = self._select()

    def _select(self) -> Callable[[torch.Tensor, Q.ConvUpdate | None], torch.Tensor]:
        t, b = self.tensors, self.bias
        if self.mode == "float":
            return lambda x, conv: Q.gemv_float(x, t[0], b, conv=conv)
        if self.mode == "w8a16":
            return lambda x, conv: Q.gemv_w8a16(x, t[0], t[1], b, conv=conv)
        if self.mode == "w4a16":
            return lambda x, conv: Q.gemv_w4a16(x, t[0], t[1], b, conv=conv)
        scale = float(self.act_scale)
        return lambda x, conv: Q.gemv_w8a8(x, scale, t[0], t[1], b, conv=conv)

    def __call__(self, x: torch.Tensor, conv: Q.ConvUpdate | None = None) -> torch.Tensor:
        """x [..., in_features] → [..., out_features]; with ``conv`` (decode: x [B, in_features]), the
        conv update of Q.ConvUpdate on those output columns: in the GEMV kernel's epilogue where it
        takes one (Q.fuses_conv_update), else as the separate CUDA kernel after it."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.stride(-1) != 1:  # e.g. a transposed [B, C, L] activation: the GEMV kernels stream rows of x
            x2 = x2.contiguous()
        if conv is None or Q.fuses_conv_update(x2):
            y = self._fn(x2, conv)
        else:
            y = self._fn(x2, None)
            cols = conv.columns(y)
            cols.copy_(K.causal_conv1d_update(cols.contiguous(), conv.state, conv.weight, conv.bias))
        return y.view(*lead, self.out_features)

    def nbytes(self) -> int:
        tensors = self.tensors + ((self.bias,) if self.bias is not None else ())
        return sum(t.numel() * t.element_size() for t in tensors)


def calibrate_act_scales(model: MambaLM, tokens: torch.Tensor) -> dict[str, float]:
    """Per-tensor int8 scales (absmax / 127) of every linear layer's input, from one forward of ``tokens``.

    Keys: ``layers.{i}.{in_proj,x_proj,dt_proj,out_proj}`` and ``lm_head``. dt_proj's input is the
    first dt_rank columns of x_proj's output (the mixer calls it functionally).
    """
    absmax: dict[str, float] = {}

    def record(name: str, t: torch.Tensor) -> None:
        absmax[name] = max(absmax.get(name, 0.0), float(t.detach().abs().max()))

    hooks = []
    for i, mixer in enumerate(model.mixers):
        for attr in ("in_proj", "x_proj", "out_proj"):
            if hasattr(mixer, attr):
                name = f"layers.{i}.{attr}"
                hooks.append(getattr(mixer, attr).register_forward_pre_hook(lambda m, a, n=name: record(n, a[0])))
        if hasattr(mixer, "x_proj"):
            rank = model.config.dt_rank
            hooks.append(mixer.x_proj.register_forward_hook(
                lambda m, a, out, n=f"layers.{i}.dt_proj", r=rank: record(n, out[..., :r])))
    hooks.append(model.lm_head.register_forward_pre_hook(lambda m, a: record("lm_head", a[0])))
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return {k: max(v, 1e-8) / 127.0 for k, v in absmax.items()}


# ---- per-layer parameters as the kernels want them ------------------------------------------------------
@dataclass
class _Layer:
    norm_w: torch.Tensor
    in_proj: DecodeLinear
    out_proj: DecodeLinear
    x_proj: DecodeLinear | None
    dt_proj: DecodeLinear | None
    conv_w: torch.Tensor  # [C, K] float32
    conv_b: torch.Tensor | None
    A: torch.Tensor  # float32: [D, N] (Mamba-1) or [H] (Mamba-2)
    D: torch.Tensor
    dt_bias: torch.Tensor
    gated_norm: tuple[torch.Tensor, int, float] | None  # Mamba-2's GatedRMSNorm: (weight, group size, eps)

    def nbytes(self) -> int:
        tensors = [self.norm_w, self.conv_w, self.A, self.D, self.dt_bias]
        tensors += [self.conv_b] if self.conv_b is not None else []
        tensors += [self.gated_norm[0]] if self.gated_norm is not None else []
        linears = [lin for lin in (self.in_proj, self.out_proj, self.x_proj, self.dt_proj) if lin is not None]
        return sum(t.numel() * t.element_size() for t in tensors) + sum(lin.nbytes() for lin in linears)


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float().contiguous()


@dataclass
class _Graph:
    token: torch.Tensor
    states: CudaStates
    logits: torch.Tensor
    graph: torch.cuda.CUDAGraph | None


class CudaBackend:
    """The Backend protocol on one CUDA GPU (see the module docstring)."""

    name = "cuda"

    def __init__(
        self,
        model: MambaLM,
        device: str | torch.device = "cuda",
        dtype: torch.dtype | None = torch.float16,
        weights: str = "float",
        group_size: int = 128,
        act_scales: dict[str, float] | None = None,
        calib_tokens: torch.Tensor | None = None,
        use_graph: bool = True,
    ) -> None:
        if not torch.cuda.is_available():
            raise BackendUnavailable("the cuda backend needs a CUDA GPU (torch.cuda.is_available() is False)")
        if Q.triton is None:
            raise BackendUnavailable("the cuda backend needs the `triton` package")
        K.kernel_library()  # fail now, with the library's path, rather than at the first token
        if weights not in WEIGHT_MODES:
            raise ConfigError(f"unknown weights mode {weights!r}: expected one of {', '.join(WEIGHT_MODES)}")
        self.device = torch.device(device)
        self.model = model.to(device=self.device, dtype=dtype).eval() if dtype else model.to(self.device).eval()
        self.dtype = self.model.lm_head.weight.dtype
        if weights != "float" and self.dtype not in (torch.float16, torch.bfloat16):
            raise ConfigError(f"weights={weights!r} needs a float16/bfloat16 model, this one is {self.dtype}")
        self.config = self.model.config
        self.weights = weights
        self.name = "cuda" if weights == "float" else f"cuda-{weights}"  # what reports and `bench` print
        self.use_graph = use_graph
        if weights == "w8a8" and act_scales is None:
            act_scales = self._default_calibration(calib_tokens)
        self.act_scales = act_scales or {}
        self.group_size = group_size
        self._layers = [self._layer(i, layer) for i, layer in enumerate(self.model.backbone.layers)]
        self._head = self._linear("lm_head", self.model.lm_head)
        self._res_dtype = torch.float32 if self.config.residual_in_fp32 else self.dtype
        self._graphs: dict[int, _Graph] = {}

    # ---- construction ----
    def _default_calibration(self, tokens: torch.Tensor | None) -> dict[str, float]:
        if tokens is None:
            log.warning("w8a8 without activation scales: calibrating on random tokens (fine for speed, not for accuracy)")
            gen = torch.Generator().manual_seed(0)
            tokens = torch.randint(0, self.config.vocab_size, (1, 128), generator=gen)
        return calibrate_act_scales(self.model, tokens.to(self.device))

    def _linear(self, name: str, lin: nn.Linear, weight_only: bool = False) -> DecodeLinear:
        bias = None if weight_only else lin.bias
        return DecodeLinear(lin.weight.detach(), None if bias is None else bias.detach(), self.weights,
                            self.group_size, self.act_scales.get(name))

    def _layer(self, i: int, block: nn.Module) -> _Layer:
        mixer, p = block.mixer, f"layers.{i}."
        m1 = self.config.arch == "mamba1"
        return _Layer(
            norm_w=block.norm.weight.detach(),
            in_proj=self._linear(p + "in_proj", mixer.in_proj),
            out_proj=self._linear(p + "out_proj", mixer.out_proj),
            x_proj=self._linear(p + "x_proj", mixer.x_proj) if m1 else None,
            # the dt bias is added inside the scan, so dt_proj runs without it
            dt_proj=self._linear(p + "dt_proj", mixer.dt_proj, weight_only=True) if m1 else None,
            conv_w=_f32(mixer.conv1d.weight.squeeze(1)),
            conv_b=_f32(mixer.conv1d.bias),
            A=-torch.exp(mixer.A_log.detach().float()).contiguous(),
            D=_f32(mixer.D),
            dt_bias=_f32(mixer.dt_proj.bias if m1 else mixer.dt_bias),
            gated_norm=None if m1 else (mixer.norm.weight.detach(), mixer.norm.group_size, mixer.norm.eps),
        )

    # ---- the shared skeleton: embeddings, norms, head ----
    def _run(self, tokens: torch.Tensor, mixer: Callable[[int, _Layer, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """tokens [B] or [B, L] → logits [..., vocab] float32; ``mixer(i, layer, normed [B*L, d])`` → [B*L, d]."""
        cfg = self.config
        hidden = F.embedding(tokens.reshape(-1), self.model.backbone.embeddings.weight)
        residual = hidden.to(self._res_dtype, copy=True)  # updated in place by add_rmsnorm
        normed = torch.empty_like(hidden)
        out = None
        for i, layer in enumerate(self._layers):
            Q.add_rmsnorm(residual, out, layer.norm_w, cfg.norm_eps, normed)
            out = mixer(i, layer, normed)
        Q.add_rmsnorm(residual, out, self.model.backbone.norm_f.weight, cfg.norm_eps, normed)
        return self._head(normed).float().view(*tokens.shape, cfg.vocab_size)

    # ---- Mamba-1 ----
    def _m1_decode(self, st: CudaStates) -> Callable:
        cfg = self.config
        di, r, n = cfg.d_inner, cfg.dt_rank, cfg.d_state

        def mixer(i: int, ly: _Layer, h: torch.Tensor) -> torch.Tensor:
            xz = ly.in_proj(h, conv=Q.ConvUpdate(st.conv[i], ly.conv_w, ly.conv_b, 0))
            xc = xz[:, :di]  # convolved
            dbc = ly.x_proj(xc)
            if ly.dt_proj.mode != "w8a8":  # dt_proj inside the state update: one graph node fewer
                w = ly.dt_proj.tensors
                y = Q.dt_proj_state_update(st.ssm[i], xc, dbc, w[0], w[1] if len(w) > 1 else None, ly.A, ly.D,
                                           xz[:, di:], ly.dt_bias)
            else:  # W8A8 quantizes dt_proj's input too, which the fused kernel does not
                dt = ly.dt_proj(dbc[:, :r])
                y = K.selective_state_update(st.ssm[i], xc.contiguous(), dt, ly.A, dbc[:, r:r + n].contiguous(),
                                             dbc[:, r + n:].contiguous(), ly.D, xz[:, di:].contiguous(), ly.dt_bias,
                                             True)
            return ly.out_proj(y)

        return mixer

    def _m1_prefill(self, batch: int, length: int, convs: list, ssms: list) -> Callable:
        cfg = self.config
        di, r, n = cfg.d_inner, cfg.dt_rank, cfg.d_state

        def channel_first(t: torch.Tensor) -> torch.Tensor:  # [B*L, C] → [B, C, L]
            return t.view(batch, length, -1).transpose(1, 2).contiguous()

        def mixer(i: int, ly: _Layer, h: torch.Tensor) -> torch.Tensor:
            xz = ly.in_proj(h)
            xc, conv_state = K.causal_conv1d_fwd(channel_first(xz[:, :di]), ly.conv_w, ly.conv_b)
            dbc = ly.x_proj(xc.transpose(1, 2).reshape(batch * length, di))
            dt = ly.dt_proj(dbc[:, :r])
            y, ssm_state = K.selective_scan_fwd(
                xc, channel_first(dt), ly.A, channel_first(dbc[:, r:r + n]), channel_first(dbc[:, r + n:]), ly.D,
                channel_first(xz[:, di:]), ly.dt_bias, True,
            )
            convs.append(conv_state)
            ssms.append(ssm_state)
            return ly.out_proj(y.transpose(1, 2).reshape(batch * length, di))

        return mixer

    # ---- Mamba-2 ----
    def _m2_split(self, ly: _Layer, h: torch.Tensor, conv: Q.ConvUpdate | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """in_proj's output split into (z, xBC, dt); xBC convolved when ``conv`` is given (decode)."""
        cfg = self.config
        zxbcdt = ly.in_proj(h, conv=conv)
        return torch.split(zxbcdt, [cfg.d_inner, cfg.conv_dim, cfg.n_heads], dim=-1)

    def _m2_out(self, ly: _Layer, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The gated norm of the scan's y [B, (L,) H, P] with z [B*L, d_inner] (a column slice of in_proj's
        output), then out_proj."""
        return ly.out_proj(Q.gated_rmsnorm(y.reshape(-1, self.config.d_inner), z, *ly.gated_norm))

    def _m2_decode(self, st: CudaStates) -> Callable:
        cfg = self.config
        di, gn, b = cfg.d_inner, cfg.n_groups * cfg.d_state, st.batch
        hp, gs = (b, cfg.n_heads, cfg.head_dim), (b, cfg.n_groups, cfg.d_state)

        def mixer(i: int, ly: _Layer, h: torch.Tensor) -> torch.Tensor:
            z, xc, dt = self._m2_split(ly, h, Q.ConvUpdate(st.conv[i], ly.conv_w, ly.conv_b, di))
            y = K.ssd_state_update(
                st.ssm[i], xc[:, :di].reshape(hp).contiguous(), dt.contiguous(), ly.A,
                xc[:, di:di + gn].reshape(gs).contiguous(), xc[:, di + gn:].reshape(gs).contiguous(), ly.D,
                ly.dt_bias, True, cfg.dt_limit,
            )
            return self._m2_out(ly, y, z)

        return mixer

    def _m2_prefill(self, batch: int, length: int, convs: list, ssms: list) -> Callable:
        cfg = self.config
        di, gn = cfg.d_inner, cfg.n_groups * cfg.d_state

        def mixer(i: int, ly: _Layer, h: torch.Tensor) -> torch.Tensor:
            z, xBC, dt = self._m2_split(ly, h)
            xc, conv_state = K.causal_conv1d_fwd(xBC.view(batch, length, -1).transpose(1, 2).contiguous(),
                                                 ly.conv_w, ly.conv_b)
            xc = xc.transpose(1, 2)  # [B, L, conv_dim]
            groups = (batch, length, cfg.n_groups, cfg.d_state)
            y, ssm_state = K.ssd_scan_fwd(
                xc[..., :di].reshape(batch, length, cfg.n_heads, cfg.head_dim).contiguous(),
                dt.reshape(batch, length, cfg.n_heads).contiguous(), ly.A,
                xc[..., di:di + gn].reshape(groups).contiguous(), xc[..., di + gn:].reshape(groups).contiguous(),
                ly.D, ly.dt_bias, True, cfg.dt_limit, chunk_size=cfg.chunk_size,
            )
            convs.append(conv_state)
            ssms.append(ssm_state)
            return self._m2_out(ly, y, z)

        return mixer

    # ---- Backend protocol ----
    @torch.no_grad()
    def prefill_tensors(self, tokens: torch.Tensor) -> tuple[torch.Tensor, CudaStates]:
        """tokens [B, T] int64 on the device → (logits [B, T, vocab] float32, states)."""
        batch, length = tokens.shape
        convs: list[torch.Tensor] = []
        ssms: list[torch.Tensor] = []
        build = self._m1_prefill if self.config.arch == "mamba1" else self._m2_prefill
        logits = self._run(tokens, build(batch, length, convs, ssms))
        return logits, CudaStates(torch.stack(convs), torch.stack(ssms))

    def prefill(self, tokens: np.ndarray) -> tuple[np.ndarray, CudaStates]:
        logits, states = self.prefill_tensors(torch.as_tensor(tokens, dtype=torch.long, device=self.device))
        return logits.cpu().numpy(), states

    @torch.no_grad()
    def _decode(self, token: torch.Tensor, states: CudaStates) -> torch.Tensor:
        build = self._m1_decode if self.config.arch == "mamba1" else self._m2_decode
        return self._run(token, build(states))

    def decode_graph(self, batch: int) -> _Graph:
        """The captured decode step for ``batch`` (captured on first use; eager when use_graph is False)."""
        g = self._graphs.get(batch)
        if g is not None:
            return g
        token = torch.zeros(batch, dtype=torch.long, device=self.device)
        states = CudaStates.zeros(self.config, batch, self.dtype, self.device)
        if not self.use_graph:
            g = _Graph(token, states, torch.empty(batch, self.config.vocab_size, device=self.device), None)
        else:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up: Triton compilation, cuBLAS handles, allocator
                for _ in range(2):
                    self._decode(token, states)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self._decode(token, states)
            g = _Graph(token, states, logits, graph)
            log.info("captured the %s decode step (batch %d, %d layers) in a CUDA graph", self.weights, batch, self.config.n_layer)
        self._graphs[batch] = g
        return g

    @torch.no_grad()
    def step_tensors(self, token: torch.Tensor, states: CudaStates) -> tuple[torch.Tensor, CudaStates]:
        """token [B] int64 → (logits [B, vocab] float32, states); both are the graph's static buffers."""
        g = self.decode_graph(token.shape[0])
        if states is not g.states:
            g.states.copy_(states)
        g.token.copy_(token)
        if g.graph is not None:
            g.graph.replay()
        else:
            g.logits.copy_(self._decode(g.token, g.states))
        return g.logits, g.states

    def step(self, token: np.ndarray, states: CudaStates) -> tuple[np.ndarray, CudaStates]:
        logits, states = self.step_tensors(torch.as_tensor(token, dtype=torch.long).to(self.device), states)
        return logits.cpu().numpy(), states

    # ---- accounting for the benchmark ----
    def decode_weight_bytes(self, batch: int = 1) -> int:
        """Bytes of parameters one decode step must read: every linear weight (with scales), norms,
        SSM/conv parameters, and the ``batch`` embedding rows (a tied head is counted once, as lm_head)."""
        emb = self.model.backbone.embeddings.weight
        norm_f = self.model.backbone.norm_f.weight
        return (sum(ly.nbytes() for ly in self._layers) + self._head.nbytes() + norm_f.numel() * norm_f.element_size()
                + batch * emb.shape[1] * emb.element_size())

    def state_bytes(self, batch: int = 1) -> int:
        conv_shape, ssm_shape = self.config.state_shapes(batch)
        return self.config.n_layer * (math.prod(conv_shape) * torch.finfo(self.dtype).bits // 8 + math.prod(ssm_shape) * 4)
