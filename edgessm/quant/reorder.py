"""Quamba2 sort-and-cluster of Mamba-2's SSM input x, and the offline reordering that keeps the
computation invariant.

Within each SSM group (heads that share B and C), heads are sorted by their calibrated range and
split into ``head_clusters`` contiguous clusters; inside each head the channels are sorted by
range, and the positions of a head cluster are split into ``dim_clusters`` contiguous clusters.
Every (group, head cluster, dim cluster) gets one int8 scale. Splits are optimal 1-D clusterings
(dynamic programming) of log-ranges, minimising Σ log²(cluster max / channel max): the resolution
each channel loses to its cluster's scale. (Quamba2 itself uses agglomerative + k-means
clustering on the sorted profiles; the structure — sorted heads, sorted channels, per-cluster
scales — is the same.)

Sorting is made free by permuting weights offline: heads move only within their group (B, C stay
valid) and channels only within their head, so in_proj's z/x/dt rows, the conv's x channels,
A/D/dt_bias, the gated norm's weight and out_proj's columns are permuted consistently and the
float model computes exactly the same function (up to float summation order).
"""

from __future__ import annotations

import torch
from torch import nn

from edgessm.ops.hadamard import hadamard_matrix
from edgessm.quant.mixers import QuantMamba2Mixer


def segment_1d(values: torch.Tensor, k: int) -> torch.Tensor:
    """Optimal split of ascending positive ``values`` into ≤ k contiguous segments; returns labels."""
    n = values.numel()
    k = max(1, min(k, n))
    lv = torch.log(values.double().clamp_min(float(values.max()) * 1e-8 if float(values.max()) > 0 else 1e-30))
    s1 = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(lv, 0)]).tolist()
    s2 = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(lv * lv, 0)]).tolist()
    lvl = lv.tolist()

    def cost(i: int, j: int) -> float:  # segment i..j inclusive, its scale set by the largest value lv[j]
        m = j - i + 1
        return m * lvl[j] ** 2 - 2 * lvl[j] * (s1[j + 1] - s1[i]) + (s2[j + 1] - s2[i])

    inf = float("inf")
    best = [[inf] * n for _ in range(k)]
    start = [[0] * n for _ in range(k)]
    for j in range(n):
        best[0][j] = cost(0, j)
    for c in range(1, k):
        for j in range(c, n):
            for i in range(c, j + 1):
                v = best[c - 1][i - 1] + cost(i, j)
                if v < best[c][j]:
                    best[c][j], start[c][j] = v, i
    c = min(range(k), key=lambda cc: best[cc][n - 1])
    labels = torch.empty(n, dtype=torch.long)
    j = n - 1
    while c >= 0:
        i = start[c][j] if c > 0 else 0
        labels[i : j + 1] = c
        j, c = i - 1, c - 1
    return labels


def sort_and_cluster(
    channel_absmax: torch.Tensor, n_groups: int, head_dim: int, head_clusters: int, dim_clusters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(channel permutation [d_inner], head permutation [n_heads], cluster label per new channel)."""
    a = channel_absmax.float().cpu().reshape(n_groups, -1, head_dim)
    heads_per_group = a.shape[1]
    perm, head_perm, labels = [], [], []
    next_label = 0
    for g in range(n_groups):
        key = a[g].amax(-1)
        order = torch.argsort(key, stable=True)
        head_labels = segment_1d(key[order], head_clusters)
        for c in range(int(head_labels.max()) + 1):
            heads = [int(h) for h in order[head_labels == c]]
            dim_orders = {h: torch.argsort(a[g, h], stable=True) for h in heads}
            profile = torch.stack([a[g, h][dim_orders[h]] for h in heads]).amax(0)
            dim_labels = segment_1d(profile, dim_clusters)
            for h in heads:
                old_head = g * heads_per_group + h
                head_perm.append(old_head)
                perm.append(old_head * head_dim + dim_orders[h])
                labels.append(next_label + dim_labels)
            next_label += int(dim_labels.max()) + 1
    return torch.cat(perm), torch.tensor(head_perm), torch.cat(labels)


def _rows(lin: nn.Linear, index: torch.Tensor) -> None:
    with torch.no_grad():
        lin.weight.copy_(lin.weight[index])
        if lin.bias is not None:
            lin.bias.copy_(lin.bias[index])


@torch.no_grad()
def apply_reorder(mixer: QuantMamba2Mixer, perm: torch.Tensor, head_perm: torch.Tensor, labels: torch.Tensor) -> None:
    """Permute a float-phase Mamba-2 quant mixer's channels (``perm``) and heads (``head_perm``) in place."""
    cfg = mixer.config
    di = cfg.d_inner
    perm, head_perm = perm.to(mixer.D.device), head_perm.to(mixer.D.device)
    bc = torch.arange(2 * di, di + cfg.conv_dim, device=perm.device)
    _rows(mixer.in_proj, torch.cat([perm, di + perm, bc, di + cfg.conv_dim + head_perm]))
    conv_index = torch.cat([perm, torch.arange(di, cfg.conv_dim, device=perm.device)])
    mixer.conv1d.weight.copy_(mixer.conv1d.weight[conv_index])
    if mixer.conv1d.bias is not None:
        mixer.conv1d.bias.copy_(mixer.conv1d.bias[conv_index])
    for name in ("A_log", "D", "dt_bias"):
        p = getattr(mixer, name)
        p.copy_(p[head_perm])
    mixer.norm.weight.copy_(mixer.norm.weight[perm])
    w = mixer.out_proj.weight.double()
    if mixer.hadamard:  # out_proj holds W Hᵀ: undo the fold, permute W's columns, fold again
        h = hadamard_matrix(di, torch.float64, normalized=True).to(w.device)
        w = (w @ h)[:, perm] @ h.T
    else:
        w = w[:, perm]
    mixer.out_proj.weight.copy_(w.float())
    mixer.channel_perm.copy_(mixer.channel_perm[perm])
    mixer.cluster_labels = labels
