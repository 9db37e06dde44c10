"""ONNX Runtime backend: runs an `edgessm export` directory (prefill.onnx, decode.onnx, manifest.json).

``OrtBackend(onnx_dir)`` satisfies ``edgessm.runtime.backend.Backend``: ``prefill`` runs the
prefill graph over the prompt, ``step`` runs the decode graph with the carried states. States
are a list of ``LayerState(conv, ssm)`` numpy arrays (float32), the same structure the torch
backend uses. Portable graphs run as they are; plugin graphs get their `edgessm` nodes lowered
to standard ops first (``edgessm.runtime.ort_ops``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgessm.config import MambaConfig, config_from_hf
from edgessm.errors import BackendUnavailable, ConfigError
from edgessm.export.onnx_export import read_manifest
from edgessm.models.sites import LayerState

log = logging.getLogger(__name__)

States = list[LayerState]
# ORT 1.31's QDQ propagation copies a Q/DQ pair across Unsqueeze/Transpose with a uint8 zero point
# for our int8 one and then fails to load ("output_dtype INT8 does not match y_zero_point type UINT8").
_DISABLED = ["QDQPropagationTransformer"]


# CPU flags under which ONNX Runtime's x86 int8 GEMMs multiply-accumulate exactly in 32 bits.
_X86_INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.cache
def int8_kernels_exact(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether ONNX Runtime's fused int8 kernels (Q/DQ MatMul/Gemm turned into integer GEMMs) give exact
    integer sums on this CPU. On x86-64 without VNNI, ORT's u8 x s8 GEMM adds pairs of products in 16
    bits with saturation (``pmaddubsw``; ORT's quantization docs advise 7-bit ``reduce_range`` there),
    so W8A8 logits drift from the integer reference: measured on an AVX2-only AMD EPYC, 4e-4 (Mamba-1)
    to 5e-2 (Mamba-2) relative error, against 1e-7 with the fusion off. Arm (sdot/smmla) and x86 with
    VNNI or AMX are exact; an x86 CPU whose flags cannot be read counts as inexact."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return True
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    if _X86_INT8_DOT_FLAGS.isdisjoint(flags):
        log.info("this x86 CPU has none of %s: quantized graphs run their Q/DQ nodes unfused in ONNX Runtime "
                 "(its int8 GEMMs would saturate here)", ", ".join(sorted(_X86_INT8_DOT_FLAGS)))
        return False
    return True


def _session_options(threads: int | None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # constant-folded helper initializers make ORT warn at level 2
    # DequantizeLinear(int4 blocks) + MatMul fuses into MatMulNBits, which by default (level 4)
    # rounds float activations to int8 inside; level 1 keeps float32 compute, as the model has it.
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if not int8_kernels_exact():
        # Q/DQ graphs then run as written: the codes dequantized, then float32 MatMul, which matches the
        # integer reference to float32 rounding (docs/export.md)
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    if threads is not None:
        so.intra_op_num_threads = threads
    return so


class OrtBackend:
    name = "ort"

    def __init__(self, onnx_dir: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int | None = None) -> None:
        self.dir = Path(onnx_dir)
        self.manifest = read_manifest(self.dir)
        self.config: MambaConfig = config_from_hf(self.manifest["config"], self.dir / "manifest.json")
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise BackendUnavailable(f"ONNX Runtime here has no {missing} (available: {ort.get_available_providers()})")
        self.providers = list(providers)
        self._threads = threads
        self.sessions: dict[str, ort.InferenceSession] = {
            kind: self._open(kind, spec) for kind, spec in sorted(self.manifest["graphs"].items())
        }
        self._states = self.manifest["states"]

    def _open(self, kind: str, spec: dict[str, Any]) -> ort.InferenceSession:
        file = self.dir / spec["file"]
        if not file.is_file():
            raise ConfigError(f"{file}: listed in manifest.json but missing")
        data = file.read_bytes()
        expected = self.manifest.get("files", {}).get(spec["file"])
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise ConfigError(f"{file}: sha256 differs from manifest.json (the export directory was modified)")
        so = _session_options(self._threads)
        if spec["custom_ops"]:
            from edgessm.runtime.ort_ops import load_for_ort

            data = load_for_ort(file)
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.dir))
            return ort.InferenceSession(data, so, providers=self.providers, disabled_optimizers=_DISABLED)
        return ort.InferenceSession(str(file), so, providers=self.providers, disabled_optimizers=_DISABLED)

    def _session(self, kind: str) -> ort.InferenceSession:
        if kind not in self.sessions:
            raise ConfigError(f"{self.dir}: this export has no {kind} graph (exported: {sorted(self.sessions)})")
        return self.sessions[kind]

    def _split_states(self, outputs: list[np.ndarray], names: list[str]) -> States:
        by_name = dict(zip(names, outputs))
        return [LayerState(by_name[s["conv"]["output"]], by_name[s["ssm"]["output"]]) for s in self._states]

    def prefill(self, tokens: np.ndarray) -> tuple[np.ndarray, States]:
        """tokens [B, T] int64 → (logits [B, T, vocab] float32, states)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 2 or tokens.shape[1] == 0:
            raise ValueError(f"prefill tokens must be [batch, length>=1], got shape {tokens.shape}")
        session = self._session("prefill")
        names = [o.name for o in session.get_outputs()]
        outputs = session.run(names, {"tokens": tokens})
        return outputs[names.index("logits")], self._split_states(outputs, names)

    def step(self, token: np.ndarray, states: States) -> tuple[np.ndarray, States]:
        """token [B] int64 → (logits [B, vocab] float32, new states)."""
        token = np.asarray(token, dtype=np.int64)
        if token.ndim != 1:
            raise ValueError(f"decode token must be [batch], got shape {token.shape}")
        if len(states) != len(self._states):
            raise ValueError(f"expected states of {len(self._states)} layers, got {len(states)}")
        feed: dict[str, np.ndarray] = {"token": token}
        for spec, st in zip(self._states, states):
            feed[spec["conv"]["input"]] = np.ascontiguousarray(st.conv, dtype=np.float32)
            feed[spec["ssm"]["input"]] = np.ascontiguousarray(st.ssm, dtype=np.float32)
        session = self._session("decode")
        names = [o.name for o in session.get_outputs()]
        outputs = session.run(names, feed)
        return outputs[names.index("logits")], self._split_states(outputs, names)

    def zero_states(self, batch: int) -> States:
        """States of an empty prefix (decode from scratch without a prefill)."""
        conv, ssm = self.config.state_shapes(batch)
        return [LayerState(np.zeros(conv, np.float32), np.zeros(ssm, np.float32)) for _ in range(self.config.n_layer)]
