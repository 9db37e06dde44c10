"""Prefill + recurrent decode equals the full forward; greedy generation equals transformers'."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import edgessm
from edgessm.runtime.backend import TorchBackend
from edgessm.runtime.generation import Sampling, generate, sample_next
from tests.conftest import ALL_CONFIGS, rel_err


@pytest.mark.parametrize("name", ["m1-default", "m1-odd", "m2-g1-h16", "m2-g2-h32", "m2-dtlimit"])
def test_prefill_then_decode_equals_full_forward(name: str, hf_checkpoint) -> None:
    arch, kwargs = ALL_CONFIGS[name]
    _, path = hf_checkpoint(arch, **kwargs)
    model = edgessm.load_model(path)
    tokens = torch.randint(0, model.config.vocab_size, (2, 23))
    full, _ = model(tokens)
    for k in (1, 5, 17):
        logits, states = model.prefill(tokens[:, :k])
        assert rel_err(logits, full[:, :k]) < 1e-5
        for t in range(k, tokens.shape[1]):
            step_logits, states = model.step(tokens[:, t], states)
            assert rel_err(step_logits, full[:, t]) < 1e-5, (k, t)


def test_chunked_continuation_equals_full_forward(hf_checkpoint) -> None:
    """Feeding a long prompt in pieces (prefill, then multi-token continuations) is exact too."""
    arch, kwargs = ALL_CONFIGS["m2-g2-h32"]
    _, path = hf_checkpoint(arch, **kwargs)
    model = edgessm.load_model(path)
    tokens = torch.randint(0, 97, (1, 40))
    full, _ = model(tokens)
    a, states = model(tokens[:, :13])
    b, _ = model(tokens[:, 13:], states)
    assert rel_err(torch.cat([a, b], 1), full) < 1e-5


@pytest.mark.parametrize("name", ["m1-default", "m2-g2-h32"])
def test_greedy_generate_equals_transformers(name: str, hf_checkpoint) -> None:
    arch, kwargs = ALL_CONFIGS[name]
    hf, path = hf_checkpoint(arch, **kwargs)
    prompt = torch.randint(1, 97, (1, 7))
    new = 24
    ref = hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    got = generate(TorchBackend(edgessm.load_model(path)), prompt.numpy(), new)
    assert got.tokens.shape == tuple(ref.shape)
    np.testing.assert_array_equal(got.tokens, ref.numpy())


def test_sampling_filters() -> None:
    rng = np.random.default_rng(0)
    logits = np.array([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    greedy = sample_next(logits, Sampling(), rng)
    np.testing.assert_array_equal(greedy, [1, 0])
    # top-k 1 and a tiny top-p both reduce sampling to the argmax
    for s in (Sampling(temperature=1.0, top_k=1), Sampling(temperature=2.0, top_p=1e-6)):
        for _ in range(20):
            np.testing.assert_array_equal(sample_next(logits, s, rng), greedy)
    # top-k 2 never yields tokens outside the two best of row 0
    draws = {int(sample_next(logits, Sampling(temperature=5.0, top_k=2), rng)[0]) for _ in range(200)}
    assert draws == {1, 3}


def test_sampling_is_reproducible_with_a_seed(hf_checkpoint) -> None:
    _, path = hf_checkpoint("mamba1", **ALL_CONFIGS["m1-default"][1])
    backend = TorchBackend(edgessm.load_model(path))
    prompt = np.array([[3, 4, 5]])
    runs = [generate(backend, prompt, 12, Sampling(temperature=1.0, top_p=0.9, seed=7)).tokens for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])
    other = generate(backend, prompt, 12, Sampling(temperature=1.0, top_p=0.9, seed=8)).tokens
    assert not np.array_equal(runs[0], other)


def test_generation_stops_at_eos() -> None:
    class Fixed:
        name, config = "fixed", None

        def prefill(self, tokens):
            return np.eye(5, dtype=np.float32)[[2]][None].repeat(tokens.shape[0], 0), 0

        def step(self, token, states):
            return np.eye(5, dtype=np.float32)[[4]].repeat(token.shape[0], 0), states + 1

    out = generate(Fixed(), np.array([[1, 1]]), 10, eos_token_id=4)
    np.testing.assert_array_equal(out.new_tokens, [[2, 4]])


def test_invalid_sampling_arguments() -> None:
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1)
