"""lightkv: a lighter KV cache for vision-language models (LightKV, TMLR 2026) on HuggingFace transformers.

    handle = lightkv.apply(model, lightkv.LightKV(layers=[12, 18, 24], windows=[4, 2, 1], ratios=[0.5] * 3))
    out = model.generate(**inputs)
    handle.stats.mean_retained_fraction
    handle.remove()
"""

from typing import TYPE_CHECKING, Any

# name -> submodule that defines it. Loaded on first use, so that ``import lightkv`` (and the command line's
# ``--help``) does not import torch or transformers.
_EXPORTS = {
    **dict.fromkeys(["DART", "FastV", "LightKV", "Method", "MethodSpec", "PDrop", "Random", "ScorePruneMethod",
                     "SparseVLM", "StageContext", "StageResult", "ToMe", "VisionZip", "WindowMergeMethod",
                     "build_method", "get_method", "method_names", "parse_method_spec", "predict_kept_per_layer",
                     "predict_retained_fraction", "register_method", "retained_fraction", "split_method_list"],
                    "methods"),
    **dict.fromkeys(["BudgetMatch", "match_budget", "register_budget"], "budget"),
    **dict.fromkeys(["SUPPORTED_FAMILIES", "register_adapter"], "adapters"),
    **dict.fromkeys(["Handle", "PrefillStats", "apply"], "engine"),
    **dict.fromkeys(["Calibration", "calibrate"], "calibration"),
}

if TYPE_CHECKING:
    from .adapters import SUPPORTED_FAMILIES, register_adapter
    from .budget import BudgetMatch, match_budget, register_budget
    from .calibration import Calibration, calibrate
    from .engine import Handle, PrefillStats, apply
    from .methods import (DART, FastV, LightKV, Method, MethodSpec, PDrop, Random, ScorePruneMethod, SparseVLM,
                          StageContext, StageResult, ToMe, VisionZip, WindowMergeMethod, build_method, get_method,
                          method_names, parse_method_spec, predict_kept_per_layer, predict_retained_fraction,
                          register_method, retained_fraction, split_method_list)


def __getattr__(name: str) -> Any:
    import importlib
    import importlib.util

    module = _EXPORTS.get(name)
    if module is None:
        if importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module 'lightkv' has no attribute {name!r}")
        return importlib.import_module(f".{name}", __name__)  # a submodule, e.g. lightkv.bundled
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = ["apply", "Handle", "PrefillStats", "SUPPORTED_FAMILIES", "register_adapter",
           "Method", "StageContext", "StageResult", "ScorePruneMethod", "WindowMergeMethod",
           "LightKV", "ToMe", "Random", "FastV", "PDrop", "DART", "SparseVLM", "VisionZip",
           "register_method", "get_method", "method_names", "MethodSpec", "parse_method_spec", "split_method_list",
           "build_method", "retained_fraction", "match_budget", "BudgetMatch", "register_budget",
           "predict_retained_fraction", "predict_kept_per_layer", "calibrate", "Calibration"]
__version__ = "0.1.0"
