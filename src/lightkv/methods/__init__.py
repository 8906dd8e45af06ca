"""Compression methods: one small dataclass per file, all subclasses of ``Method``."""

from .base import POSITION_MODES, Method
from .dart import DART
from .fastv import FastV
from .lightkv import LightKV, predict_retained_fraction
from .pdrop import PDrop
from .random import Random
from .sparsevlm import SparseVLM
from .tome import ToMe
from .visionzip import VisionZip

__all__ = ["Method", "POSITION_MODES", "LightKV", "predict_retained_fraction", "ToMe", "Random", "FastV", "PDrop",
           "DART", "SparseVLM", "VisionZip"]
