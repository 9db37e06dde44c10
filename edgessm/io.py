"""Atomic artifact writing and safe weight loading.

Every artifact edgessm writes appears whole or not at all: files go to a temporary sibling and are
renamed into place; directories are assembled under a temporary name and swapped in.
Weights are only read through safetensors or ``torch.load(weights_only=True)``: nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from edgessm.errors import CheckpointError, ConfigError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; artifacts get the permissions an ordinary open() would give them
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _ordinary_permissions(root: Path) -> None:
    """mkdtemp makes 0700 and some writers (safetensors) 0600: give the tree what open()/mkdir() would."""
    mask = _umask()
    root.chmod(0o777 & ~mask)
    for p in root.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` (an old one is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _ordinary_permissions(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e


def load_torch_weights(file: Path) -> dict[str, torch.Tensor]:
    """A PyTorch .bin/.pt state dict, loaded with weights_only=True: never arbitrary pickles."""
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{file}: refused to load: the pickle holds objects other than tensors, which "
            f"torch.load(weights_only=True) will not execute ({str(e).splitlines()[0]}). Convert the "
            "checkpoint to safetensors with a tool you trust."
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable PyTorch checkpoint ({e})") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{file}: expected a flat dict of tensors (a state dict)")
    return obj


def read_json_object(file: Path, missing: str, expected_format: str | None = None) -> dict[str, Any]:
    """A JSON object from ``file``; ``missing`` says what the file's absence means to the user.

    With ``expected_format`` the object's ``"format"`` field must equal it (our own artifacts).
    """
    if not file.is_file():
        raise ConfigError(f"{file}: not found ({missing})")
    try:
        obj = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    if expected_format is not None and obj.get("format") != expected_format:
        raise ConfigError(f"{file}: format {obj.get('format')!r}, this edgessm reads {expected_format!r}")
    return obj
