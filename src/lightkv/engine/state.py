"""Per-call state of the engine, and the record a compressed cache carries between calls.

One module-level ``ContextVar`` maps each active handle to the state of the forward call it is running in this
thread / context: a ``PrefillState`` while a prompt with images is prefilled, a ``DecodeState`` while a
compressed cache is extended. Nothing is kept per handle between calls: what decoding needs lives on the cache
itself (``SequenceRecord``, see ``record_of``), so a deep-copied cache continues like the original and any
handle on a model of the same depth can continue it.

Sequence bookkeeping at prefill (B rows, N original tokens, M current slots):
  orig_index (B, M): original position of each current slot; valid (B, M): False on padding slots;
  slot_of_orig (B, N): current slot holding (or absorbing) each original token.
"""

from __future__ import annotations

import contextvars
import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..adapters import VisionLayout

if TYPE_CHECKING:
    from .handle import Handle

__all__ = ["SequenceRecord", "PrefillState", "DecodeState", "current_state", "set_state", "clear_state",
           "record_of", "attach_record", "detach_record"]

# handle -> state of the call it is running; one variable for every handle (a ContextVar per handle would never
# be freed, and would make a patched model impossible to deep-copy)
_CALLS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("lightkv_calls", default=None)

_RECORD_ATTR = "_lightkv_record"


def current_state(handle: "Handle") -> Any:
    calls = _CALLS.get()
    return None if calls is None else calls.get(handle)


def set_state(handle: "Handle", state: Any) -> None:
    calls = dict(_CALLS.get() or {})
    calls[handle] = state
    _CALLS.set(calls)


def clear_state(handle: "Handle") -> None:
    calls = _CALLS.get()
    if calls and handle in calls:
        calls = dict(calls)
        del calls[handle]
        _CALLS.set(calls or None)


def _any_decode_active() -> bool:
    return any(isinstance(s, DecodeState) for s in (_CALLS.get() or {}).values())


@dataclass
class SequenceRecord:
    """Carried by a compressed cache: which original prefill positions each shortened layer holds."""

    prefill_length: int
    num_layers: int
    segments: list[tuple[torch.Tensor, torch.Tensor]]  # per stage: (orig_index (B, M), valid (B, M))
    layer_segment: dict[int, int]  # shortened layer -> index into segments
    # per segment: no padding slot at all (read once at prefill, so decode steps need no device sync)
    segment_unpadded: list[bool] = field(default_factory=list)


def record_of(cache: Any) -> SequenceRecord | None:
    """The record of a cache compressed by lightkv (None for any other cache)."""
    return getattr(cache, _RECORD_ATTR, None) if cache is not None else None


def _guarded_update(self: Any, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
    """``update`` of a shortened cache layer: only a model with lightkv applied can extend it."""
    if not _any_decode_active():
        raise ValueError(
            "lightkv: this cache was compressed by lightkv (its layers hold different numbers of tokens) and can "
            "only be continued by a model with lightkv applied (lightkv.apply(model, method)); the handle that "
            "compressed it was removed or the cache was passed to another model")
    return type(self).update(self, key_states, value_states, *args, **kwargs)


def attach_record(cache: Any, record: SequenceRecord) -> None:
    """Store ``record`` on ``cache`` and guard its shortened layers against continuation without lightkv."""
    setattr(cache, _RECORD_ATTR, record)
    for layer in record.layer_segment:
        cache_layer = cache.layers[layer]
        # an instance attribute: deep copies rebind it to the copied layer, ``detach_record`` deletes it
        cache_layer.update = types.MethodType(_guarded_update, cache_layer)


def detach_record(cache: Any) -> None:
    """Forget the record of a cache that was reset (its layers are empty again)."""
    if record_of(cache) is None:
        return
    delattr(cache, _RECORD_ATTR)
    for cache_layer in getattr(cache, "layers", []):
        cache_layer.__dict__.pop("update", None)


class PrefillState:
    def __init__(self, layout: VisionLayout, attention_mask: torch.Tensor | None, N: int,
                 passthrough: bool = False):
        self.passthrough = passthrough  # text-only prefill: layers run untouched, only stats are taken
        self.layout = layout
        B = layout.vision_mask.shape[0]
        device = layout.vision_mask.device
        self.N = N
        self.orig_index = torch.arange(N, device=device).expand(B, N)
        self.valid = attention_mask.bool() if attention_mask is not None else \
            torch.ones(B, N, dtype=torch.bool, device=device)
        self.slot_of_orig = self.orig_index
        self.slot_maps: list[torch.Tensor] = [self.orig_index]  # slot_of_orig before the first and after each stage
        self.shortened = False
        self.next_layer = 0  # decoder layers run in order: a layer below this one means a new, direct call
        self.full_kwargs: dict | None = None  # kwargs the first hooked layer received (full length)
        self.segment_kwargs: dict | None = None  # the shortened kwargs given to the layer running now
        self.kind_kwargs: dict[tuple, dict] = {}  # per layer kind: shortened kwargs of the current segment
        self.segments: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.segment_unpadded: list[bool] = []
        self.cache = None
        self.capture: dict[str, torch.Tensor] = {}
        self.capture_layer: int | None = None
        self.stage_position_embeddings = None
        self.vision_counts: list[torch.Tensor] = [(layout.vision_mask & self.valid).sum(1)]
        self.token_counts: list[torch.Tensor] = [self.valid.sum(1)]
        self.token_state: dict[str, torch.Tensor] = {}
        self.method_state: dict[str, Any] = {}  # filled by the method's own hooks during this call
        self.input_position = torch.cumsum(self.valid.long(), dim=1) - 1  # (B, N) rank among real tokens
        self.kept_positions: list[list[list[int]]] = [[] for _ in range(B)]
        self.merge_maps: list[torch.Tensor] = []


class DecodeState:
    def __init__(self, record: SequenceRecord, cache: Any, padding_mask: torch.Tensor | None = None):
        self.record = record
        self.cache = cache
        self.padding_mask = padding_mask  # the call's 2-D attention mask (B, all tokens so far), if any
        self.masks: dict[tuple, Any] = {}  # (segment, window, cached slots) -> mask of this call
        self.next_layer = 0
