"""Reference PyTorch Mamba-1 / Mamba-2 models (numerically matched to Hugging Face transformers)."""

from edgessm.models.lm import MambaLM, States
from edgessm.models.loading import load_model, save_model
from edgessm.models.sites import SITE_NAMES, LayerState

__all__ = ["MambaLM", "States", "LayerState", "SITE_NAMES", "load_model", "save_model"]
