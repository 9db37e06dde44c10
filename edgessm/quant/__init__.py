"""Post-training quantization of Mamba models: Quamba (W8A8) and Quamba2 (W4A8, W4A16).

See docs/quantization.md for the recipes, the on-disk format and the execution modes.
"""

from edgessm.quant.api import quantize_checkpoint
from edgessm.quant.quantize import quantize_model, set_quant_mode
from edgessm.quant.recipe import RECIPES, Recipe, get_recipe
from edgessm.quant.serialize import load_quantized, save_quantized

__all__ = [
    "RECIPES",
    "Recipe",
    "get_recipe",
    "load_quantized",
    "quantize_checkpoint",
    "quantize_model",
    "save_quantized",
    "set_quant_mode",
]
