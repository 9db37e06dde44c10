"""Load Mamba checkpoints (Hugging Face or mamba_ssm layout) into MambaLM, and save HF-format ones."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from edgessm.config import MambaConfig, load_config
from edgessm.errors import CheckpointError
from edgessm.io import atomic_directory, atomic_write_text, load_safetensors, load_torch_weights
from edgessm.models.lm import MambaLM

log = logging.getLogger(__name__)

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _read_file(file: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(file) if file.suffix == ".safetensors" else load_torch_weights(file)


def read_state_dict(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of a checkpoint directory, and the file each came from (for error messages)."""
    for name in _INDEXES:
        index_file = directory / name
        if index_file.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_file}: not a valid shard index ({e})") from e
            tensors: dict[str, torch.Tensor] = {}
            origin: dict[str, Path] = {}
            for shard in sorted(set(weight_map.values())):
                shard_file = directory / shard
                if not shard_file.is_file():
                    raise CheckpointError(f"{index_file}: shard {shard} is listed but {shard_file} does not exist")
                for key, value in _read_file(shard_file).items():
                    tensors[key] = value
                    origin[key] = shard_file
            missing = sorted(set(weight_map) - set(tensors))
            if missing:
                raise CheckpointError(f"{index_file}: tensors listed in the index but absent from the shards: {missing[:5]}")
            return tensors, origin
    for name in _WEIGHT_FILES:
        file = directory / name
        if file.is_file():
            tensors = _read_file(file)
            return tensors, {k: file for k in tensors}
    raise CheckpointError(f"{directory}: no weights found (looked for {', '.join(_WEIGHT_FILES + _INDEXES)})")


def _hf_key(key: str) -> str:
    """mamba_ssm names its embedding ``backbone.embedding``; HF (and edgessm) ``backbone.embeddings``."""
    prefix = "backbone.embedding."
    return "backbone.embeddings." + key[len(prefix) :] if key.startswith(prefix) else key


def _check_and_load(model: MambaLM, tensors: dict[str, torch.Tensor], origin: dict[str, Path], where: Path) -> None:
    expected = model.state_dict()
    tied = model.config.tie_embeddings
    if tied and "lm_head.weight" in tensors:
        head, emb = tensors.pop("lm_head.weight"), tensors.get("backbone.embeddings.weight")
        if emb is not None and (head.shape != emb.shape or not torch.equal(head, emb)):
            raise CheckpointError(
                f"{origin.get('lm_head.weight', where)}: lm_head.weight differs from backbone.embeddings.weight "
                "but the config ties them (tie_word_embeddings / tie_embeddings)"
            )
    if tied:
        expected.pop("lm_head.weight")
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise CheckpointError(f"{origin[unknown[0]]}: unexpected tensors {unknown[:8]} (not part of a {model.config.arch} model)")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{where}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    for key, ref in expected.items():
        got = tensors[key]
        if got.shape != ref.shape:
            raise CheckpointError(
                f"{origin[key]}: tensor {key} has shape {tuple(got.shape)}, expected {tuple(ref.shape)} from config.json"
            )
        if not got.is_floating_point():
            raise CheckpointError(f"{origin[key]}: tensor {key} has dtype {got.dtype}, expected a float tensor")
    model.load_state_dict(tensors, strict=False)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> MambaLM:
    """Load a Hugging Face (MambaForCausalLM / Mamba2ForCausalLM) or mamba_ssm checkpoint directory."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected a checkpoint with config.json and weights)")
    config = load_config(directory)
    tensors, origin = read_state_dict(directory)
    tensors = {_hf_key(k): v for k, v in tensors.items()}
    origin = {_hf_key(k): v for k, v in origin.items()}
    with torch.device("meta"):
        model = MambaLM(config)
    model = model.to_empty(device="cpu")
    _check_and_load(model, {k: v.float() for k, v in tensors.items()}, origin, directory)
    if config.tie_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    log.info("loaded %s %s (%d layers, %.1fM parameters)", config.arch, directory, config.n_layer, model.num_parameters() / 1e6)
    return model.to(device=device, dtype=dtype).eval()


def save_model(model: MambaLM, path: str | Path) -> None:
    """Write a Hugging Face-format checkpoint (config.json + model.safetensors) atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    with atomic_directory(path) as tmp:
        atomic_write_text(tmp / "config.json", json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})


def random_model(config: MambaConfig, seed: int = 0) -> MambaLM:
    """A randomly initialised model (for tests and benchmarks that need no trained weights)."""
    torch.manual_seed(seed)
    model = MambaLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log") or name.endswith(".D") or "norm" in name:
                continue
            p.normal_(0.0, 0.02 if p.dim() > 1 else 0.1)
    return model.eval()
