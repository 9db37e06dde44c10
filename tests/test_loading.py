"""Checkpoint loading: both layouts, sharding, and clear errors for every kind of bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import edgessm
from edgessm.errors import CheckpointError, ConfigError
from edgessm.models.loading import random_model
from tests.conftest import ALL_CONFIGS, rel_err


def _logits(model, tokens):
    with torch.no_grad():
        out = model(tokens)
    return out.logits if hasattr(out, "logits") else out[0]


def _to_mamba_ssm(hf, path: Path, arch: str) -> Path:
    """Write the original state-spaces/mamba layout: d_model/n_layer/ssm_cfg config + pytorch_model.bin."""
    c = hf.config
    ssm_cfg = {"d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand, "conv_bias": c.use_conv_bias,
               "bias": c.use_bias}
    if arch == "mamba1":
        ssm_cfg |= {"layer": "Mamba1", "dt_rank": c.time_step_rank}
    else:
        ssm_cfg |= {"layer": "Mamba2", "headdim": c.head_dim, "ngroups": c.n_groups, "chunk_size": c.chunk_size}
    config = {"d_model": c.hidden_size, "n_layer": c.num_hidden_layers, "vocab_size": c.vocab_size - 4,
              "pad_vocab_size_multiple": 8, "ssm_cfg": ssm_cfg, "rms_norm": True, "residual_in_fp32": True,
              "fused_add_norm": True, "tie_embeddings": c.tie_word_embeddings}
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    torch.save(state, path / "pytorch_model.bin")
    return path


@pytest.mark.parametrize("name", ["m1-default", "m1-odd", "m2-g2-h32"])
def test_mamba_ssm_layout_loads_to_same_logits(name: str, hf_checkpoint, tmp_path: Path) -> None:
    arch, kwargs = ALL_CONFIGS[name]
    hf, _ = hf_checkpoint(arch, vocab_size=104, **kwargs)
    model = edgessm.load_model(_to_mamba_ssm(hf, tmp_path / "orig", arch))
    assert model.config.vocab_size == 104  # 100 padded to a multiple of 8
    tokens = torch.randint(0, 100, (2, 11))
    assert rel_err(_logits(model, tokens), _logits(hf, tokens)) < 1e-4


def test_sharded_safetensors(tmp_path: Path) -> None:
    from tests.conftest import build_hf_model

    hf = build_hf_model("mamba1", **ALL_CONFIGS["m1-default"][1])
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model = edgessm.load_model(tmp_path / "sharded")
    tokens = torch.randint(0, 97, (1, 9))
    assert rel_err(_logits(model, tokens), _logits(hf, tokens)) < 1e-4


def test_save_model_round_trip_is_exact_and_atomic(tmp_path: Path) -> None:
    cfg = edgessm.MambaConfig(arch="mamba2", vocab_size=50, d_model=32, n_layer=2, d_state=8, head_dim=16, n_groups=2,
                              chunk_size=8, tie_embeddings=False)
    model = random_model(cfg, seed=3)
    edgessm.save_model(model, tmp_path / "saved")
    edgessm.save_model(model, tmp_path / "saved")  # overwriting an existing directory works
    assert sorted(os.listdir(tmp_path)) == ["saved"]  # no temporary leftovers
    tokens = torch.randint(0, 50, (2, 10))
    assert torch.equal(_logits(edgessm.load_model(tmp_path / "saved"), tokens), _logits(model, tokens))
    # and transformers reads what we wrote
    from transformers import Mamba2ForCausalLM

    hf = Mamba2ForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert rel_err(_logits(hf, tokens), _logits(model, tokens)) < 1e-4


@pytest.fixture
def checkpoint(hf_checkpoint) -> Path:
    return hf_checkpoint("mamba1", **ALL_CONFIGS["m1-default"][1])[1]


def test_truncated_safetensors_is_a_clear_error(checkpoint: Path) -> None:
    file = checkpoint / "model.safetensors"
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        edgessm.load_model(checkpoint)


def test_garbage_safetensors_is_a_clear_error(checkpoint: Path) -> None:
    (checkpoint / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        edgessm.load_model(checkpoint)


def test_missing_config_key(checkpoint: Path) -> None:
    cfg = json.loads((checkpoint / "config.json").read_text())
    del cfg["hidden_size"]
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config.json: missing required config key 'hidden_size'"):
        edgessm.load_model(checkpoint)


def test_unsupported_config(checkpoint: Path) -> None:
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="hidden_act 'gelu' is not supported"):
        edgessm.load_model(checkpoint)


def test_no_weights(checkpoint: Path) -> None:
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        edgessm.load_model(checkpoint)


class Payload:
    """Unpickling this would call os.system: torch.load(weights_only=True) must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/edgessm_pwned",))


def test_malicious_pickle_is_refused(tmp_path: Path, checkpoint: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    (bad / "model.safetensors").unlink()
    torch.save({"backbone.embeddings.weight": Payload()}, bad / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: refused to load"):
        edgessm.load_model(bad)
    assert not Path("/tmp/edgessm_pwned").exists()


def _edit_weights(checkpoint: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    file = checkpoint / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def test_unknown_missing_and_misshapen_tensors_are_named(checkpoint: Path) -> None:
    _edit_weights(checkpoint, lambda t: t.__setitem__("backbone.layers.0.mixer.extra", torch.zeros(1)))
    with pytest.raises(CheckpointError, match=r"model.safetensors: unexpected tensors \['backbone.layers.0.mixer.extra'\]"):
        edgessm.load_model(checkpoint)
    _edit_weights(checkpoint, lambda t: (t.pop("backbone.layers.0.mixer.extra"), t.pop("backbone.layers.1.mixer.D")))
    with pytest.raises(CheckpointError, match=r"missing tensors \['backbone.layers.1.mixer.D'\]"):
        edgessm.load_model(checkpoint)
    _edit_weights(checkpoint, lambda t: t.__setitem__("backbone.layers.1.mixer.D", torch.zeros(7)))
    with pytest.raises(CheckpointError, match=r"tensor backbone.layers.1.mixer.D has shape \(7,\), expected \(128,\)"):
        edgessm.load_model(checkpoint)


def test_untied_head_that_differs_from_embeddings_is_refused(checkpoint: Path) -> None:
    _edit_weights(checkpoint, lambda t: t.__setitem__("lm_head.weight", torch.randn_like(t["backbone.embeddings.weight"])))
    with pytest.raises(CheckpointError, match="lm_head.weight differs from backbone.embeddings.weight"):
        edgessm.load_model(checkpoint)


def test_artifacts_get_ordinary_permissions(tmp_path: Path) -> None:
    from edgessm.io import atomic_write_text

    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        model = random_model(edgessm.MambaConfig(arch="mamba1", vocab_size=10, d_model=8, n_layer=1, d_state=2))
        edgessm.save_model(model, tmp_path / "m")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "m" / "model.safetensors").stat().st_mode & 0o777 == 0o644
