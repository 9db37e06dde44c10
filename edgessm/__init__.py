"""edgessm: Mamba-family models to quantized ONNX / TensorRT engines for NVIDIA edge GPUs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgessm")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

from edgessm.config import MambaConfig, load_config
from edgessm.models import MambaLM, load_model, save_model
from edgessm.quant import load_quantized

__all__ = ["MambaConfig", "MambaLM", "load_config", "load_model", "load_quantized", "save_model", "__version__"]
