"""Peer kernels that bench_kernels.py times beside edgessm's in the same run.

The peer is mamba_ssm (state-spaces/mamba), the kernels Mamba's authors ship: its Triton SSD prefill
(`mamba_chunk_scan_combined`, five kernels: chunk cumsum, C B^T per chunk, chunk states, state passing,
chunk outputs) and its Triton selective state update (the decode step of Mamba-1 and, with per-head
parameters broadcast, of Mamba-2). Its CUDA extensions (the
Mamba-1 prefill scan, causal conv1d) need a PyTorch C++ build against the device's CUDA toolkit and are
not among the peers. tools/peer_mamba_ssm.sh prepares the folder that `load_mamba_ssm` takes (none of
it is committed); its MAMBA_SSM_COMMIT file names the upstream commit, which the benchmark records.
"""

from __future__ import annotations

import importlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger("peers")


@dataclass(frozen=True)
class MambaSsmPeer:
    """mamba_ssm's Triton entry points, called with edgessm's argument conventions."""

    name: str  # "mamba_ssm@<commit>"
    _chunk_scan: Callable
    _state_update: Callable

    def ssd_prefill(self, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                    D: torch.Tensor, dt_bias: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [b, L, h, p], dt [b, L, h] (raw: softplus(dt + dt_bias) inside), A/D/dt_bias [h], B/C [b, L, g, n]
        → (y [b, L, h, p] in x's dtype, final state [b, h, p, n] float32)."""
        return self._chunk_scan(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True,
                                return_final_states=True)

    def state_update(self, state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                     C: torch.Tensor, D: torch.Tensor, z: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
        """Mamba-1 decode step, state [b, d, n] float32 updated in place; returns y [b, d]."""
        return self._state_update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)

    def ssd_state_update(self, state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                         B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
        """Mamba-2 decode step as mamba_ssm's Mamba2.step calls it (per-head dt, A, D, dt_bias broadcast over
        headdim and dstate by stride-0 views): state [b, h, p, n] float32 updated in place, x [b, h, p],
        dt [b, h], A/D/dt_bias [h], B/C [b, g, n]; returns y [b, h, p]."""
        p, n = state.shape[2], state.shape[3]
        return self._state_update(state, x, dt[:, :, None].expand(-1, -1, p), A[:, None, None].expand(-1, p, n),
                                  B, C, D=D[:, None].expand(-1, p), dt_bias=dt_bias[:, None].expand(-1, p),
                                  dt_softplus=True)


def load_mamba_ssm(folder: Path) -> MambaSsmPeer:
    """Imports mamba_ssm's Triton kernels from `folder` (made by tools/peer_mamba_ssm.sh).

    Raises ImportError naming the folder and what is missing there.
    """
    folder = folder.resolve()
    if not (folder / "mamba_ssm" / "ops" / "triton" / "ssd_combined.py").is_file():
        raise ImportError(f"{folder}: no mamba_ssm/ops/triton/ssd_combined.py; run tools/peer_mamba_ssm.sh first")
    sys.path.insert(0, str(folder))
    try:
        ssd = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
        ssu = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
    except ImportError as exc:
        raise ImportError(f"{folder}: importing mamba_ssm's Triton kernels failed: {exc}") from exc
    commit_file = folder / "MAMBA_SSM_COMMIT"
    commit = commit_file.read_text().strip()[:10] if commit_file.is_file() else "unknown"
    log.info("peer: mamba_ssm %s from %s", commit, folder)
    return MambaSsmPeer(f"mamba_ssm@{commit}", ssd.mamba_chunk_scan_combined, ssu.selective_state_update)
