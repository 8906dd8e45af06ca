"""lightkv: a lighter KV cache for vision-language models (LightKV, TMLR 2026) on HuggingFace transformers.

    handle = lightkv.apply(model, lightkv.LightKV(layers=[12, 18, 24], windows=[4, 2, 1], ratios=[0.5] * 3))
    out = model.generate(**inputs)
    handle.stats.mean_retained_fraction
    handle.remove()
"""

from .methods import (DART, FastV, LightKV, Method, MethodSpec, PDrop, Random, ScorePruneMethod, SparseVLM,
                      StageContext, StageResult, ToMe, VisionZip, WindowMergeMethod, build_method, get_method,
                      method_names, parse_method_spec, predict_kept_per_layer, predict_retained_fraction,
                      register_method, retained_fraction, split_method_list)
from .budget import BudgetMatch, match_budget, register_budget
from .adapters import SUPPORTED_FAMILIES, register_adapter
from .engine import Handle, PrefillStats, apply

__all__ = ["apply", "Handle", "PrefillStats", "SUPPORTED_FAMILIES", "register_adapter",
           "Method", "StageContext", "StageResult", "ScorePruneMethod", "WindowMergeMethod",
           "LightKV", "ToMe", "Random", "FastV", "PDrop", "DART", "SparseVLM", "VisionZip",
           "register_method", "get_method", "method_names", "MethodSpec", "parse_method_spec", "split_method_list",
           "build_method", "retained_fraction", "match_budget", "BudgetMatch", "register_budget",
           "predict_retained_fraction", "predict_kept_per_layer"]
__version__ = "0.1.0"
