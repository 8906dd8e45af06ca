"""The engine: runs a compression method inside a transformers decoder through forward hooks.

handle.py: ``apply`` and the ``Handle`` (hooks, stages, positions); state.py: per-call state and the record a
compressed cache carries; masks.py: attention masks of shortened layers (pure functions); stats.py: what a
prefill kept.
"""

from ..methods.base import StageContext
from .handle import SUPPORTED_ATTENTION, Handle, apply
from .state import SequenceRecord, attach_record, record_of
from .stats import PrefillStats

__all__ = ["Handle", "apply", "PrefillStats", "StageContext", "SUPPORTED_ATTENTION", "SequenceRecord",
           "record_of", "attach_record"]
