"""TensorRT backend: runs the engines written by :func:`edgessm.build.build_engine`.

An engine directory holds ``prefill.engine`` and ``decode.engine`` (one engine per exported
graph), ``engine.json`` (metadata), and the export's ``config.json`` / ``manifest.json``.
Recurrent states stay in device memory (torch CUDA tensors) between steps; only logits are copied
to the host, as numpy, to honour the :class:`~edgessm.runtime.backend.Backend` protocol.

Without the ``tensorrt`` Python package every entry point raises
:class:`~edgessm.errors.BackendUnavailable` saying what to install; nothing is emulated.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from edgessm.config import MambaConfig, load_config
from edgessm.errors import BackendUnavailable, ConfigError, EdgessmError
from edgessm.io import read_json_object

log = logging.getLogger(__name__)

MIN_TENSORRT = (10, 3)
TENSORRT_INSTALL_HINT = (
    "TensorRT >= 10.3 with its Python bindings is required: on x86-64 `pip install tensorrt` "
    "(NVIDIA's wheels, CUDA 12/13); on Jetson use the TensorRT that JetPack 6 ships "
    "(apt package python3-libnvinfer; inside a venv create it with --system-site-packages)"
)
PLUGIN_LIBRARY = "libedgessm_plugins.so"
PLUGIN_ENV = "EDGESSM_PLUGIN_PATH"
# The creators libedgessm_plugins.so must register (docs/onnx_ops.md), version "1", namespace "".
PLUGIN_OPS = (
    "CausalConv1d", "CausalConv1dUpdate", "SelectiveScan", "SelectiveStateUpdate", "SSDScan",
    "SSDStateUpdate", "HadamardTransform", "HadamardQuantize", "QuantSelectiveScan",
    "QuantSelectiveStateUpdate", "QuantSSDScan", "QuantSSDStateUpdate",
)
ENGINE_FILES = {"prefill": "prefill.engine", "decode": "decode.engine"}
METADATA_FILE = "engine.json"
_REPO_ROOT = Path(__file__).resolve().parents[2]


def require_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or BackendUnavailable saying exactly what to install."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailable(f"{TENSORRT_INSTALL_HINT} (import tensorrt failed: {e})") from e
    version = tuple(int(p) for p in trt.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_TENSORRT:
        raise BackendUnavailable(f"TensorRT {trt.__version__} is too old: {TENSORRT_INSTALL_HINT}")
    return trt


def plugin_search_paths() -> list[Path]:
    """Where :func:`locate_plugin` looks after $EDGESSM_PLUGIN_PATH, in order (globs expanded)."""
    patterns = [
        (_REPO_ROOT / "plugins", f"build*/**/{PLUGIN_LIBRARY}"),
        (_REPO_ROOT / "build", f"**/{PLUGIN_LIBRARY}"),
    ]
    found: list[Path] = []
    for root, pattern in patterns:
        if root.is_dir():
            # Newest first: a fresh build wins over a stale one.
            found += sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
    package_dir = Path(__file__).resolve().parents[1]
    found += [package_dir / "lib" / PLUGIN_LIBRARY, package_dir / PLUGIN_LIBRARY]
    return found


def locate_plugin(explicit: str | Path | None = None) -> Path:
    """The plugin library: ``explicit``, else $EDGESSM_PLUGIN_PATH, else a build under plugins/ or
    build/ of this checkout, else one installed next to the package (edgessm/lib/)."""
    for source, value in (("plugin_path", explicit), (PLUGIN_ENV, os.environ.get(PLUGIN_ENV))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise BackendUnavailable(f"{source}={value}: no such file (expected {PLUGIN_LIBRARY})")
            return path.resolve()
    candidates = plugin_search_paths()
    for path in candidates:
        if path.is_file():
            return path.resolve()
    searched = "\n  ".join(str(p) for p in candidates) or "(no build directories)"
    raise BackendUnavailable(
        f"{PLUGIN_LIBRARY} not found. Build it with `cmake -S plugins -B plugins/build -G Ninja "
        f"-DTensorRT_ROOT=/path/to/TensorRT && ninja -C plugins/build` (see docs/tensorrt.md) or set "
        f"{PLUGIN_ENV}. Searched:\n  {searched}"
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_loaded_plugins: dict[Path, Any] = {}


def load_plugins(trt: ModuleType, path: Path) -> None:
    """Register the edgessm plugin creators with TensorRT's global registry (once per process)."""
    if path in _loaded_plugins:
        return
    registry = trt.get_plugin_registry()
    if _creator(registry, PLUGIN_OPS[0]) is not None:
        log.info("edgessm plugins already registered; not loading %s again", path)
        _loaded_plugins[path] = None
        return
    handle = registry.load_library(str(path))
    if not handle:
        raise BackendUnavailable(f"{path}: TensorRT could not load this plugin library (see the TensorRT log)")
    missing = [op for op in PLUGIN_OPS if _creator(registry, op) is None]
    if missing:
        raise BackendUnavailable(f"{path}: loaded, but these plugin creators are missing: {', '.join(missing)}")
    _loaded_plugins[path] = handle
    log.info("loaded TensorRT plugins from %s", path)


def _creator(registry: Any, name: str) -> Any:
    return registry.get_creator(name, "1", "")  # IPluginCreatorV3One lookup (TensorRT >= 10.0)


def read_metadata(engine_dir: Path) -> dict[str, Any]:
    return read_json_object(engine_dir / METADATA_FILE, "not an `edgessm build` engine directory", "edgessm-trt/1")


# ---- engines -------------------------------------------------------------------------------


def _torch_dtype(trt: ModuleType, dt: Any) -> torch.dtype:
    table = {
        trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT8: torch.int8, trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64,
        trt.DataType.BOOL: torch.bool,
    }
    if dt not in table:
        raise EdgessmError(f"TensorRT tensor dtype {dt} has no torch equivalent")
    return table[dt]


@dataclass(frozen=True)
class _Io:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]  # -1 for dynamic dimensions


class _Engine:
    """One deserialized engine and its execution context, fed and drained with torch CUDA tensors."""

    def __init__(self, trt: ModuleType, runtime: Any, file: Path, device: torch.device) -> None:
        self.file, self.device = file, device
        engine = runtime.deserialize_cuda_engine(file.read_bytes())
        if engine is None:
            raise EdgessmError(
                f"{file}: TensorRT {trt.__version__} could not deserialize this engine (built by another TensorRT "
                "version or GPU, or the edgessm plugins were not loaded; see the TensorRT log)"
            )
        self.engine, self.context = engine, engine.create_execution_context()
        self.inputs: list[_Io] = []
        self.outputs: list[_Io] = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            io = _Io(name, _torch_dtype(trt, engine.get_tensor_dtype(name)), tuple(engine.get_tensor_shape(name)))
            (self.inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else self.outputs).append(io)

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for io in self.inputs:
            t = feeds[io.name]
            if t.dtype != io.dtype or t.device != self.device or not t.is_contiguous():
                raise EdgessmError(f"{self.file}: input '{io.name}' must be a contiguous {io.dtype} tensor on {self.device}")
            if not self.context.set_input_shape(io.name, tuple(t.shape)):
                raise EdgessmError(
                    f"{self.file}: input '{io.name}' shape {tuple(t.shape)} is outside the engine's optimization "
                    f"profile (engine shape {io.shape}; rebuild with larger --batch/--prefill-len ranges)"
                )
            self.context.set_tensor_address(io.name, t.data_ptr())
        out: dict[str, torch.Tensor] = {}
        for io in self.outputs:
            shape = tuple(self.context.get_tensor_shape(io.name))
            out[io.name] = torch.empty(shape, dtype=io.dtype, device=self.device)
            self.context.set_tensor_address(io.name, out[io.name].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EdgessmError(f"{self.file}: TensorRT execution failed (see the TensorRT log)")
        return out


def _single(items: list[_Io], what: str, where: Path, pred: Any) -> _Io:
    hits = [io for io in items if pred(io)]
    if len(hits) != 1:
        raise ConfigError(f"{where}: expected exactly one {what}, found {[io.name for io in hits]}")
    return hits[0]


def _is_int(io: _Io) -> bool:
    return io.dtype in (torch.int32, torch.int64)


class TrtBackend:
    """The :class:`~edgessm.runtime.backend.Backend` protocol over ``prefill.engine`` / ``decode.engine``.

    States are a dict of torch CUDA tensors keyed by the decode engine's state input names; they
    are treated as immutable (each step allocates fresh outputs), so old states stay valid.
    """

    name = "trt"

    def __init__(self, engine_dir: str | Path, plugin_path: str | Path | None = None, device: int = 0) -> None:
        trt = require_tensorrt()
        if not torch.cuda.is_available():
            raise BackendUnavailable("the TensorRT backend needs a CUDA GPU visible to torch (torch.cuda.is_available() is False)")
        self.dir = Path(engine_dir)
        self.meta = read_metadata(self.dir)
        self.config: MambaConfig = load_config(self.dir)
        plugin = locate_plugin(plugin_path)
        built_with = self.meta.get("plugin", {}).get("sha256")
        if built_with and built_with != sha256_file(plugin):
            log.warning("%s differs from the plugin library the engines were built with (sha256 %s)", plugin, built_with)
        load_plugins(trt, plugin)
        self.device = torch.device("cuda", device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.prefill_engine = _Engine(trt, runtime, self.dir / ENGINE_FILES["prefill"], self.device)
            self.decode_engine = _Engine(trt, runtime, self.dir / ENGINE_FILES["decode"], self.device)
        self._pair_states()

    def _pair_states(self) -> None:
        """Match states across graphs: decode state inputs, decode state outputs and prefill state
        outputs appear in the same order (the exporter writes them per layer); shapes must agree."""
        pre, dec = self.prefill_engine, self.decode_engine
        self._pre_tokens = _single(pre.inputs, "integer token input", pre.file, _is_int)
        self._dec_token = _single(dec.inputs, "integer token input", dec.file, _is_int)
        self._pre_logits = _single(pre.outputs, "'logits' output", pre.file, lambda io: "logits" in io.name)
        self._dec_logits = _single(dec.outputs, "'logits' output", dec.file, lambda io: "logits" in io.name)
        state_in = [io for io in dec.inputs if io is not self._dec_token]
        state_out = [io for io in dec.outputs if io is not self._dec_logits]
        pre_out = [io for io in pre.outputs if io is not self._pre_logits]
        if not (len(state_in) == len(state_out) == len(pre_out)):
            raise ConfigError(
                f"{self.dir}: {len(pre_out)} prefill state outputs, {len(state_in)} decode state inputs and "
                f"{len(state_out)} decode state outputs: the two engines do not belong together"
            )
        for a, b, c in zip(pre_out, state_in, state_out):
            if not (a.shape[1:] == b.shape[1:] == c.shape[1:] and a.dtype == b.dtype == c.dtype):
                raise ConfigError(
                    f"{self.dir}: state mismatch: prefill '{a.name}' {a.shape} {a.dtype}, decode input '{b.name}' "
                    f"{b.shape} {b.dtype}, decode output '{c.name}' {c.shape} {c.dtype}"
                )
        self._pre_to_state = {a.name: b.name for a, b in zip(pre_out, state_in)}
        self._dec_to_state = {c.name: b.name for b, c in zip(state_in, state_out)}

    def _tokens(self, tokens: np.ndarray, io: _Io, rank: int) -> torch.Tensor:
        tokens = np.asarray(tokens)
        if tokens.ndim != rank or not np.issubdtype(tokens.dtype, np.integer):
            raise ConfigError(f"tokens: expected an integer array of rank {rank}, got {tokens.dtype} {tokens.shape}")
        return torch.as_tensor(tokens, dtype=io.dtype).to(self.device).contiguous()

    @staticmethod
    def _logits(t: torch.Tensor) -> np.ndarray:
        return t.float().cpu().numpy()

    def prefill(self, tokens: np.ndarray) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        with torch.cuda.device(self.device):
            out = self.prefill_engine.run({self._pre_tokens.name: self._tokens(tokens, self._pre_tokens, 2)})
            states = {self._pre_to_state[k]: v for k, v in out.items() if k in self._pre_to_state}
            return self._logits(out[self._pre_logits.name]), states

    def step(self, token: np.ndarray, states: dict[str, torch.Tensor]) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        with torch.cuda.device(self.device):
            feeds = {self._dec_token.name: self._tokens(token, self._dec_token, 1)}
            batch = feeds[self._dec_token.name].shape[0]
            for name in self._dec_to_state.values():
                if name not in states:
                    raise ConfigError(f"states: missing '{name}' (pass the states returned by prefill/step)")
                if states[name].shape[0] != batch:
                    raise ConfigError(f"states: '{name}' has batch {states[name].shape[0]}, tokens have batch {batch}")
                feeds[name] = states[name]
            out = self.decode_engine.run(feeds)
            new_states = {self._dec_to_state[k]: v for k, v in out.items() if k in self._dec_to_state}
            return self._logits(out[self._dec_logits.name]), new_states


__all__ = [
    "TrtBackend", "require_tensorrt", "locate_plugin", "plugin_search_paths", "load_plugins", "read_metadata",
    "sha256_file", "PLUGIN_LIBRARY", "PLUGIN_ENV", "PLUGIN_OPS", "ENGINE_FILES", "METADATA_FILE",
    "TENSORRT_INSTALL_HINT",
]
