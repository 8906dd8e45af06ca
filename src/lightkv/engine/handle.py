"""``apply`` and the ``Handle``: the forward hooks that run a compression method inside a transformers decoder.

Hooks (no modeling-file copies): a pre/post hook on the adapter's entry module opens and closes the per-call
state (``state.py``); pre/post hooks on the decoder layers from the first stage on gather positions and masks
for the shortened sequence (``masks.py``) and run the method's stages; at the last layer the output is put
back at full length, so logits (and hidden states) have the prompt's length.

A stage at layer -1 runs in the pre-hook of decoder layer 0, on the input embeddings: every layer then holds
the short sequence, so at decode steps the engine supplies position ids (when the caller gives none) and
builds every layer's mask from causality in original positions and the call's 2-D padding mask.

Hybrid decoders (Gemma 3, Aya Vision: ``text_config.layer_types`` mixes sliding-window and full attention): the
model gives each layer its own type's full-length mask and rotary, and each is gathered by the kept original
positions at the first shortened layer of that kind, so windows and bidirectional image blocks stay defined in
original positions. At decode steps a shortened layer's mask is built from causality (and the window) in original
positions over the slots its cache layer holds: a ``DynamicSlidingWindowLayer`` keeps its last window - 1 slots.

Hooks are small callable objects holding the handle (not closures), so ``copy.deepcopy`` of a patched model
gives a patched copy whose hooks act on the copy.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn

from ..adapters import Adapter, VisionLayout, get_adapter
from ..core import compact_indices
from ..methods import Method
from ..methods.base import StageContext
from ..methods.spec import MethodSpec, build_method
from .masks import decode_mask, gather_seq, prefill_mask, to_attention_format
from .state import (DecodeState, PrefillState, SequenceRecord, attach_record, clear_state, current_state,
                    detach_record, record_of, set_state)
from .stats import PrefillStats, prefill_stats

__all__ = ["Handle", "apply", "SUPPORTED_ATTENTION"]

logger = logging.getLogger("lightkv")

SUPPORTED_ATTENTION = ("sdpa", "eager")
# decoder layer types (``text_config.layer_types``) whose masks the engine can rebuild for a shortened sequence
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
_CACHE_KWARGS = ("cache", "past_key_values")
_MARK = "_lightkv_handle"  # set on the model and on its language model while a handle is active


def _layer_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_output(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _cache_in(kwargs: dict) -> Any:
    return next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)


class _Hook:
    """A forward (pre-)hook that calls ``handle.<name>(*args, *hook_args)``, timed while ``handle.timer`` is set."""

    def __init__(self, handle: "Handle", name: str, section: str, *args: Any):
        self.handle, self.name, self.section, self.args = handle, name, section, args

    def __call__(self, *hook_args: Any) -> Any:
        fn = getattr(self.handle, self.name)
        timer = self.handle.timer
        if timer is None:
            return fn(*self.args, *hook_args)
        start = timer.start()
        try:
            return fn(*self.args, *hook_args)
        finally:
            timer.stop(self.section, start)


class Handle:
    """Returned by ``apply``: holds the hooks, removes them, reports the last prefill's stats."""

    def __init__(self, model: nn.Module, method: Method, adapter: Adapter, record: bool = False):
        self.model = model
        self.method = method
        self.adapter = adapter
        # opt-in diagnostics: stats.kept_positions and stats.merge_maps (per-sample host reads at every stage)
        self.record = bool(record)
        self.num_layers = len(adapter.decoder_layers)
        method.validate_for(self.num_layers)
        self.stage_layers = tuple(method.stage_layers)
        adapter.validate_stage_layers(self.stage_layers)
        # per decoder layer: (layer type, sliding window or None); layers of one kind share masks and rotary
        self.layer_kinds = layer_kinds(adapter.text_config, self.num_layers, max(0, self.stage_layers[0]))
        self.stage_of_layer = {layer: s for s, layer in enumerate(self.stage_layers)}
        self._hooks: list[Any] = []
        self.stats: PrefillStats | None = None
        # optional overhead timer (lightkv.perf.OverheadTimer or anything with start()/stop(section, start)):
        # when set, every hook below is timed; None (the default) costs one attribute test per hook call
        self.timer: Any = None
        self._entry_signature = inspect.signature(adapter.entry_module.forward)
        self._install()

    # -- lifecycle ------------------------------------------------------------------------------------------
    def _install(self) -> None:
        entry = self.adapter.entry_module
        hooks = self._hooks
        hooks.append(entry.register_forward_pre_hook(_Hook(self, "_entry_pre", "entry"), with_kwargs=True))
        hooks.append(entry.register_forward_hook(_Hook(self, "_entry_post", "entry"), with_kwargs=True,
                                                 always_call=True))
        layers = self.adapter.decoder_layers
        for index in range(max(0, self.stage_layers[0]), self.num_layers):
            layer = layers[index]
            hooks.append(layer.register_forward_pre_hook(_Hook(self, "_layer_pre", "layer_pre", index),
                                                         with_kwargs=True))
            hooks.append(layer.register_forward_hook(_Hook(self, "_layer_post", "layer_post", index)))
        if self.method.needs_attention:
            for index in (i for i in self.stage_layers if i >= 0):  # a stage -1 has no decoder attention
                layer = layers[index]
                hooks.append(self.adapter.query_projection(layer).register_forward_hook(
                    _Hook(self, "_capture", "capture", index, "q")))
                hooks.append(self.adapter.key_projection(layer).register_forward_hook(
                    _Hook(self, "_capture", "capture", index, "k")))
        try:  # last, so that the method's hooks on shared modules (e.g. the entry) run after the engine's
            hooks.extend(self.method.install(self))
        except BaseException:
            self.remove()
            raise
        for owner in (self.model, self.adapter.language_model):
            setattr(owner, _MARK, self)

    def remove(self) -> None:
        """Remove every hook; the model behaves exactly as before ``apply``."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        clear_state(self)
        for owner in (self.model, self.adapter.language_model):
            if owner.__dict__.get(_MARK) is self:
                delattr(owner, _MARK)

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def prefill_state(self) -> "PrefillState | None":
        """State of the prefill in progress in this thread/context (None outside one); for method hooks."""
        state = current_state(self)
        return state if isinstance(state, PrefillState) else None

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    # -- entry module ---------------------------------------------------------------------------------------
    def _call_arguments(self, args: tuple, kwargs: dict) -> dict:
        if not args:
            return kwargs
        bound = self._entry_signature.bind_partial(*args, **kwargs)
        merged = dict(bound.arguments)
        merged.update(merged.pop("kwargs", {}) or {})
        return merged

    def _entry_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        clear_state(self)
        call = self._call_arguments(args, kwargs)
        input_ids, inputs_embeds = call.get("input_ids"), call.get("inputs_embeds")
        if input_ids is None and inputs_embeds is None:
            return None
        ref = input_ids if input_ids is not None else inputs_embeds
        cache = _cache_in(call)
        record = record_of(cache)
        if record is not None and cache.get_seq_length() == 0:
            detach_record(cache)  # the cache was reset: it starts over
            record = None
        if record is not None and not _has_visual_inputs(call):
            # continuing a compressed cache without pixels or encoded features: image token ids (if any) are
            # embedded as text, so no layout is asked for (its ``any()`` would sync the device at every step)
            return self._start_decode(record, cache, call, args, kwargs, ref)
        layout = self.adapter.vision_layout(input_ids, inputs_embeds, call)
        if layout is None:
            if record is not None:
                return self._start_decode(record, cache, call, args, kwargs, ref)
            if cache is None or cache.get_seq_length() == 0:
                # a prefill without images: nothing to compress, but stats still describe this call
                B, N = ref.shape[:2]
                empty = torch.zeros(B, N, dtype=torch.bool, device=ref.device)
                none = torch.full((B, N), -1, dtype=torch.long, device=ref.device)
                layout = VisionLayout(empty, none, none.clamp(min=0), none.clamp(min=0),
                                      torch.zeros(0, 2, dtype=torch.long, device=ref.device))
                set_state(self, PrefillState(layout, call.get("attention_mask"), N, passthrough=True))
            return None
        if self.model.training or self.adapter.language_model.training:
            raise RuntimeError("lightkv: the model is in training mode; LightKV is an inference method. "
                               "Call model.eval() first, or remove() the handle to train.")
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(
                f"lightkv: the cache already holds {cache.get_seq_length()} tokens. Compressing a prompt with images "
                "on top of a cached prefix (multi-turn with new images) is not supported; start from an empty "
                "cache (text-only follow-up turns on a compressed cache are supported).")
        attn_impl = self.adapter.attn_implementation()
        if attn_impl not in SUPPORTED_ATTENTION:
            raise ValueError(f"lightkv supports attn_implementation in {SUPPORTED_ATTENTION}, got {attn_impl!r}")
        attention_mask = call.get("attention_mask")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("lightkv needs a 2-D padding attention_mask (batch, seq_len) or None, got shape "
                             f"{tuple(attention_mask.shape)}")
        set_state(self, PrefillState(layout, attention_mask, ref.shape[1]))
        return None

    def _start_decode(self, record: SequenceRecord, cache: Any, call: dict, args: tuple, kwargs: dict,
                      ref: torch.Tensor) -> Any:
        if record.num_layers != self.num_layers:
            raise ValueError(f"lightkv: the cache was compressed on a model of {record.num_layers} decoder layers, "
                             f"this one has {self.num_layers}")
        B = ref.shape[0]
        if record.segments[0][0].shape[0] != B:
            raise ValueError(f"lightkv: the cache was compressed for batch size {record.segments[0][0].shape[0]}, "
                             f"got {B}")
        _check_lengths(record, cache)
        padding = call.get("attention_mask")
        padding = padding if isinstance(padding, torch.Tensor) and padding.dim() == 2 else None
        set_state(self, DecodeState(record, cache, padding))
        if 0 in record.layer_segment and call.get("position_ids") is None:
            # no layer holds the full prefill (a stage -1), so the model would count positions from a short
            # cache: give the new tokens the positions they have in the uncompressed sequence
            start = record.prefill_length + _decoded_tokens(record, cache, 0)
            positions = self.adapter.decode_position_ids(start, ref.shape[1], B, ref.device)
            return args, {**kwargs, "position_ids": positions}
        return None

    def _entry_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        state = current_state(self)
        clear_state(self)
        if not isinstance(state, PrefillState) or output is None:
            return
        if state.cache is not None and state.segments:
            layer_segment = {layer: sum(1 for s in self.stage_layers if s < layer) - 1
                             for layer in range(self.stage_layers[0] + 1, self.num_layers)}
            attach_record(state.cache, SequenceRecord(state.N, self.num_layers, state.segments, layer_segment,
                                                      state.segment_unpadded))
        if state.shortened and getattr(output, "hidden_states", None) is not None:
            output.hidden_states = self._full_length_hidden_states(state, output.hidden_states)
        self.stats = prefill_stats(state, self.num_layers, self.stage_layers, record=self.record)

    def _full_length_hidden_states(self, state: PrefillState, hidden_states: tuple) -> tuple:
        """``output_hidden_states``: every layer's states back at the prompt's length, like the logits.

        Element i > 0 is the output of layer i - 1, read before or after the engine's stage at that layer (it
        depends on the order in which transformers' recording hook and the engine's hook run): it is expanded
        with the slot map of the layer's input segment or, when its length says so, of the segment after it.
        A merged token's position reads the state of the token it was merged into.
        """
        lengths = [state.N] + [orig_index.shape[1] for orig_index, _ in state.segments]  # per segment
        out = []
        for i, hidden in enumerate(hidden_states):
            if hidden is None or hidden.dim() != 3 or hidden.shape[1] == state.N:
                out.append(hidden)
                continue
            layer = max(i - 1, 0)
            segment = sum(1 for s in self.stage_layers if s < layer)
            candidates = [segment, segment + 1] if i > 0 else [segment]
            slot_map = next((state.slot_maps[s] for s in candidates
                             if s < len(lengths) and lengths[s] == hidden.shape[1]), None)
            out.append(hidden if slot_map is None else gather_seq(hidden, slot_map, dim=1))
        return tuple(out)

    # -- q/k capture ----------------------------------------------------------------------------------------
    def _capture(self, index: int, name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        state = current_state(self)
        if isinstance(state, PrefillState) and state.capture_layer == index:
            state.capture[name] = output

    def _attention(self, state: PrefillState, layer_index: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        if "q" not in state.capture or "k" not in state.capture:
            raise RuntimeError("lightkv: the queries/keys of the stage layer were not captured")
        layer = self.adapter.decoder_layers[layer_index]
        return self.adapter.queries_keys(layer, state.capture["q"], state.capture["k"], state.stage_position_embeddings)

    # -- decoder layers -------------------------------------------------------------------------------------
    def _in_order(self, state: Any, index: int) -> bool:
        """Whether ``state`` belongs to the call now running layer ``index``. Layers run in order within one
        call; a layer at or below one already run means a new call that did not pass the entry module (e.g. the
        language model called directly after an interrupted forward left its state behind): forget the state."""
        if index < state.next_layer:
            clear_state(self)
            return False
        state.next_layer = index + 1
        return True

    def _layer_pre(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        state = current_state(self)
        if isinstance(state, PrefillState):
            if not self._in_order(state, index):
                return None
            if state.passthrough:
                state.cache = state.cache or _cache_in(kwargs)
                return None
            return self._prefill_layer_pre(state, index, args, kwargs)
        if isinstance(state, DecodeState) and self._in_order(state, index) and index in state.record.layer_segment:
            return self._decode_layer_pre(state, index, args, kwargs)
        return None

    def _layer_post(self, index: int, module: nn.Module, args: tuple, output: Any) -> Any:
        state = current_state(self)
        if not isinstance(state, PrefillState) or state.passthrough:
            return None
        hidden = _layer_output(output)
        if index in self.stage_of_layer:
            hidden = self._run_stage(state, index, hidden)
        if index == self.num_layers - 1 and state.shortened:
            hidden = gather_seq(hidden, state.slot_of_orig, dim=1)
        return _replace_output(output, hidden)

    def _prefill_layer_pre(self, state: PrefillState, index: int, args: tuple, kwargs: dict) -> Any:
        if state.cache is None:
            state.cache = _cache_in(kwargs)
            if state.cache is not None:
                _check_cache(state.cache)
        # the model gives every layer its own type's full-length mask and rotary (Gemma 3: sliding / full)
        full = {k: kwargs.get(k) for k in ("attention_mask", "position_embeddings", "position_ids")}
        if state.full_kwargs is None:
            state.full_kwargs = full
        if index == 0 and -1 in self.stage_of_layer:
            # a stage before the decoder: shorten the input embeddings, so every layer caches the short sequence
            hidden = self._run_stage(state, -1, args[0] if args else kwargs["hidden_states"])
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs = {**kwargs, "hidden_states": hidden}
        if state.shortened:
            kind = self.layer_kinds[index]
            segment_kwargs = state.kind_kwargs.get(kind)
            if segment_kwargs is None:
                hidden = args[0] if args else kwargs["hidden_states"]
                segment_kwargs = state.kind_kwargs[kind] = self._segment_kwargs(state, hidden, full, kind)
            state.segment_kwargs = segment_kwargs
            kwargs = {**kwargs, **segment_kwargs}
        if index in self.stage_of_layer:
            state.capture_layer = index
            state.capture = {}
            state.stage_position_embeddings = kwargs.get("position_embeddings")
        return args, kwargs

    def _stage_context(self, state: PrefillState, hidden: torch.Tensor, index: int) -> StageContext:
        layout, oi, valid = state.layout, state.orig_index, state.valid
        return StageContext(
            layer_index=index, hidden=hidden, token_valid=valid,
            vision_mask=layout.vision_mask.gather(1, oi) & valid,
            image_index=torch.where(valid, layout.image_index.gather(1, oi), -1),
            grid_rows=layout.grid_rows.gather(1, oi), grid_cols=layout.grid_cols.gather(1, oi),
            grid_hw=layout.grid_hw,
            # position of each slot among its row's real input tokens (batch-independent, unlike slot or column)
            input_positions=state.input_position.gather(1, oi),
            token_state=state.token_state, method_state=state.method_state,
            attention_fn=lambda: self._attention(state, index))

    def _run_stage(self, state: PrefillState, index: int, hidden: torch.Tensor) -> torch.Tensor:
        stage = self.stage_of_layer[index]
        result = self.method.reduce(self._stage_context(state, hidden, index), stage)
        state.capture, state.capture_layer = {}, None
        keep = result.keep & state.valid  # padding never survives a stage
        # kept tokens per row, giving the new length and whether any row is padded: the method's own read when it
        # gives them (a windowed merge), else the one host read of the stage
        counts = keep.sum(dim=1)
        host_counts = result.kept_counts if result.kept_counts is not None else counts.tolist()
        M = max(host_counts, default=0)
        unpadded = min(host_counts, default=0) == M
        source, valid, new_slot = compact_indices(keep, _destination_of_dropped(keep, result.destination),
                                                  length=M, counts=counts)
        for name, value in state.token_state.items():
            if value.shape[:2] != keep.shape:
                raise ValueError(f"lightkv: token_state[{name!r}] has shape {tuple(value.shape)}, expected "
                                 f"(batch, current tokens) = {tuple(keep.shape)} at its first two dims")
            state.token_state[name] = gather_seq(value, source, dim=1)
        state.orig_index = state.orig_index.gather(1, source)
        state.valid = valid
        state.slot_of_orig = new_slot.gather(1, state.slot_of_orig)
        state.slot_maps.append(state.slot_of_orig)
        state.shortened = True
        state.segments.append((state.orig_index, state.valid))
        state.segment_unpadded.append(unpadded)
        kept_vision = state.layout.vision_mask.gather(1, state.orig_index) & valid
        state.vision_counts.append(kept_vision.sum(1))
        state.token_counts.append(valid.sum(1))
        if self.record:  # opt-in diagnostics: per-sample host reads
            state.merge_maps.append(state.orig_index.gather(1, state.slot_of_orig))
            positions = state.input_position.gather(1, state.orig_index)
            for b in range(keep.shape[0]):
                state.kept_positions[b].append(positions[b][kept_vision[b]].tolist())
        state.kind_kwargs = {}  # each layer kind's kwargs for the new segment, built at its first layer
        return gather_seq(result.hidden, source, dim=1)

    def _segment_kwargs(self, state: PrefillState, hidden: torch.Tensor, full: dict, kind: tuple) -> dict:
        """Position ids, rotary and mask of the shortened sequence for layers of one kind, from the full-length
        ones the model gives such a layer: gathered by the kept original positions, so windows, bidirectional
        blocks and padding stay what they were in original positions."""
        oi, valid = state.orig_index, state.valid
        B, M = oi.shape
        out: dict[str, Any] = {}
        position_ids = full.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(state.N, device=oi.device)[None]
        if self.method.positions == "compact":
            start = gather_seq(position_ids, oi[:, :1], dim=-1)
            rank = (torch.cumsum(valid.long(), dim=1) - 1).clamp(min=0)
            new_ids = start + rank.view([1] * (position_ids.dim() - 2) + [B, M])
            out["position_ids"] = new_ids
            per_type = "layer_type" in inspect.signature(self.adapter.rotary_embeddings).parameters
            out["position_embeddings"] = (self.adapter.rotary_embeddings(hidden, new_ids, layer_type=kind[0])
                                          if per_type else self.adapter.rotary_embeddings(hidden, new_ids))
        else:
            out["position_ids"] = gather_seq(position_ids, oi, dim=-1)
            cos, sin = full["position_embeddings"]
            out["position_embeddings"] = (gather_seq(cos, oi, dim=-2), gather_seq(sin, oi, dim=-2))
        mask = full.get("attention_mask")
        allowed = prefill_mask(oi, valid, mask, state.segment_unpadded[-1])
        out["attention_mask"] = None if allowed is None else to_attention_format(
            allowed, mask, self.adapter.attn_implementation(), hidden.dtype)
        return out

    def _decode_layer_pre(self, state: DecodeState, index: int, args: tuple, kwargs: dict) -> Any:
        segment = state.record.layer_segment[index]
        window = self.layer_kinds[index][1]
        # the keys a layer attends to: its cached slots (a sliding-window cache layer keeps only the last ones)
        # and the new tokens; layers of one segment, window and cache size share one mask
        key = (segment, window, _cached_slots(state.cache, index))
        if key not in state.masks:
            state.masks[key] = self._decode_mask(state, segment, index, window, key[2], args, kwargs)
        return args, {**kwargs, "attention_mask": state.masks[key]}

    def _decode_mask(self, state: DecodeState, segment: int, index: int, window: int | None, cached: int,
                     args: tuple, kwargs: dict) -> Any:
        record = state.record
        oi, valid = record.segments[segment]
        hidden = args[0] if args else kwargs["hidden_states"]
        q = hidden.shape[1]
        decoded = _decoded_tokens(record, state.cache, index)
        mask = kwargs.get("attention_mask")
        if window is None and mask is None and 0 not in record.layer_segment:
            if q == 1 and record.segment_unpadded[segment]:
                return None  # sdpa without padding: one new token sees every cached slot
            allowed = decode_mask(oi, valid, record.prefill_length, decoded, q)
        elif window is None and mask is not None and 0 not in record.layer_segment and state.padding_mask is None \
                and mask.dim() == 4 and mask.shape[-1] == record.prefill_length + decoded + q:
            allowed = decode_mask(oi, valid, record.prefill_length, decoded, q, full_mask=mask)
        else:
            # built from causality in original positions, the window and the call's 2-D padding mask: the model
            # sized its own mask from another layer's cache (a stage -1 shortens every layer; Gemma 3 sizes the
            # full-attention mask from its first full layer and the sliding one from a sliding-window cache)
            allowed = decode_mask(oi, valid, record.prefill_length, decoded, q, padding=state.padding_mask,
                                  window=window, keep_last=cached + q)
        return to_attention_format(allowed, mask, self.adapter.attn_implementation(), hidden.dtype)


_VISUAL_KWARGS = ("pixel_values", "pixel_values_videos", "image_embeds", "video_embeds")


def _has_visual_inputs(call: dict) -> bool:
    """Whether a call brings image/video features (pixels, or what ``generate`` encoded before the prefill)."""
    if any(call.get(name) is not None for name in _VISUAL_KWARGS):
        return True
    encoded = call.get("mm_encoder_outputs")
    return bool(encoded) and any(v is not None for v in encoded.values())


def _destination_of_dropped(keep: torch.Tensor, destination: torch.Tensor) -> torch.Tensor:
    """Destinations (B, M) with every token whose destination is not kept (a pruned token points at itself)
    sent to the last kept slot before it, or to its row's first kept slot when none precedes it. At full
    length, the output at a pruned token's position then reads that slot's hidden state."""
    slots = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    last_kept = torch.cummax(torch.where(keep, slots, -1), dim=1).values
    first_kept = keep.long().argmax(dim=1, keepdim=True).expand_as(keep)
    fallback = torch.where(last_kept >= 0, last_kept, first_kept)
    return torch.where(keep.gather(1, destination), destination, fallback)


def _decoded_tokens(record: SequenceRecord, cache: Any, layer: int) -> int:
    """Tokens appended to shortened ``layer``'s cache after the compressed prefill (before the current call)."""
    orig_index, _ = record.segments[record.layer_segment[layer]]
    return cache.layers[layer].get_seq_length() - orig_index.shape[1]


def _check_lengths(record: SequenceRecord, cache: Any) -> None:
    """Every layer must hold its prefill slots plus the same number of later tokens (shape reads, no sync)."""
    lengths = [layer.get_seq_length() for layer in cache.layers[: record.num_layers]]
    prefill = [record.segments[record.layer_segment[l]][0].shape[1] if l in record.layer_segment
               else record.prefill_length for l in range(len(lengths))]
    decoded = {length - slots for length, slots in zip(lengths, prefill)}
    if len(decoded) != 1 or min(decoded) < 0:
        raise ValueError(f"lightkv: the compressed cache is inconsistent (tokens after the prefill per layer: "
                         f"{[length - slots for length, slots in zip(lengths, prefill)]}); was it cropped into the "
                         "prompt or edited by hand? Prefill the prompt again")


def _cached_slots(cache: Any, layer: int) -> int:
    """Key/value slots cache layer ``layer`` holds now (a shape read): a sliding-window layer keeps the last ones."""
    keys = getattr(cache.layers[layer], "keys", None)
    return int(keys.shape[-2]) if isinstance(keys, torch.Tensor) and keys.dim() == 4 else 0


def _check_cache(cache: Any) -> None:
    """A cache whose layers may hold different lengths: DynamicCache with DynamicLayer / DynamicSlidingWindowLayer
    layers (the one transformers builds for hybrid decoders such as Gemma 3), nothing static or quantized."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])})
    if not isinstance(cache, DynamicCache):
        raise ValueError(f"lightkv needs a DynamicCache (its layers can hold different lengths), got "
                         f"{type(cache).__name__} with layers {kinds}")
    for layer in cache.layers:
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            raise ValueError(f"lightkv needs DynamicCache layers of type DynamicLayer or DynamicSlidingWindowLayer, "
                             f"this cache has {kinds}")
        if getattr(layer, "record_past", False):
            raise ValueError("lightkv cannot shorten a sliding-window cache layer that records its past "
                             "(activate_past_recording, used by assisted decoding)")


def layer_kinds(config: Any, num_layers: int, first_shortened: int) -> list[tuple[str, int | None]]:
    """(layer type, sliding window or None) of every decoder layer, from ``config.layer_types``.

    Raises ValueError for a layer type the engine cannot shorten (chunked or linear attention, ...) at or after
    ``first_shortened``: its mask could not be rebuilt in original positions.
    """
    types = getattr(config, "layer_types", None)
    if types is None:
        types = ["full_attention"] * num_layers
    kinds: list[tuple[str, int | None]] = []
    for index in range(num_layers):
        layer_type = types[index] if index < len(types) else "full_attention"
        window = None
        if layer_type == "sliding_attention":
            window = getattr(config, "sliding_window", None)
            if not isinstance(window, int) or window <= 0:
                raise ValueError(f"lightkv: decoder layer {index} is a sliding-window layer but the text config's "
                                 f"sliding_window is {window!r}")
        elif layer_type != "full_attention" and index >= first_shortened:
            raise ValueError(f"lightkv: decoder layer {index} is a {layer_type!r} layer, which lightkv cannot "
                             f"shorten (supported: {', '.join(SUPPORTED_LAYER_TYPES)}); place every stage after the "
                             "last such layer, or use a model without them")
        kinds.append((layer_type, window))
    return kinds


def apply(model: nn.Module, method: Method | str, record: bool = False, *,
          grids: list[tuple[int, int]] | None = None, max_pixels: int | None = None) -> Handle:
    """Patch ``model`` in place so that ``method`` runs during every prefill with images.

    method: a ``Method``, or its name as the command line writes it (``"lightkv@0.55"``, ``"fastv@0.35"``,
    ``"lightkv:layers=[3,4,6],windows=[4,2,1],ratios=[0.5,0.5,0.5]"``): a budget is matched on this model, its
    decoder depth and the token grid of one image its config implies (``grids=[(rows, cols), ...]``: the
    images of a typical prompt instead; ``max_pixels``: the largest image of your processor, for families whose
    grid follows the image size). ``handle.method`` is the configured method.
    record=True also fills ``handle.stats.kept_positions`` and ``handle.stats.merge_maps`` (diagnostics that read
    every sample back to the host at every stage); off by default, so the prefill stays free of such reads.

    Returns a ``Handle``; ``handle.remove()`` (or leaving ``with apply(...)``) restores the model.
    Raises TypeError for an unsupported model family and ValueError for a schedule that does not fit it, a budget
    the method cannot reach on it, or when lightkv is already applied anywhere in the same model (e.g. to
    ``model`` and then ``model.model``).
    """
    if isinstance(method, (str, MethodSpec)):
        built = build_method(method, model=model, grids=grids, max_pixels=max_pixels)
        if built is None:
            raise ValueError(f"{str(method)!r} names no method: run the model without lightkv.apply")
        method = built
    elif grids is not None or max_pixels is not None:
        raise ValueError("grids= and max_pixels= configure a method given by name (e.g. 'lightkv@0.55'); this "
                         f"{type(method).__name__} is configured already")
    if not isinstance(method, Method):
        raise TypeError(f"method must be a lightkv Method (e.g. lightkv.LightKV(...)) or a method name such as "
                        f"'lightkv@0.55', got {type(method).__name__}")
    adapter = get_adapter(model)
    for owner in (model, adapter.language_model):
        existing = getattr(owner, _MARK, None)
        if existing is not None and existing.active:
            raise ValueError("lightkv is already applied to this model (or to a model that contains the same "
                             "decoder); call remove() on the first handle before applying another method")
    attn_impl = adapter.attn_implementation()
    if attn_impl not in SUPPORTED_ATTENTION:
        raise ValueError(f"lightkv supports attn_implementation in {SUPPORTED_ATTENTION}, got {attn_impl!r}; "
                         "load the model with attn_implementation='sdpa' or 'eager'")
    if not isinstance(record, bool):
        raise TypeError(f"record must be True or False, got {record!r}")
    return Handle(model, method, adapter, record=record)
