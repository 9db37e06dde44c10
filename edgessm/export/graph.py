"""The prefill and decode graphs of a float MambaLM, written node by node.

Both graphs compute exactly what ``MambaLM.forward`` computes (float32), with the state-space
parts (causal conv, scan / state update) either as `edgessm` custom nodes (``scan="plugin"``)
or as their standard-ONNX lowerings (``scan="portable"``, ``edgessm.export.lowering``).

Initializers carry the Hugging Face parameter names: linear weights are stored transposed
(``<name>.weight_t``, [in, out], so MatMul needs no Transpose), the conv weight squeezed to
[C, K], ``A = -exp(A_log)`` folded (``<mixer>.A``), and missing biases as zero tensors (the op
contract has no optional inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from onnx import ModelProto, TensorProto, helper, numpy_helper

from edgessm.config import MambaConfig
from edgessm.export.builder import DOMAIN, GraphBuilder
from edgessm.ops.hadamard import hadamard_base, hadamard_factor
from edgessm.export.lowering import Node, lower
from edgessm.export.schemas import I8, OP_SPECS
from edgessm.models import MambaLM

BATCH, SEQ = "batch", "seq"


@dataclass(frozen=True)
class GraphOptions:
    scan: str  # "plugin" | "portable"
    opset: int
    chunk_mamba1: int  # portable Scan chunk for SelectiveScan
    chunk_mamba2: int  # portable Scan chunk for SSDScan


def state_names(layer: int) -> tuple[str, str, str, str]:
    """(conv in, ssm in, conv out, ssm out) tensor names of one layer's recurrent state."""
    return f"conv_state.{layer}", f"ssm_state.{layer}", f"conv_state_out.{layer}", f"ssm_state_out.{layer}"


def state_dims(config: MambaConfig) -> tuple[list[int | str], list[int | str]]:
    conv, ssm = config.state_shapes(1)
    return [BATCH, *conv[1:]], [BATCH, *ssm[1:]]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().contiguous().numpy()


def _int_tensor(name: str, codes: np.ndarray, bits: int) -> TensorProto:
    """An INT8 or INT4 initializer with raw bytes (INT4: two codes per byte, the first in the low
    nibble, as ONNX packs them), so large weights can move to external data."""
    if bits == 8:
        return numpy_helper.from_array(codes.astype(np.int8), name)
    flat = codes.astype(np.uint8).reshape(-1) & 0xF
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
    return helper.make_tensor(name, TensorProto.INT4, codes.shape, packed.tobytes(), raw=True)


class _ModelGraph:
    def __init__(self, model: MambaLM, options: GraphOptions, decode: bool) -> None:
        self.model, self.cfg, self.opts, self.decode = model, model.config, options, decode
        self.b = GraphBuilder()
        self._weights: dict[str, str] = {}
        # Dequantized tensor → (its int8 codes, the site's stored scale): lets plugin graphs hand the
        # codes themselves to the Quant* ops (follow() carries them through Transpose/Reshape).
        self._codes: dict[str, tuple[str, torch.Tensor]] = {}

    # ---- parameters --------------------------------------------------------------------------
    def weight(self, name: str, value: np.ndarray) -> str:
        if name not in self._weights:
            self._weights[name] = self.b.initializer(name, value.astype(np.float32))
        return self._weights[name]

    def linear(self, prefix: str, module: torch.nn.Module, x: str, bias: bool = True) -> str:
        """x @ Wᵀ (+ bias). A QuantLinear's weight is an int8/int4 initializer behind a DequantizeLinear."""
        if hasattr(module, "qweight"):
            w = self.quant_weight(prefix, module)
        else:
            w = self.weight(f"{prefix}.weight_t", _np(module.weight).T)
        y = self.b.op("MatMul", [x, w])
        if bias and module.bias is not None:
            y = self.b.op("Add", [y, self.weight(f"{prefix}.bias", _np(module.bias))])
        return y

    def quant_weight(self, prefix: str, module: torch.nn.Module) -> str:
        """DequantizeLinear of the transposed codes [in, out]: per output channel (axis 1) for one
        scale per row, else block-wise along the input axis (axis 0, block_size = group size)."""
        from edgessm.quant.weights import effective_group

        codes = module.codes().detach().cpu().T.contiguous().numpy().astype(np.int8)  # [in, out]
        scales = _np(module.w_scale)  # [out, n_groups]
        name = f"{prefix}.qweight_t"
        if name not in self._weights:
            self.b.initializer_proto(_int_tensor(name, codes, module.w_bits))
            self._weights[name] = name
        if scales.shape[1] == 1:
            return self.b.op("DequantizeLinear", [name, self.weight(f"{prefix}.w_scale", scales[:, 0])], axis=1)
        group = effective_group(module.in_features, module.group_size)
        return self.b.op("DequantizeLinear", [name, self.weight(f"{prefix}.w_scale_t", scales.T)], axis=0,
                         block_size=group)

    def act(self, prefix: str, mixer, site: str, x: str, channels: int) -> str:
        """Quantization point ``site`` (docs/quantization.md): QuantizeLinear → DequantizeLinear with the
        calibrated static scale (per tensor, or per channel of the last axis), or x itself when the
        model keeps float activations."""
        recipe = getattr(mixer, "recipe", None)
        if recipe is None or not recipe.quantize_activations:
            return x
        stored = getattr(mixer, f"scale_{site}").detach().float()
        scale, zp, axis = self._act_scale(prefix, site, stored, channels)
        q = self.b.op("QuantizeLinear", [x, scale, zp], **axis)
        dq = self.b.op("DequantizeLinear", [q, scale, zp], **axis)
        self._codes[dq] = (q, stored)
        return dq

    def _act_scale(self, prefix: str, site: str, stored: torch.Tensor, channels: int) -> tuple[str, str, dict]:
        """(scale, int8 zero point, axis attribute) of a site: 0-d per tensor, else [channels] on axis -1."""
        if stored.numel() == 1:
            return self.weight(f"{prefix}.scale_{site}", _np(stored.reshape(()))), self.b.const(0, np.int8), {}
        per_channel = stored.repeat_interleave(channels // stored.numel())  # per group → per channel
        return (self.weight(f"{prefix}.scale_{site}", _np(per_channel)), self.b.const(np.zeros(channels), np.int8),
                {"axis": -1})

    def follow(self, x: str, fn) -> str:
        """fn(x) (a Transpose/Reshape), applied to x's int8 codes as well when it has them."""
        y = fn(x)
        if x in self._codes:
            q, stored = self._codes[x]
            self._codes[y] = (fn(q), stored)
        return y

    def project_out(self, prefix: str, mixer, y: str) -> str:
        """out_proj(Q_out_in(H y)): with Quamba's rotation H (folded into out_proj as W Hᵀ)."""
        cfg, b = self.cfg, self.b
        if getattr(mixer, "hadamard", False):
            m, _ = hadamard_factor(cfg.d_inner)
            had = self.weight(f"hadamard_base_{m}", _np(hadamard_base(m)))
            shape = [BATCH, cfg.d_inner] if self.decode else [BATCH, SEQ, cfg.d_inner]
            scale = float(cfg.d_inner) ** -0.5
            stored = getattr(mixer, "scale_out_in", None)
            if self.quant_ops(mixer) and stored is not None and stored.numel() == 1:
                # fused rotation + int8 quantization, then the DequantizeLinear the int8 GEMM reads
                q = b.op("HadamardQuantize", [y, had], domain=DOMAIN, scale=scale, out_scale=float(stored))
                s, zp, _ = self._act_scale(prefix, "out_in", stored.detach().float(), cfg.d_inner)
                x = b.op("DequantizeLinear", [q, s, zp])
                return self.linear(f"{prefix}.out_proj", mixer.out_proj, x)
            rotated = b.fresh("hadamard")
            self.custom("HadamardTransform", [y, had], [rotated], [shape, [m, m]], scale=scale)
            y = rotated
        return self.linear(f"{prefix}.out_proj", mixer.out_proj, self.act(prefix, mixer, "out_in", y, cfg.d_inner))

    def quant_ops(self, mixer) -> bool:
        """Plugin graphs of models with int8 activations use the Quant* scan ops (int8 inputs)."""
        recipe = getattr(mixer, "recipe", None)
        return self.opts.scan == "plugin" and recipe is not None and recipe.quantize_activations

    def quant_scan(self, prefix: str, op_type: str, inputs: list[str], outputs: list[str],
                   scale_sizes: list[int], **attrs: int | float) -> bool:
        """Emit Quant<op_type> with the int8 codes of its quantized inputs and their scales, each
        scale as a [size] tensor (docs/onnx_ops.md). False if an input has no codes (float op then)."""
        spec = OP_SPECS[f"Quant{op_type}"]
        int8 = [i for i, (_, t) in enumerate(spec.inputs[: len(inputs)]) if t == I8]
        if any(inputs[i] not in self._codes for i in int8):
            return False
        args, scales = list(inputs), []
        for i, size in zip(int8, scale_sizes):
            q, stored = self._codes[inputs[i]]
            args[i] = q
            if stored.numel() not in (1, size):
                raise ValueError(f"{prefix}: Quant{op_type} input {spec.inputs[i][0]} needs {size} scale(s), "
                                 f"the model stores {stored.numel()}")
            value = stored.reshape(-1).expand(size) if stored.numel() == 1 else stored.reshape(size)
            scales.append(self.weight(f"{prefix}.{spec.inputs[len(inputs) + len(scales)][0]}", _np(value)))
        self.b.op(f"Quant{op_type}", args + scales, outputs=outputs, domain=DOMAIN, out_dtype=TensorProto.FLOAT, **attrs)
        return True

    def rmsnorm(self, prefix: str, weight: torch.Tensor, eps: float, x: str, group: int | None = None) -> str:
        b = self.b
        h = x
        if group is not None:
            h = b.reshape(x, [0] * (1 if self.decode else 2) + [-1, group])
        ms = b.op("ReduceMean", [b.op("Mul", [h, h]), b.i64(-1)], keepdims=1)
        h = b.op("Mul", [h, b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [ms, b.const(eps)])])])])
        if group is not None:
            h = b.reshape(h, [0] * (1 if self.decode else 2) + [-1])
        return b.op("Mul", [h, self.weight(f"{prefix}.weight", _np(weight))])

    def custom(self, op_type: str, inputs: list[str], outputs: list[str], shapes: list[list[int | str]],
               **attrs: int | float) -> None:
        """One state-space op: a custom node (plugin) or its lowering (portable)."""
        if self.opts.scan == "plugin":
            self.b.op(op_type, inputs, outputs=outputs, domain=DOMAIN, **attrs)
            return
        chunk = {"SelectiveScan": self.opts.chunk_mamba1, "SSDScan": self.opts.chunk_mamba2}.get(op_type)
        with self.b.scope(op_type):
            lower(self.b, Node(op_type, inputs, outputs, dict(attrs), shapes), chunk)

    # ---- mixers ------------------------------------------------------------------------------
    def conv(self, prefix: str, mixer, x: str, layer: int) -> str:
        """x: [B, C, L] (prefill) or [B, C] (decode) → silu(causal conv), writing the conv state."""
        cfg = self.cfg
        c, k = mixer.conv1d.weight.shape[0], cfg.d_conv
        w = self.weight(f"{prefix}.conv1d.weight", _np(mixer.conv1d.weight.squeeze(1)))
        bias = mixer.conv1d.bias if mixer.conv1d.bias is not None else torch.zeros(c)
        bname = self.weight(f"{prefix}.conv1d.bias", _np(bias))
        conv_in, _, conv_out, _ = state_names(layer)
        y = self.b.fresh("conv_y")
        if self.decode:
            self.custom("CausalConv1dUpdate", [x, conv_in, w, bname], [y, conv_out],
                        [[BATCH, c], [BATCH, c, k - 1], [c, k], [c]], silu=1)
        else:
            self.custom("CausalConv1d", [x, w, bname], [y, conv_out], [[BATCH, c, SEQ], [c, k], [c]], silu=1)
        return y

    def mamba1(self, prefix: str, mixer, h: str, layer: int) -> str:
        cfg, b = self.cfg, self.b
        di, n, r = cfg.d_inner, cfg.d_state, cfg.dt_rank
        act = lambda site, t, c: self.act(prefix, mixer, site, t, c)  # noqa: E731
        x, z = b.split(self.linear(f"{prefix}.in_proj", mixer.in_proj, act("in_proj", h, cfg.d_model)), [di, di])
        x = act("conv_in", x, di)
        A = self.weight(f"{prefix}.A", -np.exp(_np(mixer.A_log)))
        D = self.weight(f"{prefix}.D", _np(mixer.D))
        quantized = hasattr(mixer, "recipe")  # QuantMamba1Mixer keeps dt_proj's bias as dt_bias
        dt_bias = self.weight(f"{prefix}.dt_bias" if quantized else f"{prefix}.dt_proj.bias",
                              _np(mixer.dt_bias if quantized else mixer.dt_proj.bias))
        _, ssm_in, _, ssm_out = state_names(layer)
        y = b.fresh("ssm_y")
        if self.decode:
            u = act("ssm_x", self.conv(prefix, mixer, x, layer), di)
        else:
            u = act("ssm_x", b.transpose(self.conv(prefix, mixer, b.transpose(x, [0, 2, 1]), layer), [0, 2, 1]), di)
        dt, bm, cm = b.split(self.linear(f"{prefix}.x_proj", mixer.x_proj, u), [r, n, n])
        dt = act("ssm_dt", self.linear(f"{prefix}.dt_proj", mixer.dt_proj, act("dt_in", dt, r), bias=False), di)
        bm, cm, z = act("ssm_B", bm, n), act("ssm_C", cm, n), act("ssm_z", z, di)
        quant = self.quant_ops(mixer)
        scale_sizes = [di, 1, 1, 1, 1]  # u/x per channel, dt, B, C, z per tensor
        if self.decode:
            args = [ssm_in, u, dt, A, bm, cm, D, z, dt_bias]
            if not (quant and self.quant_scan(prefix, "SelectiveStateUpdate", args, [y, ssm_out], scale_sizes,
                                              dt_softplus=1)):
                self.custom("SelectiveStateUpdate", args, [y, ssm_out],
                            [[BATCH, di, n], [BATCH, di], [BATCH, di], [di, n], [BATCH, n], [BATCH, n], [di], [BATCH, di],
                             [di]], dt_softplus=1)
        else:
            cf = [self.follow(t, lambda v: b.transpose(v, [0, 2, 1])) for t in (u, dt, bm, cm, z)]  # channel-first
            args = [cf[0], cf[1], A, cf[2], cf[3], D, cf[4], dt_bias]
            if not (quant and self.quant_scan(prefix, "SelectiveScan", args, [y, ssm_out], scale_sizes, delta_softplus=1)):
                self.custom("SelectiveScan", args, [y, ssm_out],
                            [[BATCH, di, SEQ], [BATCH, di, SEQ], [di, n], [BATCH, n, SEQ], [BATCH, n, SEQ], [di],
                             [BATCH, di, SEQ], [di]], delta_softplus=1)
            y = b.transpose(y, [0, 2, 1])
        return self.project_out(prefix, mixer, y)

    def mamba2(self, prefix: str, mixer, h: str, layer: int) -> str:
        cfg, b = self.cfg, self.b
        di, hh, p, g, n = cfg.d_inner, cfg.n_heads, cfg.head_dim, cfg.n_groups, cfg.d_state
        act = lambda site, t, c: self.act(prefix, mixer, site, t, c)  # noqa: E731
        z, xbc, dt = b.split(self.linear(f"{prefix}.in_proj", mixer.in_proj, act("in_proj", h, cfg.d_model)),
                             [di, cfg.conv_dim, hh])
        xbc = act("conv_in", xbc, cfg.conv_dim)
        lead = [0] if self.decode else [0, 0]  # Reshape 0 = keep batch (and seq) as they are
        A = self.weight(f"{prefix}.A", -np.exp(_np(mixer.A_log)))
        D = self.weight(f"{prefix}.D", _np(mixer.D))
        dt_bias = self.weight(f"{prefix}.dt_bias", _np(mixer.dt_bias))
        lo, hi = cfg.dt_limit
        limits = {"dt_min": float(lo), "dt_max": float(hi)}
        _, ssm_in, _, ssm_out = state_names(layer)
        y = b.fresh("ssm_y")
        if self.decode:
            xc = self.conv(prefix, mixer, xbc, layer)
        else:
            xc = b.transpose(self.conv(prefix, mixer, b.transpose(xbc, [0, 2, 1]), layer), [0, 2, 1])
        x, bm, cm = b.split(xc, [di, g * n, g * n])
        x, bm, cm = act("ssm_x", x, di), act("ssm_B", bm, g * n), act("ssm_C", cm, g * n)
        x = self.follow(x, lambda v: b.reshape(v, lead + [hh, p]))
        bm, cm = (self.follow(t, lambda v: b.reshape(v, lead + [g, n])) for t in (bm, cm))
        quant = self.quant_ops(mixer)
        scale_sizes = [hh * p, g, g]  # x per channel, B and C per SSM group
        if self.decode:
            args = [ssm_in, x, dt, A, bm, cm, D, dt_bias]
            if not (quant and self.quant_scan(prefix, "SSDStateUpdate", args, [y, ssm_out], scale_sizes,
                                              dt_softplus=1, **limits)):
                self.custom("SSDStateUpdate", args, [y, ssm_out],
                            [[BATCH, hh, p, n], [BATCH, hh, p], [BATCH, hh], [hh], [BATCH, g, n], [BATCH, g, n], [hh],
                             [hh]], dt_softplus=1, **limits)
        else:
            args = [x, dt, A, bm, cm, D, dt_bias]
            attrs = dict(dt_softplus=1, chunk_size=cfg.chunk_size, **limits)
            if not (quant and self.quant_scan(prefix, "SSDScan", args, [y, ssm_out], scale_sizes, **attrs)):
                self.custom("SSDScan", args, [y, ssm_out],
                            [[BATCH, SEQ, hh, p], [BATCH, SEQ, hh], [hh], [BATCH, SEQ, g, n], [BATCH, SEQ, g, n], [hh],
                             [hh]], **attrs)
        y = b.op("Mul", [b.reshape(y, lead + [di]), b.silu(act("ssm_z", z, di))])
        y = self.rmsnorm(f"{prefix}.norm", mixer.norm.weight, mixer.norm.eps, y, group=mixer.norm.group_size)
        return self.project_out(prefix, mixer, y)

    # ---- whole model -------------------------------------------------------------------------
    def build(self) -> ModelProto:
        cfg, b, m = self.cfg, self.b, self.model
        token = "token" if self.decode else "tokens"
        emb = self.weight("backbone.embeddings.weight", _np(m.backbone.embeddings.weight))
        h = b.op("Gather", [emb, token], axis=0)
        mixer_fn = self.mamba1 if cfg.arch == "mamba1" else self.mamba2
        for i, layer in enumerate(m.backbone.layers):
            prefix = f"backbone.layers.{i}"
            with b.scope(f"layers.{i}"):
                normed = self.rmsnorm(f"{prefix}.norm", layer.norm.weight, layer.norm.eps, h)
                h = b.op("Add", [h, mixer_fn(f"{prefix}.mixer", layer.mixer, normed, i)])
        h = self.rmsnorm("backbone.norm_f", m.backbone.norm_f.weight, m.backbone.norm_f.eps, h)
        if cfg.tie_embeddings:
            head = b.transpose(emb, [1, 0])
        else:
            head = self.weight("lm_head.weight_t", _np(m.lm_head.weight).T)
        b.op("MatMul", [h, head], outputs=["logits"])
        return self._model(token)

    def _model(self, token: str) -> ModelProto:
        cfg = self.cfg
        conv_dims, ssm_dims = state_dims(cfg)
        lead = [BATCH] if self.decode else [BATCH, SEQ]
        inputs = [helper.make_tensor_value_info(token, TensorProto.INT64, lead)]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, lead + [cfg.vocab_size])]
        for i in range(cfg.n_layer):
            conv_in, ssm_in, conv_out, ssm_out = state_names(i)
            if self.decode:
                inputs += [helper.make_tensor_value_info(conv_in, TensorProto.FLOAT, conv_dims),
                           helper.make_tensor_value_info(ssm_in, TensorProto.FLOAT, ssm_dims)]
            outputs += [helper.make_tensor_value_info(conv_out, TensorProto.FLOAT, conv_dims),
                        helper.make_tensor_value_info(ssm_out, TensorProto.FLOAT, ssm_dims)]
        name = f"edgessm_{cfg.arch}_{'decode' if self.decode else 'prefill'}"
        opsets = [helper.make_opsetid("", self.opts.opset)]
        if self.opts.scan == "plugin":
            opsets.append(helper.make_opsetid(DOMAIN, 1))
        # prune: a quantization point whose codes go straight to a Quant* op leaves its dequantized
        # branch unused
        return helper.make_model(self.b.graph(name, inputs, outputs, prune=True), opset_imports=opsets,
                                 producer_name="edgessm", ir_version=IR_VERSION)


# IR 10 is what opset 21 needs and what ONNX Runtime >= 1.20 and TensorRT 10 read (onnx's own
# default is newer than ONNX Runtime 1.31 accepts).
IR_VERSION = 10


def build_graph(model: MambaLM, options: GraphOptions, kind: str) -> ModelProto:
    """The ``"prefill"`` or ``"decode"`` graph of a float model."""
    if kind not in ("prefill", "decode"):
        raise ValueError(f"unknown graph kind {kind!r}: expected 'prefill' or 'decode'")
    with torch.no_grad():
        return _ModelGraph(model, options, decode=kind == "decode").build()
