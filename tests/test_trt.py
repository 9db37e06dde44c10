"""TensorRT side: the clear error without TensorRT, plugin-library lookup, engine metadata and
profile logic, and the plugin sources compiled against TensorRT's headers.

What needs TensorRT itself (engine build, TrtBackend) is skipped here unless `tensorrt` is
importable; CI has neither TensorRT nor its headers (it cannot fetch them), so there the
header-compile tests skip with that reason too. The plugins' device execution is checked by
plugins/trt/run_harness.sh on a GPU (docs/tensorrt.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgessm import build
from edgessm.build import EngineShapes, GraphInfo, Range, choose_precision, inspect_graph, profile_for
from edgessm.errors import BackendUnavailable, ConfigError
from edgessm.runtime import trt as trt_rt

REPO = Path(__file__).resolve().parents[1]
TRT_INCLUDE = Path(os.environ.get("TensorRT_ROOT", REPO / "third_party" / "TensorRT")) / "include"
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
NO_HEADERS = (
    f"TensorRT headers not found in {TRT_INCLUDE} (they are not redistributed; CI cannot fetch them): "
    "see docs/tensorrt.md to put them there"
)


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `import tensorrt` fail as on a machine without it (None in sys.modules blocks the import)."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


# ---- without TensorRT: one clear error from every entry point -------------------------------


def test_require_tensorrt_says_what_to_install(no_tensorrt: None) -> None:
    with pytest.raises(BackendUnavailable, match="pip install tensorrt") as e:
        trt_rt.require_tensorrt()
    assert "JetPack 6" in str(e.value)


def test_build_engine_without_tensorrt(no_tensorrt: None, tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="pip install tensorrt"):
        build.build_engine(tmp_path, tmp_path / "engines")
    assert not (tmp_path / "engines").exists()


def test_backend_without_tensorrt(no_tensorrt: None, tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="pip install tensorrt"):
        trt_rt.TrtBackend(tmp_path)


def test_open_backend_routes_engine_dirs_to_tensorrt(no_tensorrt: None, tmp_path: Path) -> None:
    from edgessm.runtime import detect_backend, open_backend

    (tmp_path / trt_rt.METADATA_FILE).write_text("{}")
    assert detect_backend(tmp_path) == "trt"
    with pytest.raises(BackendUnavailable, match="TensorRT >= 10.3"):
        open_backend(tmp_path)


# ---- plugin library lookup ------------------------------------------------------------------


def _lib(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF not really")
    return path


def test_locate_plugin_explicit_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lib = _lib(tmp_path / "a" / trt_rt.PLUGIN_LIBRARY)
    env_lib = _lib(tmp_path / "b" / trt_rt.PLUGIN_LIBRARY)
    monkeypatch.setenv(trt_rt.PLUGIN_ENV, str(env_lib))
    assert trt_rt.locate_plugin(lib) == lib.resolve()  # explicit beats the environment
    assert trt_rt.locate_plugin() == env_lib.resolve()
    with pytest.raises(BackendUnavailable, match="plugin_path=.*missing.so: no such file"):
        trt_rt.locate_plugin(tmp_path / "missing.so")
    monkeypatch.setenv(trt_rt.PLUGIN_ENV, str(tmp_path / "gone.so"))
    with pytest.raises(BackendUnavailable, match=f"{trt_rt.PLUGIN_ENV}=.*gone.so: no such file"):
        trt_rt.locate_plugin()


def test_locate_plugin_searches_builds_newest_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(trt_rt.PLUGIN_ENV, raising=False)
    monkeypatch.setattr(trt_rt, "_REPO_ROOT", tmp_path)
    old = _lib(tmp_path / "plugins" / "build-old" / "trt" / trt_rt.PLUGIN_LIBRARY)
    new = _lib(tmp_path / "plugins" / "build" / "trt" / trt_rt.PLUGIN_LIBRARY)
    os.utime(old, (time.time() - 100, time.time() - 100))
    assert trt_rt.locate_plugin() == new.resolve()
    new.unlink()
    assert trt_rt.locate_plugin() == old.resolve()
    old.unlink()
    other = _lib(tmp_path / "build" / "plugins-trt" / "trt" / trt_rt.PLUGIN_LIBRARY)
    assert trt_rt.locate_plugin() == other.resolve()


def test_locate_plugin_error_lists_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(trt_rt.PLUGIN_ENV, raising=False)
    monkeypatch.setattr(trt_rt, "_REPO_ROOT", tmp_path)
    paths = trt_rt.plugin_search_paths()
    assert paths[-2:] == [Path(trt_rt.__file__).resolve().parents[1] / "lib" / trt_rt.PLUGIN_LIBRARY,
                          Path(trt_rt.__file__).resolve().parents[1] / trt_rt.PLUGIN_LIBRARY]
    if any(p.is_file() for p in paths):
        pytest.skip("a plugin library is installed next to the package")
    with pytest.raises(BackendUnavailable, match="not found.*-DTensorRT_ROOT") as e:
        trt_rt.locate_plugin()
    assert str(paths[-1]) in str(e.value)


# ---- shapes, graphs, precision, metadata ------------------------------------------------------


def test_range_parse_and_validation() -> None:
    assert Range.parse("8") == Range(8, 8, 8)
    assert Range.parse("1:64:512") == Range(1, 64, 512)
    for bad in ("0", "4:2:8", "1:2", "a:b:c", ""):
        with pytest.raises(ConfigError, match="shape range"):
            Range.parse(bad)


def _graph(path: Path, inputs: list[tuple[str, int, list]], nodes: list | None = None, fp16: bool = False) -> Path:
    """A small ONNX graph with the given inputs (name, elem type, dims) and Identity outputs."""
    ins = [helper.make_tensor_value_info(n, t, d) for n, t, d in inputs]
    outs, body = [], list(nodes or [])
    for n, t, d in inputs:
        body.append(helper.make_node("Identity", [n], [f"{n}_out"]))
        outs.append(helper.make_tensor_value_info(f"{n}_out", t, d))
    if fp16:
        outs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["batch", 4]))
        body.append(helper.make_node("Constant", [], ["logits"], value=helper.make_tensor(
            "c", TensorProto.FLOAT16, [1, 4], np.zeros(4, np.float16).tobytes(), raw=True)))
    onnx.save(helper.make_model(helper.make_graph(body, "g", ins, outs)), str(path))
    return path


def test_profile_for_prefill_and_decode(tmp_path: Path) -> None:
    pre = inspect_graph(_graph(tmp_path / "prefill.onnx", [("tokens", TensorProto.INT64, ["batch", "seqlen"])]))
    dec = inspect_graph(_graph(tmp_path / "decode.onnx", [("token", TensorProto.INT64, ["batch"]),
                                                          ("ssm_state.0", TensorProto.FLOAT, ["batch", 8, 16])]))
    shapes = EngineShapes(prefill_batch=Range(1, 2, 4), prefill_len=Range(1, 64, 256), decode_batch=Range(1, 3, 8))
    assert profile_for("prefill", pre.inputs, shapes) == {"tokens": ((1, 1), (2, 64), (4, 256))}
    assert profile_for("decode", dec.inputs, shapes) == {
        "token": ((1,), (3,), (8,)), "ssm_state.0": ((1, 8, 16), (3, 8, 16), (8, 8, 16))}


def test_profile_for_rejects_other_dynamic_dims(tmp_path: Path) -> None:
    dec = inspect_graph(_graph(tmp_path / "decode.onnx", [("ssm_state.3", TensorProto.FLOAT, ["batch", "d", 16])]))
    with pytest.raises(ConfigError, match=r"input 'ssm_state.3' dimension 1 \('d'\) is dynamic"):
        profile_for("decode", dec.inputs, EngineShapes())


def test_inspect_graph_precision(tmp_path: Path) -> None:
    plain = inspect_graph(_graph(tmp_path / "f32.onnx", [("x", TensorProto.FLOAT, [2, 3])]))
    assert not plain.quantized and not plain.float16
    half = inspect_graph(_graph(tmp_path / "f16.onnx", [("x", TensorProto.FLOAT, [2, 3])], fp16=True))
    assert half.float16
    q = helper.make_node("SelectiveScan", ["x"], ["y"], domain="edgessm")
    qn = helper.make_node("QuantSSDScan", ["x"], ["z"], domain="edgessm")
    assert not inspect_graph(_graph(tmp_path / "p.onnx", [("x", TensorProto.FLOAT, [2])], [q])).quantized
    assert inspect_graph(_graph(tmp_path / "q.onnx", [("x", TensorProto.FLOAT, [2])], [qn])).quantized
    with pytest.raises(ConfigError, match="not found"):
        inspect_graph(tmp_path / "nope.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="not a readable ONNX model"):
        inspect_graph(tmp_path / "bad.onnx")


def test_choose_precision() -> None:
    f32, f16 = GraphInfo((), False, False), GraphInfo((), False, True)
    q = GraphInfo((), True, False)
    p = Path("prefill.onnx")
    assert choose_precision(q, p, fp16=True, int8=True, weak_fp16_available=True) == (True, False)
    assert choose_precision(f16, p, fp16=True, int8=False, weak_fp16_available=False) == (True, False)
    assert choose_precision(f32, p, fp16=False, int8=False, weak_fp16_available=True) == (True, False)
    assert choose_precision(f32, p, fp16=True, int8=False, weak_fp16_available=True) == (False, True)
    with pytest.raises(ConfigError, match="strongly typed networks only"):
        choose_precision(f32, p, fp16=True, int8=False, weak_fp16_available=False)
    with pytest.raises(ConfigError, match="--int8 needs a quantized export"):
        choose_precision(f32, p, fp16=True, int8=True, weak_fp16_available=True)


def test_output_dir_guard(tmp_path: Path) -> None:
    build._check_output_dir(tmp_path / "new")  # absent: fine
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "thesis.tex").write_text("x")
    with pytest.raises(ConfigError, match="not an edgessm engine directory"):
        build._check_output_dir(tmp_path / "user")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / trt_rt.METADATA_FILE).write_text("{}")
    build._check_output_dir(tmp_path / "old")  # an earlier engine directory may be replaced


def test_read_metadata(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"engine.json: not found \(not an `edgessm build` engine directory\)"):
        trt_rt.read_metadata(tmp_path)
    (tmp_path / "engine.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        trt_rt.read_metadata(tmp_path)
    (tmp_path / "engine.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ConfigError, match="edgessm-trt/1"):
        trt_rt.read_metadata(tmp_path)
    (tmp_path / "engine.json").write_text(json.dumps({"format": "edgessm-trt/1", "tensorrt_version": "10.3.0"}))
    assert trt_rt.read_metadata(tmp_path)["tensorrt_version"] == "10.3.0"


# ---- plugin sources against TensorRT's headers ------------------------------------------------


def _need_headers() -> None:
    if not (TRT_INCLUDE / "NvInferRuntime.h").is_file():
        pytest.skip(NO_HEADERS)
    if not (CUDA_INCLUDE / "cuda_runtime_api.h").is_file() or shutil.which("g++") is None:
        pytest.skip(f"g++ or the CUDA headers ({CUDA_INCLUDE}) are missing")


def test_plugins_compile_against_tensorrt_headers(tmp_path: Path) -> None:
    """The plugin library compiles warning-free against the headers, exports only TensorRT's two
    entry points and does not need libnvinfer (the kernels are left unresolved here)."""
    _need_headers()
    flags = ["-std=c++17", "-Wall", "-Wextra", "-Werror", "-fPIC", "-fvisibility=hidden",
             f"-I{REPO / 'plugins' / 'include'}", "-isystem", str(TRT_INCLUDE), "-isystem", str(CUDA_INCLUDE)]
    objs = []
    for src in ("essm_plugin.cpp", "essm_ops.cpp"):
        obj = tmp_path / f"{src}.o"
        subprocess.run(["g++", *flags, "-c", str(REPO / "plugins" / "trt" / src), "-o", str(obj)], check=True)
        objs.append(str(obj))
    lib = tmp_path / trt_rt.PLUGIN_LIBRARY
    subprocess.run(["g++", "-shared", *objs, "-o", str(lib),
                    f"-Wl,--version-script={REPO / 'plugins' / 'trt' / 'exports.map'}"], check=True)
    syms = subprocess.run(["nm", "-D", "--defined-only", str(lib)], check=True, capture_output=True, text=True).stdout
    assert sorted(line.split()[-1] for line in syms.splitlines()) == ["getCreators", "setLoggerFinder"]
    needed = subprocess.run(["readelf", "-d", str(lib)], check=True, capture_output=True, text=True).stdout
    assert "libnvinfer" not in needed
    subprocess.run(["g++", *flags, "-c", str(REPO / "plugins" / "harness" / "plugin_harness.cpp"),
                    "-o", str(tmp_path / "harness.o")], check=True)


@pytest.mark.slow
def test_plugin_harness_interface_checks(tmp_path: Path) -> None:
    """Builds the real library (kernels included) with CMake and runs the harness's interface checks
    (creators, fields, shapes, formats, clone/serialize/recreate) without a GPU (--no-enqueue)."""
    _need_headers()
    if not all(shutil.which(t) for t in ("cmake", "ninja", "nvcc")):
        pytest.skip("cmake, ninja and nvcc are needed to build the plugin library")
    env = dict(os.environ, BUILD_DIR=str(tmp_path / "build"), TensorRT_ROOT=str(TRT_INCLUDE.parent), CUDA_ARCHS="90")
    r = subprocess.run([str(REPO / "plugins" / "trt" / "run_harness.sh"), "--no-enqueue"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "32 cases, 0 failures" in r.stdout


# ---- with TensorRT installed --------------------------------------------------------------------


def test_plugins_register_with_tensorrt() -> None:
    trt = pytest.importorskip("tensorrt", reason=trt_rt.TENSORRT_INSTALL_HINT)
    try:
        lib = trt_rt.locate_plugin()
    except BackendUnavailable as e:
        pytest.skip(str(e))
    trt_rt.load_plugins(trt, lib)
    registry = trt.get_plugin_registry()
    for op in trt_rt.PLUGIN_OPS:
        assert trt_rt._creator(registry, op) is not None, op
