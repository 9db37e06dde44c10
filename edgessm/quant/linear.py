"""A linear layer with int8 or packed-int4 weights, run as fake-quant or integer-exact.

Buffers (the names saved in model.safetensors):
- ``qweight``: int8 [out, in] (8-bit) or uint8 [out, ceil(in/2)] (4-bit, two codes per byte, see
  ``edgessm.quant.primitives.pack_int4``);
- ``w_scale``: float32 [out, n_groups] (n_groups = 1 for per-channel weights);
- ``bias``: float32 [out] (only when the float layer had one).

Modes (``QuantLinear.mode``):
- ``"fake"``: dequantize weights (and an int8 input) to float and run a float matmul;
- ``"int"``: int8 input codes x int weight codes summed exactly (int64 on the CPU; equal to an
  int32 accumulator, which cannot overflow for in_features < 2^31 / 2^14 = 131072), then scaled
  per group by ``w_scale * x_scale`` in float64 and summed over groups. Float inputs (W4A16) use
  the dequantized weight in both modes.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from edgessm.quant.primitives import Act, QTensor, pack_int4, unpack_int4
from edgessm.quant.weights import dequantize_weight, effective_group, n_groups

Mode = Literal["fake", "int"]
_INT_ACC_LIMIT = 2**31 // (128 * 128)


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, w_bits: int, group_size: int) -> None:
        super().__init__()
        if w_bits not in (4, 8):
            raise ValueError(f"QuantLinear: w_bits must be 4 or 8, got {w_bits}")
        self.in_features, self.out_features = in_features, out_features
        self.w_bits, self.group_size = w_bits, group_size
        self.mode: Mode = "fake"
        cols = in_features if w_bits == 8 else (in_features + 1) // 2
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=torch.int8 if w_bits == 8 else torch.uint8))
        self.register_buffer("w_scale", torch.ones(out_features, n_groups(in_features, group_size)))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, w_bits: int, group_size: int) -> QuantLinear:
        out, cols = codes.shape
        lin = cls(cols, out, bias is not None, w_bits, group_size)
        lin.qweight.copy_(codes if w_bits == 8 else pack_int4(codes))
        lin.w_scale.copy_(scales)
        if bias is not None:
            lin.bias.copy_(bias.detach().float())
        return lin

    def codes(self) -> torch.Tensor:
        """int8 weight codes [out, in]."""
        return self.qweight if self.w_bits == 8 else unpack_int4(self.qweight, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_weight(self.codes(), self.w_scale, self.group_size)

    def forward(self, x: Act) -> torch.Tensor:
        if isinstance(x, QTensor) and self.mode == "int":
            return self._int_forward(x)
        xf = x.dequantize() if isinstance(x, QTensor) else x
        return F.linear(xf, self.dequantized_weight().to(xf.dtype), None if self.bias is None else self.bias.to(xf.dtype))

    def _int_forward(self, x: QTensor) -> torch.Tensor:
        if x.scale.numel() != 1:
            raise ValueError("QuantLinear int mode needs a per-tensor input scale")
        if self.in_features >= _INT_ACC_LIMIT:
            raise ValueError(f"in_features={self.in_features} could overflow an int32 accumulator")
        g = effective_group(self.in_features, self.group_size)
        pad = (-self.in_features) % g
        lead = x.q.shape[:-1]
        xq = F.pad(x.q.reshape(-1, self.in_features).to(torch.int64), (0, pad))
        wq = F.pad(self.codes().to(torch.int64), (0, pad))
        xq = xq.reshape(xq.shape[0], -1, g).transpose(0, 1)  # [G, rows, g]
        wq = wq.reshape(self.out_features, -1, g).permute(1, 2, 0)  # [G, g, out]
        acc = torch.bmm(xq, wq)  # [G, rows, out], exact integer sums per group
        y = (acc.to(torch.float64) * self.w_scale.T.to(torch.float64)[:, None, :]).sum(0) * float(x.scale)
        if self.bias is not None:
            y = y + self.bias.to(torch.float64)
        return y.to(torch.float32).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w_bits={self.w_bits}, group_size={self.group_size}, mode={self.mode}"
