"""Shared fixtures: tiny models built and saved by Hugging Face transformers itself (the oracle)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

logging.getLogger("transformers").setLevel(logging.ERROR)

MAMBA1_CONFIGS: dict[str, dict[str, Any]] = {
    # d_inner 128, defaults otherwise (tied head, conv 4, no proj bias)
    "m1-default": dict(hidden_size=64, num_hidden_layers=2, state_size=16),
    # d_inner = 3 * 40 = 120 (not a power of two), conv kernel 3, untied head, biases, odd dt rank
    "m1-odd": dict(hidden_size=40, expand=3, num_hidden_layers=3, state_size=8, conv_kernel=3,
                   use_bias=True, tie_word_embeddings=False, time_step_rank=5),
    # no conv bias, residual kept in the activation dtype
    "m1-noconvbias": dict(hidden_size=32, num_hidden_layers=2, state_size=4, use_conv_bias=False,
                          residual_in_fp32=False),
}
MAMBA2_CONFIGS: dict[str, dict[str, Any]] = {
    "m2-g1-h16": dict(hidden_size=64, num_heads=8, head_dim=16, n_groups=1, state_size=16, chunk_size=8,
                      num_hidden_layers=2),
    "m2-g2-h32": dict(hidden_size=64, num_heads=4, head_dim=32, n_groups=2, state_size=8, chunk_size=16,
                      num_hidden_layers=2, use_bias=True, tie_word_embeddings=True),
    "m2-dtlimit": dict(hidden_size=32, num_heads=4, head_dim=16, n_groups=2, state_size=8, chunk_size=4,
                       num_hidden_layers=1, conv_kernel=3, time_step_limit=(0.0, 0.05)),
}
ALL_CONFIGS = {**{k: ("mamba1", v) for k, v in MAMBA1_CONFIGS.items()}, **{k: ("mamba2", v) for k, v in MAMBA2_CONFIGS.items()}}


def build_hf_model(arch: str, vocab_size: int = 97, seed: int = 0, **kwargs: Any) -> torch.nn.Module:
    """A randomly initialised transformers model; dt biases and A spread like real checkpoints."""
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    if arch == "mamba1":
        model = MambaForCausalLM(MambaConfig(vocab_size=vocab_size, **kwargs))
    else:
        model = Mamba2ForCausalLM(Mamba2Config(vocab_size=vocab_size, **kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            # HF's init leaves some tensors constant (norm weights, D); perturb them so that a wrong
            # wiring of any parameter shows up in the logits.
            if name.endswith("norm.weight") or name.endswith("norm_f.weight") or name.endswith(".D"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("A_log"):
                p.add_(0.3 * torch.randn_like(p))
            elif p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif name.endswith("bias") and "dt" not in name:
                p.normal_(0.0, 0.05)
    return model.eval()


def save_hf_model(tmp_path: Path, arch: str, name: str = "model", **kwargs: Any) -> tuple[torch.nn.Module, Path]:
    model = build_hf_model(arch, **kwargs)
    out = tmp_path / name
    model.save_pretrained(out)
    return model, out


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    assert torch.isfinite(got).all(), "non-finite values in the result"
    return ((got - ref).norm() / ref.norm()).item()


@pytest.fixture
def hf_checkpoint(tmp_path: Path):
    """Factory: hf_checkpoint(arch, **config) -> (transformers model, saved directory)."""

    def make(arch: str, name: str = "model", **kwargs: Any):
        return save_hf_model(tmp_path, arch, name=name, **kwargs)

    return make
