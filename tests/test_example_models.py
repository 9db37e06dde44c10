"""The trained example models shipped in examples/models/ (see docs/training.md).

Each loads with transformers (the oracle) and with edgessm, its held-out perplexity recomputed
here on the CPU in fp32 matches the number training recorded, and it is far better than the best
unigram byte model. The train-time scans of examples/train_tiny.py are checked against
transformers' own in float64.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import ALL_CONFIGS, build_hf_model, rel_err

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = ROOT / "examples" / "models"
HELDOUT = ROOT / "examples" / "data" / "heldout.txt"
CALIBRATION = ROOT / "calibration" / "default.txt"
SHIPPED = {"mamba1-tiny": "MambaForCausalLM", "mamba2-tiny": "Mamba2ForCausalLM"}
WINDOW = 256  # bytes per window of the held-out protocol
MAX_WEIGHT_BYTES = 12 * 2**20


def _log(name: str) -> dict[str, Any]:
    return json.loads((MODELS_DIR / name / "training_log.json").read_text())


def _windows(n: int) -> torch.Tensor:
    """The first n non-overlapping 256-byte windows of heldout.txt, as token ids (= byte values)."""
    data = HELDOUT.read_bytes()
    assert len(data) >= n * WINDOW, f"{HELDOUT} has {len(data)} bytes, fewer than {n} windows of {WINDOW}"
    return torch.tensor(list(data[: n * WINDOW]), dtype=torch.long).view(n, WINDOW)


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean NLL (nats) of bytes 1..255 of each window given the bytes before them."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1)).item()


def _load_hf(name: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(MODELS_DIR / name, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"{MODELS_DIR / name}: transformers reports {problems}"
    assert type(model).__name__ == SHIPPED[name]
    return model.float().eval()


@pytest.fixture(scope="module", params=sorted(SHIPPED))
def shipped(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module, dict[str, Any], torch.Tensor, torch.Tensor]:
    """(name, transformers model, training log, held-out ids of the CPU-test windows, their fp32 logits)."""
    name = request.param
    log = _log(name)
    ids = _windows(log["heldout_eval"]["cpu_test_windows"])
    model = _load_hf(name)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    assert torch.isfinite(logits).all(), f"{name}: non-finite logits on the held-out windows"
    return name, model, log, ids, logits


def test_checkpoint_files(shipped) -> None:
    name, model, log, _, _ = shipped
    from safetensors import safe_open

    weights = MODELS_DIR / name / "model.safetensors"
    assert weights.stat().st_size <= MAX_WEIGHT_BYTES, f"{weights} is {weights.stat().st_size} bytes"
    with safe_open(str(weights), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert set(dtypes.values()) == {"F32"}, f"{weights}: expected only fp32 tensors, got {sorted(set(dtypes.values()))}"
    cfg = model.config
    assert cfg.vocab_size == 256
    assert cfg.pad_token_id == cfg.bos_token_id == cfg.eos_token_id == 0
    assert sum(p.numel() for p in model.parameters()) == log["n_parameters"]


def test_shipped_texts_are_the_logged_ones(shipped) -> None:
    """heldout.txt and calibration/default.txt are byte-for-byte the texts training held out."""
    _, _, log, _, _ = shipped
    assert hashlib.sha256(HELDOUT.read_bytes()).hexdigest() == log["data"]["heldout_sha256"]
    assert hashlib.sha256(CALIBRATION.read_bytes()).hexdigest() == log["data"]["calibration_sha256"]
    HELDOUT.read_bytes().decode("utf-8")
    CALIBRATION.read_bytes().decode("utf-8")
    reserved = set(log["data"]["heldout_files"]) | set(log["data"]["calibration_files"])
    assert len(reserved) == len(log["data"]["heldout_files"]) + len(log["data"]["calibration_files"])
    manifest = (ROOT / "examples" / "data" / "stdlib_manifest.tsv").read_text()
    assert hashlib.sha256(manifest.encode()).hexdigest() == log["data"]["manifest_sha256"]
    train_files = {line.split("\t")[3] for line in manifest.splitlines() if line.split("\t")[2] == "train"}
    assert not train_files & reserved, f"held-out/calibration files in the training set: {train_files & reserved}"


def test_heldout_perplexity_matches_log(shipped) -> None:
    name, _, log, ids, logits = shipped
    ppl = math.exp(_nll(logits, ids))
    recorded = log["heldout_eval"]["cpu_test_perplexity"]
    assert abs(ppl - recorded) <= 0.01 * recorded, f"{name}: CPU perplexity {ppl:.4f}, training recorded {recorded:.4f}"


def test_far_better_than_unigram(shipped) -> None:
    """Compare with the best unigram model for heldout.txt (its own byte frequencies), on the same bytes."""
    name, _, _, ids, logits = shipped
    counts = torch.bincount(torch.tensor(list(HELDOUT.read_bytes())), minlength=256).double()
    unigram_nll = -(counts / counts.sum()).log()[ids[:, 1:]].mean().item()
    model_ppl, unigram_ppl = math.exp(_nll(logits, ids)), math.exp(unigram_nll)
    assert model_ppl < unigram_ppl / 3, f"{name}: perplexity {model_ppl:.2f} vs unigram {unigram_ppl:.2f}"


def test_edgessm_matches_transformers(shipped) -> None:
    from edgessm.models import load_model

    name, _, _, ids, logits = shipped
    model = load_model(MODELS_DIR / name)
    with torch.no_grad():
        ours, _ = model(ids[:8])  # 8 windows keep the CPU cost down; 2040 scored positions
    assert rel_err(ours, logits[:8]) < 1e-5, f"{name}: edgessm logits differ from transformers'"


def _train_tiny() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "examples" / "train_tiny.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_tiny"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("config_name", sorted(ALL_CONFIGS))
def test_train_time_scan_matches_transformers(config_name: str) -> None:
    """Loss and every gradient through the train-time scan equal transformers' own path (float64 model)."""
    train_tiny = _train_tiny()
    arch, cfg = ALL_CONFIGS[config_name]
    model = build_hf_model(arch, **cfg).double().train()
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(7))

    def loss_and_grads(patched: bool) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        if patched:
            with train_tiny.train_time_scan(arch) as counted:
                loss = model(input_ids=ids, labels=ids).loss
            assert counted.calls == model.config.num_hidden_layers, "train-time scan not on the model's path"
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return loss.detach(), grads

    ref_loss, ref_grads = loss_and_grads(False)
    loss, grads = loss_and_grads(True)
    # transformers' scans compute in float32 internally (.float()), so agreement is at fp32 level
    assert rel_err(loss, ref_loss) < 1e-6
    assert rel_err(grads, ref_grads) < 1e-5
