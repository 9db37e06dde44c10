"""Reference ops: chunked == sequential, one-step updates == one scan step, continuation == whole,
and the float32 path agrees with an independent float64 NumPy recurrence written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgessm.ops import (
    causal_conv1d,
    causal_conv1d_update,
    selective_scan,
    selective_state_update,
    ssd_scan,
    ssd_state_update,
)
from tests.conftest import rel_err


def mamba1_inputs(b: int, d: int, n: int, length: int, dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(
        u=r(b, d, length), delta=r(b, d, length) - 1.0, A=-torch.rand(d, n, generator=g, dtype=dtype) * 4 - 0.1,
        B=r(b, n, length), C=r(b, n, length), D=r(d), z=r(b, d, length), delta_bias=r(d) * 0.5,
    )


def mamba2_inputs(b: int, length: int, h: int, p: int, g_: int, n: int, dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(
        x=r(b, length, h, p), dt=r(b, length, h) - 1.0, A=-torch.rand(h, generator=g, dtype=dtype) * 4 - 0.1,
        B=r(b, length, g_, n), C=r(b, length, g_, n), D=r(h), dt_bias=r(h) * 0.5,
    )


def numpy_selective_scan(u, delta, A, B, C, D, z, delta_bias):
    """Plain float64 loops, written from the Mamba paper's recurrence (independent of edgessm.ops)."""
    u, delta, A, B, C, D, z, db = (t.double().numpy() for t in (u, delta, A, B, C, D, z, delta_bias))
    bsz, d, length = u.shape
    y = np.zeros_like(u)
    for b in range(bsz):
        h = np.zeros((d, A.shape[1]))
        for t in range(length):
            dt = np.log1p(np.exp(delta[b, :, t] + db))
            h = np.exp(dt[:, None] * A) * h + (dt * u[b, :, t])[:, None] * B[b, None, :, t]
            y[b, :, t] = h @ C[b, :, t] + D * u[b, :, t]
        y[b] *= z[b] / (1 + np.exp(-z[b]))
    return torch.from_numpy(y)


@pytest.mark.parametrize("length", [1, 7, 33])
def test_selective_scan_float32_vs_numpy_float64(length: int) -> None:
    inp = mamba1_inputs(2, 6, 5, length)
    ref = numpy_selective_scan(**inp)
    got, _ = selective_scan(**{k: v.float() for k, v in inp.items()}, delta_softplus=True)
    assert got.dtype == torch.float32
    assert rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("length,chunk", [(1, 4), (17, 4), (64, 16), (50, 64)])
def test_selective_scan_chunked_equals_sequential(length: int, chunk: int) -> None:
    inp = mamba1_inputs(2, 5, 4, length)
    h0 = torch.randn(2, 5, 4, dtype=torch.float64)
    y1, s1 = selective_scan(**inp, delta_softplus=True, initial_state=h0)
    y2, s2 = selective_scan(**inp, delta_softplus=True, initial_state=h0, chunk_size=chunk)
    assert rel_err(y2, y1) < 1e-12 and rel_err(s2, s1) < 1e-12


def test_selective_scan_continuation_and_state_update() -> None:
    inp = mamba1_inputs(3, 4, 6, 12)
    y_all, s_all = selective_scan(**inp, delta_softplus=True)
    head = {k: (v[..., :9] if v.dim() == 3 else v) for k, v in inp.items()}
    tail = {k: (v[..., 9:] if v.dim() == 3 else v) for k, v in inp.items()}
    y_head, s_head = selective_scan(**head, delta_softplus=True)
    y_tail, s_tail = selective_scan(**tail, delta_softplus=True, initial_state=s_head)
    assert rel_err(torch.cat([y_head, y_tail], -1), y_all) < 1e-12 and rel_err(s_tail, s_all) < 1e-12
    # the decode-step op, token by token from the same state, reproduces the tail
    state = s_head
    for t in range(3):
        y_t, state = selective_state_update(
            state, tail["u"][..., t], tail["delta"][..., t], inp["A"], tail["B"][..., t], tail["C"][..., t],
            inp["D"], tail["z"][..., t], inp["delta_bias"], dt_softplus=True,
        )
        assert rel_err(y_t, y_tail[..., t]) < 1e-12
    assert rel_err(state, s_all) < 1e-12


@pytest.mark.parametrize("length,chunk,groups", [(1, 8, 1), (21, 8, 1), (37, 16, 2), (64, 16, 4)])
def test_ssd_chunked_equals_sequential(length: int, chunk: int, groups: int) -> None:
    inp = mamba2_inputs(2, length, 4, 3, groups, 5)
    s0 = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    y1, f1 = ssd_scan(**inp, dt_softplus=True, dt_limit=(0.01, 2.0), initial_state=s0)
    y2, f2 = ssd_scan(**inp, dt_softplus=True, dt_limit=(0.01, 2.0), initial_state=s0, chunk_size=chunk)
    assert rel_err(y2, y1) < 1e-12 and rel_err(f2, f1) < 1e-12


def test_ssd_float32_chunked_vs_float64() -> None:
    inp = mamba2_inputs(1, 300, 4, 8, 2, 16)
    ref, _ = ssd_scan(**inp, dt_softplus=True)
    got, _ = ssd_scan(**{k: v.float() for k, v in inp.items()}, dt_softplus=True, chunk_size=64)
    assert rel_err(got, ref) < 1e-5


def test_ssd_state_update_equals_scan_step() -> None:
    inp = mamba2_inputs(2, 6, 4, 3, 2, 5)
    y_all, s_all = ssd_scan(**inp, dt_softplus=True, dt_limit=(0.0, 1.5))
    _, state = ssd_scan(**{k: (v[:, :5] if v.dim() >= 3 else v) for k, v in inp.items()}, dt_softplus=True, dt_limit=(0.0, 1.5))
    y, state = ssd_state_update(
        state, inp["x"][:, 5], inp["dt"][:, 5], inp["A"], inp["B"][:, 5], inp["C"][:, 5], inp["D"], inp["dt_bias"],
        dt_softplus=True, dt_limit=(0.0, 1.5),
    )
    assert rel_err(y, y_all[:, 5]) < 1e-12 and rel_err(state, s_all) < 1e-12


@pytest.mark.parametrize("width", [2, 3, 4])
def test_conv_update_equals_conv(width: int) -> None:
    x = torch.randn(2, 5, 11, dtype=torch.float64)
    w, b = torch.randn(5, width, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    y_all, st_all = causal_conv1d(x, w, b)
    # the independent definition: zero-padded depthwise correlation
    xp = torch.nn.functional.pad(x, (width - 1, 0))
    ref = torch.stack([(xp[:, :, t : t + width] * w).sum(-1) + b for t in range(11)], -1)
    assert rel_err(y_all, torch.nn.functional.silu(ref)) < 1e-12
    _, state = causal_conv1d(x[..., :4], w, b)
    for t in range(4, 11):
        y_t, state = causal_conv1d_update(x[..., t], state, w, b)
        assert rel_err(y_t, y_all[..., t]) < 1e-12
    assert torch.equal(state, st_all)


def test_conv_state_shorter_than_window_is_zero_padded() -> None:
    x = torch.randn(1, 3, 1)
    _, state = causal_conv1d(x, torch.randn(3, 4), None)
    assert state.shape == (1, 3, 3)
    assert torch.equal(state[..., :2], torch.zeros(1, 3, 2)) and torch.equal(state[..., 2], x[..., 0])
