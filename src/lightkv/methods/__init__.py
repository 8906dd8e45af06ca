"""Compression methods: one small frozen dataclass per file, each registering itself (``registry``).

A new method is one file here and one import line below; see "Adding a method" in README.md.
"""

from .base import (POSITION_MODES, MergeResult, Method, ScorePruneMethod, StageContext, StageResult,
                   WindowMergeMethod, predict_kept_per_layer, predict_retained_fraction, retained_fraction)
from .registry import MethodEntry, get_method, method_names, register_method
from .spec import MethodSpec, build_method, parse_method_spec, split_method_list

# the built-in methods; importing a module registers its method
from .lightkv import LightKV
from .tome import ToMe
from .random import Random
from .fastv import FastV
from .pdrop import PDrop
from .sparsevlm import SparseVLM
from .visionzip import VisionZip
from .dart import DART

__all__ = ["Method", "StageContext", "StageResult", "MergeResult", "ScorePruneMethod", "WindowMergeMethod",
           "POSITION_MODES", "LightKV", "ToMe", "Random", "FastV", "PDrop", "SparseVLM", "VisionZip", "DART",
           "register_method", "get_method", "method_names", "MethodEntry", "MethodSpec", "parse_method_spec",
           "split_method_list", "build_method", "retained_fraction", "predict_kept_per_layer",
           "predict_retained_fraction"]
