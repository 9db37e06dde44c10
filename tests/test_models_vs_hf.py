"""edgessm's reference models reproduce Hugging Face transformers' logits on the same weights."""

from __future__ import annotations

import pytest
import torch

import edgessm
from tests.conftest import ALL_CONFIGS, rel_err

LENGTHS = {"mamba1": (1, 13), "mamba2": (1, 21, 37)}  # 21, 37: not multiples of the chunk sizes used


@pytest.mark.parametrize("name", sorted(ALL_CONFIGS))
def test_logits_match_transformers(name: str, hf_checkpoint) -> None:
    arch, kwargs = ALL_CONFIGS[name]
    hf, path = hf_checkpoint(arch, **kwargs)
    model = edgessm.load_model(path)
    assert model.config.arch == arch
    for length in LENGTHS[arch]:
        tokens = torch.randint(0, model.config.vocab_size, (2, length))
        with torch.no_grad():
            ref = hf(tokens).logits
            got, states = model(tokens)
        assert got.shape == ref.shape
        assert rel_err(got, ref) < 1e-4, (name, length)
        assert len(states) == model.config.n_layer


@pytest.mark.parametrize("name", ["m1-default", "m2-g2-h32"])
def test_final_states_match_transformers_cache(name: str, hf_checkpoint) -> None:
    """The prefill's states equal what HF keeps in its cache (HF's conv window holds K inputs, ours the last K-1)."""
    arch, kwargs = ALL_CONFIGS[name]
    hf, path = hf_checkpoint(arch, **kwargs)
    model = edgessm.load_model(path)
    tokens = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        cache = hf(tokens, use_cache=True).cache_params
        _, states = model(tokens)
    for i, st in enumerate(states):
        assert rel_err(st.ssm, cache.get_recurrent_state(i, state_idx=0)) < 1e-5
        assert rel_err(st.conv, cache.get_conv_state(i, state_idx=0)[..., 1:]) < 1e-6
