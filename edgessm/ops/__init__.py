"""Reference ops: the numerical oracle every kernel, ONNX lowering and quantized path is checked against.

All functions are functional (they never modify their inputs) and accumulate in float32, or in
float64 when given float64 tensors (used as the high-precision reference in tests).
"""

from edgessm.ops.conv import causal_conv1d, causal_conv1d_update
from edgessm.ops.scan import selective_scan, selective_state_update, softplus
from edgessm.ops.ssd import ssd_scan, ssd_state_update

__all__ = [
    "causal_conv1d",
    "causal_conv1d_update",
    "selective_scan",
    "selective_state_update",
    "softplus",
    "ssd_scan",
    "ssd_state_update",
]
