"""Runtime backends (torch, ONNX Runtime, TensorRT) behind one protocol, and generation over them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgessm.errors import ConfigError
from edgessm.runtime.backend import Backend, TorchBackend

BACKENDS = ("auto", "torch", "ort", "trt")
# Weight modes of the CUDA backend offered for float checkpoints (cuda_backend.WEIGHT_MODES less w8a8,
# whose activation scales need calibration: `edgessm quantize` makes W8A8 models).
GPU_WEIGHTS = ("float", "w8a16", "w4a16")


def detect_backend(path: Path) -> str:
    """An exported ONNX directory (manifest.json) runs on ORT, an engine directory on TensorRT, a checkpoint on torch."""
    if (path / "engine.json").is_file():
        return "trt"
    if (path / "manifest.json").is_file():
        return "ort"
    return "torch"


def open_backend(path: str | Path, backend: str = "auto", device: str = "cpu", threads: int | None = None,
                 gpu_weights: str = "float") -> Backend:
    """Open a checkpoint, quantized directory, ONNX export or TensorRT engine directory for running.

    ``threads``: ONNX Runtime intra-op threads (default: ORT's choice). ``gpu_weights``: how the CUDA
    backend (a float checkpoint on a CUDA ``device``) runs its linear layers: ``float`` (float16 weights)
    or weight-only quantized (``w8a16``, ``w4a16``), on Triton GEMV kernels for decode (see
    ``edgessm.runtime.cuda_backend``).
    """
    path = Path(path)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if gpu_weights not in GPU_WEIGHTS:
        raise ConfigError(f"unknown gpu_weights {gpu_weights!r}: expected one of {', '.join(GPU_WEIGHTS)}")
    if backend == "auto":
        backend = detect_backend(path)
    quantized = is_quantized_dir(path)
    # float checkpoints on a GPU run on the CUDA kernels with a CUDA-graph decode step
    on_cuda_backend = backend == "torch" and torch.device(device).type == "cuda" and not quantized
    if gpu_weights != "float" and not on_cuda_backend:
        raise ConfigError(
            f"gpu_weights={gpu_weights!r} quantizes a float checkpoint for the CUDA backend (--device cuda); "
            f"{path} would run on backend {backend!r}, device {device!r}"
            + (" and is already quantized (edgessm quantize)" if quantized else "")
        )
    if backend == "ort":
        from edgessm.runtime.ort import OrtBackend

        return OrtBackend(path, threads=threads)
    if backend == "trt":
        from edgessm.runtime.trt import TrtBackend

        return TrtBackend(path)
    model = load_any_model(path)
    if on_cuda_backend:
        from edgessm.runtime.cuda_backend import CudaBackend

        return CudaBackend(model, device=device, weights=gpu_weights)
    return TorchBackend(model, device=device)


def is_quantized_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by ``edgessm quantize``."""
    return (Path(path) / "quant_config.json").is_file()


def load_any_model(path: str | Path):  # -> MambaLM or a quantized model with the same API
    """A float checkpoint, or a directory written by ``edgessm quantize`` (quant_config.json)."""
    path = Path(path)
    if is_quantized_dir(path):
        from edgessm.quant import load_quantized

        return load_quantized(path)
    from edgessm.models import load_model

    return load_model(path)


def run_model(
    path: str | Path, tokens: np.ndarray, new_tokens: int, backend: str = "auto", device: str = "cpu",
    compare: str | Path | None = None, threads: int | None = None, gpu_weights: str = "float",
) -> dict[str, Any]:
    """Greedy-generate ``new_tokens`` after ``tokens`` [B, T] on a backend (what ``edgessm run`` prints).

    With ``compare`` (the source float checkpoint): the prefill logits' relative error against the
    float64 PyTorch model, and whether PyTorch's greedy tokens are the same.
    """
    from edgessm.models import load_model
    from edgessm.runtime.generation import generate

    session = open_backend(path, backend, device, threads, gpu_weights)
    result = generate(session, tokens, new_tokens)
    report: dict[str, Any] = {
        "model": str(path), "backend": session.name, "arch": session.config.arch,
        "scan": getattr(session, "manifest", {}).get("scan"),
        "prompt": tokens.tolist(), "new_tokens": result.new_tokens.tolist(),
        "prefill_ms": 1e3 * result.prefill_seconds, "decode_ms_per_token": result.decode_ms_per_token,
    }
    if compare is not None:
        reference = load_model(compare, dtype=torch.float64)
        with torch.no_grad():
            ref_logits = reference(torch.from_numpy(tokens))[0].numpy()
        logits, _ = session.prefill(tokens)
        err = float(np.linalg.norm(logits - ref_logits) / np.linalg.norm(ref_logits))
        torch_result = generate(TorchBackend(load_model(compare)), tokens, new_tokens)
        report["compare"] = {"model": str(compare), "prefill_rel_err": err,
                             "tokens_equal": bool(np.array_equal(torch_result.tokens, result.tokens))}
    return report


__all__ = ["Backend", "TorchBackend", "BACKENDS", "GPU_WEIGHTS", "detect_backend", "is_quantized_dir", "open_backend",
           "load_any_model", "run_model"]
