"""The CLI commands of the foundation, through click's runner (same code path as the console script)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import edgessm
from edgessm.cli import main
from edgessm.runtime.backend import TorchBackend
from edgessm.runtime.generation import generate
from edgessm.runtime.tokenizer import ByteTokenizer
from tests.conftest import ALL_CONFIGS


@pytest.mark.parametrize("name", sorted(ALL_CONFIGS))
def test_info_counts_parameters_exactly(name: str, hf_checkpoint) -> None:
    arch, kwargs = ALL_CONFIGS[name]
    hf, path = hf_checkpoint(arch, **kwargs)
    result = CliRunner().invoke(main, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["arch"] == arch
    assert data["parameters"] == edgessm.load_model(path).num_parameters() == hf.num_parameters()
    assert data["weight_mib_int4"] < data["weight_mib_int8"] < data["weight_mib_fp16"]


def test_info_table(hf_checkpoint) -> None:
    _, path = hf_checkpoint("mamba2", **ALL_CONFIGS["m2-g2-h32"][1])
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 0
    assert "mamba2" in result.output and "n_groups" in result.output


def test_generate_cli_matches_library(hf_checkpoint) -> None:
    _, path = hf_checkpoint("mamba1", vocab_size=256, **ALL_CONFIGS["m1-default"][1])
    result = CliRunner().invoke(main, ["generate", str(path), "--prompt", "def f(", "--max-new-tokens", "10"])
    assert result.exit_code == 0, result.output
    tok = ByteTokenizer()
    expected = generate(TorchBackend(edgessm.load_model(path)), np.array([tok.encode("def f(")]), 10)
    assert result.stdout.splitlines()[0] == tok.decode(expected.tokens[0].tolist()).splitlines()[0]
    assert "ms/token" in result.stderr


def test_generate_on_small_vocab_without_tokenizer_says_why(hf_checkpoint) -> None:
    _, path = hf_checkpoint("mamba1", **ALL_CONFIGS["m1-default"][1])  # vocab 97
    result = CliRunner().invoke(main, ["generate", str(path), "--prompt", "x"])
    assert result.exit_code == 1
    assert "no tokenizer.json and vocab_size=97 < 256" in result.output


def test_cli_reports_bad_checkpoints_without_traceback(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    result = CliRunner().invoke(main, ["info", str(tmp_path)])
    assert result.exit_code == 1
    assert "config.json: not valid JSON" in result.output and "Traceback" not in result.output


def test_build_without_tensorrt_says_what_to_install(tmp_path) -> None:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here; the missing-TensorRT message cannot be shown")
    result = CliRunner().invoke(main, ["build", str(tmp_path), "-o", str(tmp_path / "engine")])
    assert result.exit_code == 1
    assert "pip install tensorrt" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "engine").exists()
