"""Tokenizers: a model's own ``tokenizer.json`` (through the ``tokenizers`` library) or raw bytes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from edgessm.errors import ConfigError

log = logging.getLogger(__name__)


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """Token id = UTF-8 byte value (the shipped example models are trained this way)."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, file: Path) -> None:
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(file))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def load_tokenizer(model_dir: str | Path | None, vocab_size: int) -> Tokenizer:
    """The model's tokenizer.json when present, else bytes (which need ``vocab_size >= 256``)."""
    if model_dir is not None:
        file = Path(model_dir) / "tokenizer.json"
        if file.is_file():
            try:
                return HFTokenizer(file)
            except ImportError:
                log.warning("%s exists but the 'tokenizers' package is missing: using bytes", file)
    if vocab_size < ByteTokenizer.vocab_size:
        raise ConfigError(
            f"{model_dir}: no tokenizer.json and vocab_size={vocab_size} < 256, so byte-level tokens do not fit; "
            "add the model's tokenizer.json or pass token ids"
        )
    return ByteTokenizer()
