"""ONNX export: graphs pass the checker and strict shape inference, bytes are deterministic,
weights go to shared external data, the manifest describes the graphs, portable graphs use
standard ops only, and plugin graphs use the op contract's names and input counts."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

import edgessm
from edgessm.cli import main
from edgessm.errors import ConfigError
from edgessm.export import export_onnx, model_hash
from edgessm.export.builder import DOMAIN
from edgessm.export.onnx_export import WEIGHTS_FILE
from edgessm.export.schemas import OP_SPECS, register_schemas
from edgessm.models.loading import random_model
from tests.conftest import ALL_CONFIGS

CONFIGS = ["m1-odd", "m2-g2-h32"]


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.conftest import save_hf_model

    root = tmp_path_factory.mktemp("ckpt")
    return {name: save_hf_model(root, ALL_CONFIGS[name][0], name=name, **ALL_CONFIGS[name][1])[1] for name in CONFIGS}


@pytest.mark.parametrize("scan", ["plugin", "portable"])
@pytest.mark.parametrize("name", CONFIGS)
def test_graphs_pass_checker_and_strict_shape_inference(name: str, scan: str, checkpoints, tmp_path: Path) -> None:
    export_onnx(checkpoints[name], tmp_path / "o", scan=scan, external_data_threshold=0)
    register_schemas()
    for kind in ("prefill", "decode"):
        path = tmp_path / "o" / f"{kind}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))  # with its external weights
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
        logits = next(o for o in inferred.graph.output if o.name == "logits")
        assert logits.type.tensor_type.shape.dim[-1].dim_value == ALL_CONFIGS[name][1].get("vocab_size", 97)
        domains = {n.domain for n in _all_nodes(model.graph)}
        assert (DOMAIN in domains) == (scan == "plugin")


def test_export_is_byte_deterministic(checkpoints, tmp_path: Path) -> None:
    for scan in ("plugin", "portable"):
        a = export_onnx(checkpoints["m2-g2-h32"], tmp_path / f"a-{scan}", scan=scan, external_data_threshold=0)
        b = export_onnx(checkpoints["m2-g2-h32"], tmp_path / f"b-{scan}", scan=scan, external_data_threshold=0)
        assert a.files == b.files and WEIGHTS_FILE in a.files
        for f in a.files:
            assert (a.out_dir / f).read_bytes() == (b.out_dir / f).read_bytes(), f


def test_weights_are_shared_external_data(checkpoints, tmp_path: Path) -> None:
    big = export_onnx(checkpoints["m1-odd"], tmp_path / "ext", external_data_threshold=0)
    small = export_onnx(checkpoints["m1-odd"], tmp_path / "inline", external_data_threshold=1 << 30)
    assert WEIGHTS_FILE in big.files and WEIGHTS_FILE not in small.files
    model = edgessm.load_model(checkpoints["m1-odd"])
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    # each weight stored once although both graphs use it (plus small folded/derived tensors)
    assert (tmp_path / "ext" / WEIGHTS_FILE).stat().st_size < 1.1 * weight_bytes
    for kind in ("prefill", "decode"):
        proto = onnx.load(str(tmp_path / "ext" / f"{kind}.onnx"), load_external_data=False)
        external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert external and all(len(t.raw_data) == 0 for t in external)
        assert all(e.value == WEIGHTS_FILE for t in external for e in t.external_data if e.key == "location")


@pytest.mark.parametrize("scan", ["plugin", "portable"])
def test_manifest_describes_the_export(scan: str, checkpoints, tmp_path: Path) -> None:
    result = export_onnx(checkpoints["m2-g2-h32"], tmp_path / "o", scan=scan, opset=20)
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    model = edgessm.load_model(checkpoints["m2-g2-h32"])
    cfg = model.config
    assert manifest == result.manifest | {"config": manifest["config"]}
    assert manifest["scan"] == scan and manifest["opset"] == 20 and manifest["arch"] == "mamba2"
    assert manifest["source"]["model_sha256"] == model_hash(model)
    assert manifest["edgessm_version"] == edgessm.__version__
    expected_ops = {"CausalConv1d", "CausalConv1dUpdate", "SSDScan", "SSDStateUpdate"} if scan == "plugin" else set()
    assert set(manifest["custom_ops"]) == expected_ops
    assert len(manifest["states"]) == cfg.n_layer
    conv, ssm = cfg.state_shapes(1)
    assert manifest["states"][1]["conv"]["shape"] == ["batch", *conv[1:]]
    assert manifest["states"][1]["ssm"]["shape"] == ["batch", *ssm[1:]]
    decode = manifest["graphs"]["decode"]
    assert [i["name"] for i in decode["inputs"]][:3] == ["token", "conv_state.0", "ssm_state.0"]
    assert decode["inputs"][0] == {"name": "token", "dtype": "int64", "shape": ["batch"]}
    prefill = manifest["graphs"]["prefill"]
    assert prefill["outputs"][0] == {"name": "logits", "dtype": "float", "shape": ["batch", "seq", cfg.vocab_size]}
    for kind in ("prefill", "decode"):
        proto = onnx.load(str(tmp_path / "o" / f"{kind}.onnx"), load_external_data=False)
        assert {o.domain: o.version for o in proto.opset_import}[""] == 20
    assert (tmp_path / "o" / "config.json").is_file()


def test_plugin_nodes_follow_the_op_contract(checkpoints, tmp_path: Path) -> None:
    for name in CONFIGS:
        export_onnx(checkpoints[name], tmp_path / name, scan="plugin")
        for kind in ("prefill", "decode"):
            proto = onnx.load(str(tmp_path / name / f"{kind}.onnx"), load_external_data=False)
            custom = [n for n in proto.graph.node if n.domain == DOMAIN]
            assert custom, (name, kind)
            for node in custom:
                spec = OP_SPECS[node.op_type]
                assert len(node.input) == len(spec.inputs) and len(node.output) == len(spec.outputs)
                assert {a.name for a in node.attribute} <= {a for a, _ in spec.attrs}


def test_random_model_exports_without_checkpoint_dir(tmp_path: Path) -> None:
    cfg = edgessm.MambaConfig(arch="mamba1", vocab_size=50, d_model=16, n_layer=1, d_state=4)
    result = export_onnx(random_model(cfg), tmp_path / "o", graphs=("decode",))
    assert "decode.onnx" in result.files and "prefill.onnx" not in result.files
    assert result.manifest["source"]["path"] is None


@pytest.mark.parametrize("kwargs,match", [
    ({"scan": "fast"}, "scan mode"),
    ({"opset": 13}, "opset 13"),
    ({"graphs": ("prefill", "prefill")}, "graphs"),
    ({"chunk_mamba1": 0}, "chunk_mamba1"),
])
def test_bad_options_are_refused(kwargs, match: str, checkpoints, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=match):
        export_onnx(checkpoints["m1-odd"], tmp_path / "o", **kwargs)
    assert not (tmp_path / "o").exists()


def test_cli_export_and_run(checkpoints, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(main, ["export", str(checkpoints["m1-odd"]), "-o", str(out), "--scan", "portable"])
    assert res.exit_code == 0, res.output
    assert (out / "prefill.onnx").is_file() and (out / "decode.onnx").is_file()
    res = runner.invoke(main, ["run", str(out), "--tokens", "3,1,4,1,5", "--new-tokens", "6",
                               "--compare", str(checkpoints["m1-odd"]), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert len(report["new_tokens"][0]) == 6
    assert report["compare"]["prefill_rel_err"] < 1e-4 and report["compare"]["tokens_equal"]
    assert report["backend"] == "ort" and report["scan"] == "portable"
    # the same command on the float checkpoint runs the torch backend
    res = runner.invoke(main, ["run", str(checkpoints["m1-odd"]), "--tokens", "3,1,4,1,5", "--new-tokens", "6", "--json"])
    assert res.exit_code == 0, res.output
    torch_report = json.loads(res.output)
    assert torch_report["backend"] == "torch" and torch_report["new_tokens"] == report["new_tokens"]
    res = runner.invoke(main, ["export", str(checkpoints["m1-odd"]), "-o", str(out), "--scan", "nope"])
    assert res.exit_code != 0 and "nope" in res.output
