"""Float64 NumPy references for the edgessm CUDA kernels, written from docs/onnx_ops.md.

Every function takes float64 arrays holding exactly the values the kernel consumed (inputs already
rounded to the io dtype and int8 inputs already dequantized) and returns float64 results.
"""

from __future__ import annotations

import numpy as np

SOFTPLUS_THRESHOLD = 20.0


def softplus(x: np.ndarray) -> np.ndarray:
    """softplus(x) = log1p(exp(x)), and x itself above the mamba_ssm threshold of 20."""
    return np.where(x > SOFTPLUS_THRESHOLD, x, np.log1p(np.exp(np.minimum(x, SOFTPLUS_THRESHOLD))))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def causal_conv1d(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, use_silu: bool
) -> tuple[np.ndarray, np.ndarray]:
    """x [B, C, L], weight [C, K] -> (y [B, C, L], conv_state [B, C, K-1])."""
    _, _, length = x.shape
    width = weight.shape[1]
    xpad = np.concatenate([np.zeros(x.shape[:2] + (width - 1,)), x], axis=-1)
    y = np.zeros_like(x)
    for k in range(width):
        y += weight[None, :, k, None] * xpad[..., k : k + length]
    if bias is not None:
        y += bias[None, :, None]
    if use_silu:
        y = silu(y)
    return y, xpad[..., xpad.shape[-1] - (width - 1) :]


def causal_conv1d_update(
    x: np.ndarray, conv_state: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, use_silu: bool
) -> tuple[np.ndarray, np.ndarray]:
    """x [B, C], conv_state [B, C, K-1] -> (y [B, C], new_conv_state [B, C, K-1])."""
    window = np.concatenate([conv_state, x[..., None]], axis=-1)
    y = (window * weight[None]).sum(-1)
    if bias is not None:
        y = y + bias[None]
    if use_silu:
        y = silu(y)
    return y, window[..., 1:]


def _dt(delta: np.ndarray, bias: np.ndarray | None, use_softplus: bool) -> np.ndarray:
    dt = delta if bias is None else delta + bias
    return softplus(dt) if use_softplus else dt


def selective_scan(
    u: np.ndarray,
    delta: np.ndarray,
    A: np.ndarray,
    Bm: np.ndarray,
    Cm: np.ndarray,
    D: np.ndarray | None,
    z: np.ndarray | None,
    delta_bias: np.ndarray | None,
    delta_softplus: bool,
    h0: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mamba-1 scan. u, delta, z [B, D, L]; A [D, N]; Bm, Cm [B, N, L]; h0 [B, D, N]."""
    batch, dim, length = u.shape
    dt = _dt(delta, None if delta_bias is None else delta_bias[None, :, None], delta_softplus)
    h = np.zeros((batch, dim, A.shape[1])) if h0 is None else h0.copy()
    y = np.empty_like(u)
    for t in range(length):
        h = np.exp(dt[:, :, t, None] * A[None]) * h + (dt[:, :, t] * u[:, :, t])[..., None] * Bm[
            :, None, :, t
        ]
        y[:, :, t] = (h * Cm[:, None, :, t]).sum(-1)
    if D is not None:
        y += D[None, :, None] * u
    if z is not None:
        y *= silu(z)
    return y, h


def selective_state_update(
    state: np.ndarray,
    x: np.ndarray,
    dt: np.ndarray,
    A: np.ndarray,
    Bm: np.ndarray,
    Cm: np.ndarray,
    D: np.ndarray | None,
    z: np.ndarray | None,
    dt_bias: np.ndarray | None,
    dt_softplus: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """One step of `selective_scan`: state [B, D, N]; x, dt, z [B, D]; Bm, Cm [B, N]."""
    y, h = selective_scan(
        x[..., None],
        dt[..., None],
        A,
        Bm[..., None],
        Cm[..., None],
        D,
        None if z is None else z[..., None],
        dt_bias,
        dt_softplus,
        state,
    )
    return y[..., 0], h


def ssd_dt(
    dt: np.ndarray, dt_bias: np.ndarray | None, dt_softplus: bool, dt_min: float, dt_max: float
) -> np.ndarray:
    return np.clip(_dt(dt, dt_bias, dt_softplus), dt_min, dt_max)


def ssd_scan(
    x: np.ndarray,
    dt: np.ndarray,
    A: np.ndarray,
    Bm: np.ndarray,
    Cm: np.ndarray,
    D: np.ndarray | None,
    dt_bias: np.ndarray | None,
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
    s0: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mamba-2 SSD. x [B, L, H, P]; dt [B, L, H]; A [H]; Bm, Cm [B, L, G, N]; s0 [B, H, P, N]."""
    batch, length, nheads, headdim = x.shape
    ngroups, dstate = Bm.shape[2], Bm.shape[3]
    heads_per_group = nheads // ngroups
    Bh = np.repeat(Bm, heads_per_group, axis=2)  # [B, L, H, N]
    Ch = np.repeat(Cm, heads_per_group, axis=2)
    dtc = ssd_dt(dt, dt_bias, dt_softplus, dt_min, dt_max)
    s = np.zeros((batch, nheads, headdim, dstate)) if s0 is None else s0.copy()
    y = np.empty_like(x)
    for t in range(length):
        decay = np.exp(dtc[:, t] * A[None])  # [B, H]
        s = decay[..., None, None] * s + (dtc[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        y[:, t] = (s * Ch[:, t, :, None, :]).sum(-1)
    if D is not None:
        y += D[None, None, :, None] * x
    return y, s


def ssd_state_update(
    state: np.ndarray,
    x: np.ndarray,
    dt: np.ndarray,
    A: np.ndarray,
    Bm: np.ndarray,
    Cm: np.ndarray,
    D: np.ndarray | None,
    dt_bias: np.ndarray | None,
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
) -> tuple[np.ndarray, np.ndarray]:
    """One step of `ssd_scan`: state [B, H, P, N]; x [B, H, P]; dt [B, H]; Bm, Cm [B, G, N]."""
    y, s = ssd_scan(
        x[:, None], dt[:, None], A, Bm[:, None], Cm[:, None], D, dt_bias, dt_softplus, dt_min, dt_max, state
    )
    return y[:, 0], s


def sylvester(k: int) -> np.ndarray:
    """Dense Sylvester Hadamard matrix of size 2^k (natural order)."""
    h = np.ones((1, 1))
    for _ in range(k):
        h = np.block([[h, h], [h, -h]])
    return h


def fwht(x: np.ndarray) -> np.ndarray:
    """Unnormalized Walsh-Hadamard transform (Sylvester order) along the last axis (power of 2)."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    v = x.reshape(-1, n).copy()
    h = 1
    while h < n:
        v = v.reshape(v.shape[0], n // (2 * h), 2, h)
        v = np.stack([v[:, :, 0] + v[:, :, 1], v[:, :, 0] - v[:, :, 1]], axis=2).reshape(-1, n)
        h *= 2
    return v.reshape(*lead, n)


def hadamard_transform(x: np.ndarray, had_m: np.ndarray, scale: float) -> np.ndarray:
    """y = scale * (had_m kron H_{2^k}) x along the last axis of x [..., m * 2^k]."""
    m = had_m.shape[0]
    n = x.shape[-1]
    k2 = n // m
    xa = fwht(x.reshape(*x.shape[:-1], m, k2))  # Sylvester factor along b for every a
    y = np.einsum("ij,...jb->...ib", had_m, xa)  # base matrix along a for every b
    return scale * y.reshape(x.shape)


def quantize_int8(v: np.ndarray, out_scale: float) -> np.ndarray:
    """Symmetric int8: round half to even (np.rint), saturate to [-128, 127]."""
    return np.clip(np.rint(v / out_scale), -128, 127)
