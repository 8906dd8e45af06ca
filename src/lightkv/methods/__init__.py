"""Compression methods: one small dataclass per file, all subclasses of ``Method``."""

from .base import POSITION_MODES, Method
from .lightkv import LightKV, predict_retained_fraction

__all__ = ["Method", "POSITION_MODES", "LightKV", "predict_retained_fraction"]
