"""`edgessm eval` / `edgessm bench` on the torch backend (ORT / TensorRT are covered by their own tests)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import edgessm
from edgessm.cli import main
from edgessm.runtime.backend import TorchBackend
from edgessm.runtime.evaluate import evaluate_tokens, windows_of
from tests.conftest import ALL_CONFIGS

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int\n    y: int\n" * 6


@pytest.mark.parametrize("name", ["m1-default", "m2-g1-h16"])
def test_perplexity_equals_transformers_loss(name: str, hf_checkpoint) -> None:
    arch, kwargs = ALL_CONFIGS[name]
    hf, path = hf_checkpoint(arch, vocab_size=256, **kwargs)
    tokens = np.frombuffer(TEXT.encode(), dtype=np.uint8).astype(np.int64)
    result = evaluate_tokens(TorchBackend(edgessm.load_model(path)), tokens, window=64, batch=3)
    wins = torch.from_numpy(windows_of(tokens, 64))
    with torch.no_grad():
        hf_loss = hf(wins, labels=wins).loss.item()  # mean NLL over the same predicted positions
    assert result.windows == len(TEXT) // 64 and result.tokens == result.windows * 63
    assert abs(result.nll - hf_loss) < 1e-5 * max(1.0, hf_loss)
    assert 0.0 <= result.accuracy <= 1.0


def test_eval_and_bench_cli(hf_checkpoint, tmp_path) -> None:
    _, path = hf_checkpoint("mamba1", vocab_size=256, **ALL_CONFIGS["m1-default"][1])
    data = tmp_path / "heldout.txt"
    data.write_text(TEXT)
    out = tmp_path / "eval.json"
    r = CliRunner().invoke(main, ["eval", str(path), "--data", str(data), "--window", "32", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "perplexity" in r.output
    record = json.loads(out.read_text())
    assert record["backend"] == "torch" and record["windows"] == len(TEXT) // 32 and record["perplexity"] > 1.0
    bench_json = tmp_path / "bench.json"
    r = CliRunner().invoke(main, ["bench", str(path), "--prompt-len", "16", "--new-tokens", "4", "--json", str(bench_json)])
    assert r.exit_code == 0, r.output
    b = json.loads(bench_json.read_text())
    assert b["prefill_tokens_per_s"] > 0 and b["decode_ms_per_token"] > 0 and b["peak_rss_mib"] > 0
    assert "decode_ms_per_token" in r.output


def test_eval_rejects_text_shorter_than_a_window(hf_checkpoint, tmp_path) -> None:
    _, path = hf_checkpoint("mamba1", vocab_size=256, **ALL_CONFIGS["m1-default"][1])
    (tmp_path / "short.txt").write_text("tiny")
    r = CliRunner().invoke(main, ["eval", str(path), "--data", str(tmp_path / "short.txt")])
    assert r.exit_code == 1 and "fewer than one window of 256" in r.output and "Traceback" not in r.output


def test_eval_and_bench_on_onnx_runtime_match_torch(hf_checkpoint, tmp_path) -> None:
    """The same commands on an ONNX export (ORT backend, picked automatically) give torch's perplexity."""
    from edgessm.export import export_onnx

    _, path = hf_checkpoint("mamba2", vocab_size=256, **ALL_CONFIGS["m2-g1-h16"][1])
    onnx_dir = tmp_path / "onnx"
    export_onnx(path, onnx_dir, scan="portable")
    data = tmp_path / "heldout.txt"
    data.write_text(TEXT)
    results = {}
    for name, target in (("torch", path), ("ort", onnx_dir)):
        out = tmp_path / f"{name}.json"
        r = CliRunner().invoke(main, ["eval", str(target), "--data", str(data), "--window", "32", "--json", str(out)])
        assert r.exit_code == 0, r.output
        results[name] = json.loads(out.read_text())
    assert results["ort"]["backend"] == "ort"
    assert abs(results["ort"]["nll"] - results["torch"]["nll"]) < 1e-5
    r = CliRunner().invoke(main, ["bench", str(onnx_dir), "--prompt-len", "8", "--new-tokens", "3"])
    assert r.exit_code == 0, r.output
    assert " ort " in r.output or "ort" in r.output.splitlines()[2]
