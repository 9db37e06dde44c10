"""Build TensorRT engines from an ONNX export (``edgessm build``).

Input: an export directory with ``prefill.onnx``, ``decode.onnx`` and ``manifest.json``.
Output: a directory with one engine per graph (``prefill.engine``, ``decode.engine``),
``engine.json`` (TensorRT version, GPU, plugin sha256, precision, optimization profiles) and the
export's ``config.json`` / ``manifest.json`` / ``tokenizer.json``, so the directory runs on its
own (:class:`edgessm.runtime.trt.TrtBackend`). The directory is assembled aside and swapped in
whole, so a failed build never leaves a half-written engine set.

Precision: a graph with int8 (Q/DQ or edgessm Quant*) nodes, or exported in float16, is built as
a *strongly typed* network (TensorRT takes every dtype from the graph). A float32 graph with
``fp16=True`` is built weakly typed with the FP16 builder flag (TensorRT 10 only; TensorRT 11
builds strongly typed networks only, so export in float16 instead).
"""

from __future__ import annotations

import datetime
import logging
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx

from edgessm.errors import ConfigError, EdgessmError
from edgessm.io import atomic_directory, atomic_write_bytes, atomic_write_json
from edgessm.runtime.trt import (
    ENGINE_FILES,
    METADATA_FILE,
    load_plugins,
    locate_plugin,
    require_tensorrt,
    sha256_file,
)

log = logging.getLogger(__name__)

GRAPHS = ("prefill", "decode")
COPIED_FILES = ("config.json", "manifest.json", "tokenizer.json")
_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "HadamardQuantize", "QuantSelectiveScan",
              "QuantSelectiveStateUpdate", "QuantSSDScan", "QuantSSDStateUpdate"}
_INT_TYPES = {onnx.TensorProto.INT32, onnx.TensorProto.INT64}


class EngineBuildError(EdgessmError):
    """TensorRT could not parse a graph or build an engine."""


@dataclass(frozen=True)
class Range:
    """min <= opt <= max of one dynamic dimension in an optimization profile."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ConfigError(f"shape range {self.min}:{self.opt}:{self.max}: need 1 <= min <= opt <= max")

    @classmethod
    def parse(cls, text: str) -> Range:
        """'8' (fixed) or 'min:opt:max', as given on the command line."""
        try:
            parts = [int(p) for p in text.split(":")]
        except ValueError:
            parts = []
        if len(parts) == 1:
            parts *= 3
        if len(parts) != 3:
            raise ConfigError(f"shape range {text!r}: expected N or MIN:OPT:MAX (integers)")
        return cls(*parts)


@dataclass(frozen=True)
class EngineShapes:
    """Optimization-profile ranges: batch and prompt length for prefill, batch for decode."""

    prefill_batch: Range = field(default_factory=lambda: Range(1, 1, 1))
    prefill_len: Range = field(default_factory=lambda: Range(1, 128, 1024))
    decode_batch: Range = field(default_factory=lambda: Range(1, 1, 1))


@dataclass(frozen=True)
class GraphInput:
    name: str
    dims: tuple[int | str, ...]  # an int for a static dimension, the dim_param (or '?') otherwise
    elem_type: int


@dataclass(frozen=True)
class GraphInfo:
    inputs: tuple[GraphInput, ...]
    quantized: bool  # Q/DQ or edgessm Quant* nodes
    float16: bool  # float16 activations (any float16 graph input/output/value)


def inspect_graph(path: Path) -> GraphInfo:
    """Inputs and precision of an ONNX graph, read without loading external weights."""
    if not path.is_file():
        raise ConfigError(f"{path}: not found (expected the output of `edgessm export`)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others for a corrupt file
        raise ConfigError(f"{path}: not a readable ONNX model ({e})") from e
    g = model.graph
    initializers = {t.name for t in g.initializer}
    inputs = []
    for vi in g.input:
        if vi.name in initializers:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim)
        inputs.append(GraphInput(vi.name, dims, tt.elem_type))
    quantized = any(n.op_type in _QUANT_OPS for n in g.node)
    typed = list(g.input) + list(g.output) + list(g.value_info)
    float16 = any(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for v in typed) or any(
        t.data_type == onnx.TensorProto.FLOAT16 for t in g.initializer)
    return GraphInfo(tuple(inputs), quantized, float16)


def profile_for(graph: str, inputs: Iterable[GraphInput], shapes: EngineShapes) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shapes of every input: dynamic dim 0 is the batch, dynamic dim 1 of the
    prefill token input is the prompt length; any other dynamic dimension is an error."""
    batch = shapes.prefill_batch if graph == "prefill" else shapes.decode_batch
    out = {}
    for inp in inputs:
        ranges: list[Range] = []
        for i, d in enumerate(inp.dims):
            if isinstance(d, int) and d > 0:
                ranges.append(Range(d, d, d))
            elif i == 0:
                ranges.append(batch)
            elif i == 1 and graph == "prefill" and inp.elem_type in _INT_TYPES and len(inp.dims) == 2:
                ranges.append(shapes.prefill_len)
            else:
                raise ConfigError(
                    f"{graph}.onnx: input '{inp.name}' dimension {i} ({d!r}) is dynamic; only the batch (dim 0) "
                    "and the prefill token length (dim 1 of the token input) may be"
                )
        out[inp.name] = tuple(tuple(getattr(r, k) for r in ranges) for k in ("min", "opt", "max"))
    return out


def _gpu() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"name": "unknown (torch sees no CUDA device)"}
    major, minor = torch.cuda.get_device_capability()
    return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def _trt_logger(trt: ModuleType) -> Any:
    """A TensorRT logger that forwards to ``logging`` (warnings and errors always shown)."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            s = trt.ILogger.Severity
            level = {s.INTERNAL_ERROR: logging.ERROR, s.ERROR: logging.ERROR, s.WARNING: logging.WARNING,
                     s.INFO: logging.INFO}.get(severity, logging.DEBUG)
            logging.getLogger("edgessm.tensorrt").log(level, "%s", msg)

    return _Logger()


def _progress_monitor(trt: ModuleType, label: str) -> Any | None:
    """tqdm bars for TensorRT's build phases (IProgressMonitor exists from TensorRT 10.0)."""
    if not hasattr(trt, "IProgressMonitor"):
        return None
    from tqdm import tqdm

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.bars: dict[str, Any] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            depth = len(self.bars)
            self.bars[phase_name] = tqdm(total=num_steps, desc=f"{label}: {phase_name}", position=depth, leave=depth == 0)

        def step_complete(self, phase_name: str, step: int) -> bool:
            bar = self.bars.get(phase_name)
            if bar is not None:
                bar.n = step + 1
                bar.refresh()
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return _Monitor()


def _parse(trt: ModuleType, builder: Any, logger: Any, path: Path, strongly_typed: bool) -> tuple[Any, Any]:
    """The parsed network (and its parser, which must outlive the network's use)."""
    flags = 0
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{path}: TensorRT's ONNX parser failed:\n  {errors}")
    return network, parser


def choose_precision(info: GraphInfo, path: Path, fp16: bool, int8: bool, weak_fp16_available: bool) -> tuple[bool, bool]:
    """(strongly typed network, set the FP16 builder flag) for one graph, or a ConfigError saying why not.
    ``weak_fp16_available``: this TensorRT still has BuilderFlag.FP16 (TensorRT 10)."""
    if int8 and not info.quantized:
        raise ConfigError(
            f"{path}: --int8 needs a quantized export (Q/DQ or Quant* nodes; `edgessm quantize` then "
            "`edgessm export`): TensorRT's implicit INT8 calibration is not used"
        )
    if info.quantized or info.float16 or not fp16:
        if info.float16 and not fp16:
            log.warning("%s: the graph is float16 (export dtype), so the engine computes in float16 regardless of fp16=False", path)
        return True, False
    if not weak_fp16_available:
        raise ConfigError(
            f"{path}: is a float32 graph and this TensorRT builds strongly typed networks only: "
            "export in float16 for an fp16 engine, or build with fp16 off"
        )
    return False, True


def _build_one(trt: ModuleType, builder: Any, logger: Any, graph: str, onnx_path: Path, shapes: EngineShapes,
               fp16: bool, int8: bool, timing_cache: Any, workspace_mib: int | None, progress: bool) -> tuple[bytes, dict]:
    info = inspect_graph(onnx_path)
    profile_shapes = profile_for(graph, info.inputs, shapes)
    strongly_typed, fp16_flag = choose_precision(info, onnx_path, fp16, int8, hasattr(trt.BuilderFlag, "FP16"))
    network, _parser = _parse(trt, builder, logger, onnx_path, strongly_typed)
    config = builder.create_builder_config()
    if fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    if workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    if timing_cache is not None:
        config.set_timing_cache(timing_cache, False)
    monitor = _progress_monitor(trt, graph) if progress else None
    if monitor is not None:
        config.progress_monitor = monitor
    log.info("building %s engine from %s (strongly typed: %s, fp16 flag: %s)", graph, onnx_path, strongly_typed, fp16_flag)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"{onnx_path}: TensorRT could not build the {graph} engine (see the TensorRT errors logged above)")
    meta = {"file": ENGINE_FILES[graph], "onnx_sha256": sha256_file(onnx_path), "strongly_typed": strongly_typed,
            "fp16_flag": fp16_flag, "quantized": info.quantized,
            "profile": {k: {"min": v[0], "opt": v[1], "max": v[2]} for k, v in profile_shapes.items()}}
    return bytes(plan), meta


def _check_output_dir(out_dir: Path) -> None:
    """Refuse to replace a directory that is not an earlier engine directory (it may hold user data)."""
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / METADATA_FILE).is_file():
        raise ConfigError(f"{out_dir}: exists and is not an edgessm engine directory (no {METADATA_FILE}); pick another")


def build_engine(
    onnx_dir: str | Path,
    out_dir: str | Path,
    *,
    fp16: bool = True,
    int8: bool = False,
    shapes: EngineShapes | None = None,
    timing_cache: str | Path | None = None,
    plugin_path: str | Path | None = None,
    workspace_mib: int | None = None,
    progress: bool = True,
) -> Path:
    """Build ``prefill.engine`` and ``decode.engine`` from ``onnx_dir`` into ``out_dir``; returns ``out_dir``.

    ``timing_cache``: a file reused and updated across builds (much faster rebuilds).
    ``plugin_path``: libedgessm_plugins.so (default: $EDGESSM_PLUGIN_PATH, then plugins/build*/, build/,
    then edgessm/lib/). Raises BackendUnavailable without TensorRT, ConfigError for bad inputs and
    EngineBuildError when TensorRT fails.
    """
    trt = require_tensorrt()
    onnx_dir, out_dir, shapes = Path(onnx_dir), Path(out_dir), shapes or EngineShapes()
    for name in (*(f"{g}.onnx" for g in GRAPHS), "manifest.json"):
        if not (onnx_dir / name).is_file():
            raise ConfigError(f"{onnx_dir}: {name} not found (expected an `edgessm export` directory)")
    _check_output_dir(out_dir)
    plugin = locate_plugin(plugin_path)
    load_plugins(trt, plugin)
    logger = _trt_logger(trt)
    builder = trt.Builder(logger)

    # One timing cache shared by both builds, read from and written back to `timing_cache`.
    cache_file = Path(timing_cache) if timing_cache else None
    cache = builder.create_builder_config().create_timing_cache(
        cache_file.read_bytes() if cache_file and cache_file.is_file() else b"")

    plans, engines = {}, {}
    for graph in GRAPHS:
        plans[graph], engines[graph] = _build_one(trt, builder, logger, graph, onnx_dir / f"{graph}.onnx", shapes,
                                                  fp16, int8, cache, workspace_mib, progress)
    metadata = {
        "format": "edgessm-trt/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tensorrt_version": trt.__version__,
        "gpu": _gpu(),
        "plugin": {"path": str(plugin), "sha256": sha256_file(plugin)},
        "onnx_dir": str(onnx_dir.resolve()),
        "precision": {"fp16": fp16, "int8": int8},
        "shapes": asdict(shapes),
        "engines": engines,
    }
    with atomic_directory(out_dir) as tmp:
        for graph in GRAPHS:
            atomic_write_bytes(tmp / ENGINE_FILES[graph], plans[graph])
            engines[graph]["sha256"] = sha256_file(tmp / ENGINE_FILES[graph])
        for name in COPIED_FILES:
            if (onnx_dir / name).is_file():
                shutil.copyfile(onnx_dir / name, tmp / name)
        atomic_write_json(tmp / METADATA_FILE, metadata)
    if cache_file:
        atomic_write_bytes(cache_file, bytes(cache.serialize()))
    log.info("wrote %s (%s)", out_dir, ", ".join(ENGINE_FILES.values()))
    return out_dir


__all__ = ["build_engine", "EngineShapes", "Range", "EngineBuildError", "inspect_graph", "profile_for", "GraphInfo",
           "GraphInput", "choose_precision"]
