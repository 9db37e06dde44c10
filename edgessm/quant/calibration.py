"""Calibration / evaluation text: reading files, tokenizing, cutting fixed-length samples."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from edgessm.errors import ConfigError
from edgessm.runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_CALIBRATION = Path(__file__).resolve().parents[2] / "calibration" / "default.txt"


@dataclass(frozen=True)
class TextSource:
    texts: list[str]
    sha256: str  # of the raw bytes of every file read, in reading order
    description: str


def _read_jsonl(file: Path) -> list[str]:
    texts = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}:{n}: not valid JSON ({e})") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ConfigError(f"{file}:{n}: expected a JSON object with a string field \"text\"")
        texts.append(obj["text"])
    return texts


def read_texts(path: str | Path | None) -> TextSource:
    """A text file, a .jsonl file (field "text"), or a directory of such files (sorted, recursive)."""
    if path is None:
        if not DEFAULT_CALIBRATION.is_file():
            raise ConfigError(
                f"no calibration data: the default {DEFAULT_CALIBRATION} does not exist; pass --calib FILE|DIR|JSONL"
            )
        path = DEFAULT_CALIBRATION
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    elif path.is_file():
        files = [path]
    else:
        raise ConfigError(f"{path}: calibration/evaluation data not found (expected a file or a directory)")
    if not files:
        raise ConfigError(f"{path}: directory holds no files")
    digest = hashlib.sha256()
    texts: list[str] = []
    for f in files:
        raw = f.read_bytes()
        digest.update(raw)
        if f.suffix in (".jsonl", ".json"):
            texts.extend(_read_jsonl(f))
        else:
            try:
                texts.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ConfigError(f"{f}: not UTF-8 text ({e})") from e
    return TextSource(texts, digest.hexdigest(), str(path))


def token_stream(texts: list[str], tokenizer: Tokenizer) -> torch.Tensor:
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer.encode(t))
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(stream: torch.Tensor, num_samples: int, seq_len: int) -> torch.Tensor:
    """``num_samples`` windows of ``seq_len`` tokens spread evenly over the stream → [N, seq_len].

    Fewer windows (with a warning) when the stream is too short for that many distinct ones.
    """
    if seq_len < 1 or num_samples < 1:
        raise ConfigError(f"num_samples ({num_samples}) and seq_len ({seq_len}) must be positive")
    if stream.numel() < seq_len:
        raise ConfigError(f"calibration data has {stream.numel()} tokens, fewer than one sample of seq_len={seq_len}")
    available = stream.numel() // seq_len
    if available < num_samples:
        log.warning("calibration data holds %d windows of %d tokens; using %d instead of %d", available, seq_len, available, num_samples)
        num_samples = available
    starts = torch.linspace(0, stream.numel() - seq_len, num_samples).round().long()
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
