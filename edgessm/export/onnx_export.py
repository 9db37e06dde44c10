"""``export_onnx``: a model → prefill.onnx + decode.onnx + shared external weights + manifest.json.

The export directory is written atomically (assembled in a temporary sibling and swapped in).
Large initializers go to one shared ``weights.onnx.data`` that both graphs reference (each weight
is stored once although both graphs use it); the bytes written depend only on the model and the
options, so the same export is byte-identical every time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import ModelProto, TensorProto, external_data_helper

import edgessm
from edgessm.errors import ConfigError
from edgessm.export.builder import DOMAIN
from edgessm.export.graph import BATCH, IR_VERSION, SEQ, GraphOptions, build_graph, state_dims, state_names
from edgessm.export.schemas import register_schemas
from edgessm.io import atomic_directory, atomic_write_bytes, atomic_write_json, atomic_write_text, read_json_object
from edgessm.models import MambaLM, load_model

log = logging.getLogger(__name__)

SCAN_MODES = ("plugin", "portable")
GRAPHS = ("prefill", "decode")
MIN_OPSET = 18  # ReduceMean with an axes input
DEFAULT_OPSET = 21  # block-quantized DequantizeLinear (int4 weights) needs 21
WEIGHTS_FILE = "weights.onnx.data"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# Chunk sizes of the portable Scan lowering (docs/export.md, "Portable scan": measured in ORT).
DEFAULT_CHUNK_MAMBA1 = 16
DEFAULT_CHUNK_MAMBA2 = 32
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class ExportOptions:
    scan: str = "plugin"
    graphs: tuple[str, ...] = GRAPHS
    opset: int = DEFAULT_OPSET
    external_data_threshold: int = 2 * 1024 * 1024  # total initializer bytes above which weights go external
    chunk_mamba1: int = DEFAULT_CHUNK_MAMBA1
    chunk_mamba2: int = DEFAULT_CHUNK_MAMBA2
    check: bool = True

    def __post_init__(self) -> None:
        if self.scan not in SCAN_MODES:
            raise ConfigError(f"scan mode {self.scan!r} is not one of {SCAN_MODES}")
        bad = [g for g in self.graphs if g not in GRAPHS]
        if bad or not self.graphs or len(set(self.graphs)) != len(self.graphs):
            raise ConfigError(f"graphs {self.graphs!r}: expected a non-empty subset of {GRAPHS} without repeats")
        if not MIN_OPSET <= self.opset <= onnx.defs.onnx_opset_version():
            raise ConfigError(f"opset {self.opset} is outside [{MIN_OPSET}, {onnx.defs.onnx_opset_version()}]")
        for name in ("chunk_mamba1", "chunk_mamba2"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class ExportResult:
    out_dir: Path
    files: list[str]
    manifest: dict[str, Any] = field(default_factory=dict)


def model_hash(model: MambaLM) -> str:
    """sha256 over the config and every tensor of the state dict (name, dtype, shape, bytes)."""
    h = hashlib.sha256(model.config.to_json().encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _externalize(models: dict[str, ModelProto], threshold: int) -> bytes | None:
    """Move initializers of >= 1 KiB into one shared blob (64-byte aligned offsets), if the total
    initializer size exceeds ``threshold``. Tensors of the same name are stored once (they must
    then be identical: both graphs use the same weights)."""
    total = sum(len(t.raw_data) for m in models.values() for t in m.graph.initializer)
    if total <= threshold:
        return None
    blob = bytearray()
    placed: dict[str, tuple[int, int, bytes]] = {}
    for kind, model in models.items():
        for t in model.graph.initializer:
            if len(t.raw_data) < 1024:
                continue
            digest = hashlib.sha256(t.raw_data).digest()
            if t.name in placed:
                offset, length, known = placed[t.name]
                if known != digest:
                    raise ValueError(f"{kind}.onnx: initializer {t.name} differs from the one of the same name in another graph")
            else:
                blob.extend(b"\0" * (-len(blob) % 64))
                offset, length = len(blob), len(t.raw_data)
                blob.extend(t.raw_data)
                placed[t.name] = (offset, length, digest)
            external_data_helper.set_external_data(t, WEIGHTS_FILE, offset, length)
            t.data_location = TensorProto.EXTERNAL
            t.ClearField("raw_data")
    return bytes(blob)


def _io_spec(model: ModelProto) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    def spec(vi: onnx.ValueInfoProto) -> dict[str, Any]:
        t = vi.type.tensor_type
        dims = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim]
        return {"name": vi.name, "dtype": TensorProto.DataType.Name(t.elem_type).lower(), "shape": dims}

    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]


def _custom_ops(model: ModelProto) -> list[str]:
    found: set[str] = set()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.domain == DOMAIN:
                found.add(node.op_type)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)

    walk(model.graph)
    return sorted(found)


def _manifest(model: MambaLM, opts: ExportOptions, models: dict[str, ModelProto], files: dict[str, bytes],
              source: str | None) -> dict[str, Any]:
    cfg = model.config
    conv_dims, ssm_dims = state_dims(cfg)
    graphs = {}
    for kind, m in models.items():
        inputs, outputs = _io_spec(m)
        graphs[kind] = {"file": f"{kind}.onnx", "inputs": inputs, "outputs": outputs, "custom_ops": _custom_ops(m)}
    return {
        "format": MANIFEST_FORMAT,
        "edgessm_version": edgessm.__version__,
        "arch": cfg.arch,
        "config": cfg.to_hf_dict(),
        "scan": opts.scan,
        "opset": opts.opset,
        "ir_version": IR_VERSION,
        "custom_domain": DOMAIN if opts.scan == "plugin" else None,
        "custom_ops": sorted({op for g in graphs.values() for op in g["custom_ops"]}),
        "portable_chunks": {"mamba1": opts.chunk_mamba1, "mamba2": opts.chunk_mamba2} if opts.scan == "portable" else None,
        "quantization": _quantization(model),
        "dynamic_axes": [BATCH, SEQ],
        "states": [
            {"layer": i, "conv": {"input": names[0], "output": names[2], "shape": conv_dims, "dtype": "float32"},
             "ssm": {"input": names[1], "output": names[3], "shape": ssm_dims, "dtype": "float32"}}
            for i, names in ((i, state_names(i)) for i in range(cfg.n_layer))
        ],
        "graphs": graphs,
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())},
        "source": {"path": source, "model_sha256": model_hash(model)},
    }


def _check(path: Path) -> None:
    """The ONNX checker with full_check (strict shape inference included), custom schemas registered."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ValueError(f"{path.name}: exported graph failed the ONNX checker: {e}") from e


def _load(directory: Path) -> MambaLM:
    """A float checkpoint, or a quantized directory (quant_config.json, docs/quantization.md)."""
    if (directory / "quant_config.json").is_file():
        from edgessm.quant import load_quantized

        return load_quantized(directory)
    return load_model(directory)


def _quantization(model: MambaLM) -> dict[str, Any] | None:
    recipe = getattr(model.mixers[0], "recipe", None)
    if recipe is None:
        return None
    return {"recipe": recipe.to_dict(), "w_bits": recipe.w_bits, "a_bits": recipe.a_bits,
            "group_size": recipe.group_size, "hadamard": recipe.hadamard,
            "weights": "int8 per output channel" if recipe.w_bits == 8 and recipe.group_size == 0
            else f"int{recipe.w_bits} blocks of {recipe.group_size} input columns (DequantizeLinear block_size)",
            "activations": "QuantizeLinear/DequantizeLinear int8, static scales" if recipe.a_bits else "float"}


def export_onnx(model_or_dir: MambaLM | str | Path, out_dir: str | Path, scan: str = "plugin",
                graphs: tuple[str, ...] = GRAPHS, opset: int = DEFAULT_OPSET, **options: Any) -> ExportResult:
    """Export prefill/decode graphs of a model (or checkpoint directory) to ``out_dir``.

    ``options`` are the other fields of ``ExportOptions`` (external_data_threshold, chunk sizes, check).
    """
    opts = ExportOptions(scan=scan, graphs=tuple(graphs), opset=opset, **options)
    source_dir = None if isinstance(model_or_dir, MambaLM) else Path(model_or_dir)
    model = model_or_dir if isinstance(model_or_dir, MambaLM) else _load(source_dir)
    if not isinstance(model, MambaLM) or any(p.dtype != torch.float32 for p in model.parameters()):
        raise ConfigError("export_onnx needs a float32 MambaLM (load the model with dtype=torch.float32)")
    register_schemas()
    gopts = GraphOptions(opts.scan, opts.opset, opts.chunk_mamba1, opts.chunk_mamba2)
    models = {kind: build_graph(model, gopts, kind) for kind in opts.graphs}
    blob = _externalize(models, opts.external_data_threshold)
    files = {f"{kind}.onnx": m.SerializeToString(deterministic=True) for kind, m in models.items()}
    if blob is not None:
        files[WEIGHTS_FILE] = blob
    manifest = _manifest(model, opts, models, files, None if source_dir is None else str(source_dir))
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        for name, data in files.items():
            atomic_write_bytes(tmp / name, data)
        atomic_write_json(tmp / MANIFEST, manifest)
        # The HF config.json too, so the directory is also a config source (build, tokenizer lookup).
        atomic_write_text(tmp / "config.json", json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
        for name in _TOKENIZER_FILES:
            if source_dir is not None and (source_dir / name).is_file():
                shutil.copyfile(source_dir / name, tmp / name)
        if opts.check:
            for kind in opts.graphs:
                _check(tmp / f"{kind}.onnx")
    log.info("exported %s (%s scan) to %s: %s", model.config.arch, opts.scan, out_dir, ", ".join(sorted(files)))
    return ExportResult(out_dir, sorted([*files, MANIFEST, "config.json"]), manifest)


def read_manifest(onnx_dir: str | Path) -> dict[str, Any]:
    return read_json_object(Path(onnx_dir) / MANIFEST, "not a directory written by `edgessm export`", MANIFEST_FORMAT)


__all__ = ["ExportOptions", "ExportResult", "export_onnx", "model_hash", "read_manifest"]
