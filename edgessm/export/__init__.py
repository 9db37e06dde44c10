"""ONNX export: prefill/decode graphs with `edgessm` custom ops (plugin) or standard ops (portable).

See docs/export.md for the graph layout and the choices behind it, docs/onnx_ops.md for the ops.
"""

from edgessm.export.onnx_export import ExportOptions, ExportResult, export_onnx, model_hash, read_manifest

__all__ = ["ExportOptions", "ExportResult", "export_onnx", "model_hash", "read_manifest"]
