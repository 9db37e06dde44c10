from __future__ import annotations

import pytest

from edgessm.errors import ConfigError
from edgessm.runtime.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


def test_byte_tokenizer_round_trips_utf8() -> None:
    tok = ByteTokenizer()
    text = "naïve café ∑ 🙂"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_tokenizer_json_is_used_when_present(tmp_path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path, vocab_size=3)
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("hello world hello") == [1, 2, 1]
    assert tok.encode("bye") == [0]


def test_small_vocab_without_tokenizer_json_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="vocab_size=100 < 256"):
        load_tokenizer(tmp_path, vocab_size=100)
    assert isinstance(load_tokenizer(tmp_path, vocab_size=256), ByteTokenizer)
