"""`edgessm report`: every recipe scored on the same text, SQNR per layer, ranges before/after Hadamard."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

import edgessm
from edgessm.cli import main
from edgessm.ops.hadamard import hadamard_transform
from edgessm.quant.compare import out_proj_input_ranges
from tests.conftest import ALL_CONFIGS

TEXT = "import os\nfor name in os.listdir('.'):\n    print(name.upper())\n" * 30


def test_report_cli_writes_json_markdown_and_png(hf_checkpoint, tmp_path) -> None:
    _, path = hf_checkpoint("mamba1", vocab_size=256, **ALL_CONFIGS["m1-default"][1])
    (tmp_path / "heldout.txt").write_text(TEXT)
    (tmp_path / "calib.txt").write_text(TEXT[::-1])
    out = tmp_path / "report"
    r = CliRunner().invoke(main, ["report", str(path), "-o", str(out), "--data", str(tmp_path / "heldout.txt"),
                                  "--calib", str(tmp_path / "calib.txt"), "--recipes", "w8a8-naive,w8a8",
                                  "--num-samples", "4", "--seq-len", "32", "--window", "64"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert [row["recipe"] for row in report["perplexity"]] == ["fp32", "w8a8-naive", "w8a8"]
    assert all(row["perplexity"] > 1 for row in report["perplexity"])
    assert len(report["layers"]["w8a8"]) == len(report["out_proj_input_ranges"]) == 2
    assert (out / "ranges.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "w8a8" / "quant_config.json").is_file()
    assert "| w8a8 |" in (out / "report.md").read_text()


def test_ranges_are_measured_on_the_out_proj_input(hf_checkpoint) -> None:
    _, path = hf_checkpoint("mamba2", **ALL_CONFIGS["m2-g1-h16"][1])
    model = edgessm.load_model(path)
    tokens = torch.randint(0, 97, (2, 12))
    seen = []
    model.mixers[1].out_proj.register_forward_hook(lambda m, inp, out: seen.append(inp[0].flatten(0, -2)))
    rows = out_proj_input_ranges(model, tokens)
    x = seen[0].double()
    assert abs(rows[1]["absmax"] - x.abs().max().item()) < 1e-9
    assert abs(rows[1]["absmax_rotated"] - hadamard_transform(x).abs().max().item()) < 1e-9
    # the rotation is orthonormal: RMS is unchanged
    assert abs(rows[1]["rms_rotated"] - rows[1]["rms"]) < 1e-6 * rows[1]["rms"]
    assert all(not m.site_fns for m in model.mixers)  # hooks removed afterwards
