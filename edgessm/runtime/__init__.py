"""Runtime backends (torch, ONNX Runtime, TensorRT) behind one protocol, and generation over them."""

from __future__ import annotations

from pathlib import Path

import torch

from edgessm.errors import ConfigError
from edgessm.models import MambaLM
from edgessm.runtime.backend import Backend, TorchBackend

BACKENDS = ("auto", "torch", "ort", "trt")


def detect_backend(path: Path) -> str:
    """An exported ONNX directory (manifest.json) runs on ORT, an engine directory on TensorRT, a checkpoint on torch."""
    if (path / "engine.json").is_file():
        return "trt"
    if (path / "manifest.json").is_file():
        return "ort"
    return "torch"


def open_backend(path: str | Path, backend: str = "auto", device: str = "cpu") -> Backend:
    """Open a checkpoint, quantized directory, ONNX export or TensorRT engine directory for running."""
    path = Path(path)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = detect_backend(path)
    if backend == "ort":
        from edgessm.runtime.ort import OrtBackend

        return OrtBackend(path)
    if backend == "trt":
        from edgessm.runtime.trt import TrtBackend

        return TrtBackend(path)
    model = load_any_model(path)
    if torch.device(device).type == "cuda" and isinstance(model, MambaLM):
        # float checkpoints on a GPU run on the CUDA kernels with a CUDA-graph decode step
        from edgessm.runtime.cuda_backend import CudaBackend

        return CudaBackend(model, device=device)
    return TorchBackend(model, device=device)


def load_any_model(path: str | Path):  # -> MambaLM or a quantized model with the same API
    """A float checkpoint, or a directory written by ``edgessm quantize`` (quant_config.json)."""
    path = Path(path)
    if (path / "quant_config.json").is_file():
        from edgessm.quant import load_quantized

        return load_quantized(path)
    from edgessm.models import load_model

    return load_model(path)


__all__ = ["Backend", "TorchBackend", "BACKENDS", "detect_backend", "open_backend", "load_any_model"]
