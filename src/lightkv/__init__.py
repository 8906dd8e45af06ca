"""lightkv: a lighter KV cache for vision-language models (LightKV, TMLR 2026) on HuggingFace transformers.

    handle = lightkv.apply(model, lightkv.LightKV(layers=[12, 18, 24], windows=[4, 2, 1], ratios=[0.5] * 3))
    out = model.generate(**inputs)
    handle.stats.mean_retained_fraction
    handle.remove()
"""

from .adapters import SUPPORTED_FAMILIES
from .engine import Handle, PrefillStats, apply
from .budget import BudgetMatch, match_budget, predict_kept_per_layer, register_budget
from .methods import (DART, FastV, LightKV, Method, PDrop, Random, SparseVLM, ToMe, VisionZip,
                      predict_retained_fraction)

__all__ = ["apply", "Handle", "PrefillStats", "LightKV", "Method", "predict_retained_fraction",
           "SUPPORTED_FAMILIES", "ToMe", "Random", "FastV", "PDrop", "DART", "match_budget", "BudgetMatch",
           "register_budget", "predict_kept_per_layer", "SparseVLM", "VisionZip"]
__version__ = "0.1.0"
