"""Runs a compression method inside a transformers decoder through forward hooks (no modeling-file copies).

Per forward call, a state object lives in a ``ContextVar`` owned by the handle: a ``PrefillState`` while a
prompt with images is prefilled, a ``DecodeState`` while a compressed cache is extended. Between calls, the
only thing kept is a ``SequenceRecord`` per cache object (weakly referenced) saying which original prefill
positions each shortened layer holds, so that later calls can build the attention-mask columns of those
layers.

Sequence bookkeeping at prefill (B rows, N original tokens, M current slots):
  orig_index (B, M): original position of each current slot; valid (B, M): False on padding slots;
  slot_of_orig (B, N): current slot holding (or absorbing) each original token.
Rows are re-packed with left padding after every stage so the last token of every row stays last.

A stage at layer -1 runs in the pre-hook of decoder layer 0, on the input embeddings: every layer then holds
the short sequence, so at decode steps the engine supplies position ids (when the caller gives none) and
builds every layer's mask from causality in original positions and the call's 2-D padding mask.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adapters import Adapter, VisionLayout, get_adapter
from .core import compact_indices
from .methods import Method

__all__ = ["Handle", "apply", "PrefillStats", "StageContext", "SUPPORTED_ATTENTION"]

logger = logging.getLogger("lightkv")

SUPPORTED_ATTENTION = ("sdpa", "eager")
_CACHE_KWARGS = ("cache", "past_key_values")


# ---------------------------------------------------------------------------------------------------------------
# small tensor helpers


def _gather_seq(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather along sequence dim ``dim`` of ``t`` (batch at dim ``dim - 1``) with index (B, M)."""
    dim = dim % t.dim()
    B, M = index.shape
    shape = list(t.shape)
    shape[dim - 1] = B
    t = t.expand(*shape)
    view = [1] * t.dim()
    view[dim - 1], view[dim] = B, M
    idx = index.view(view)
    expand = list(t.shape)
    expand[dim] = M
    return t.gather(dim, idx.expand(expand))


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """4-D attention mask (bool or additive float) -> bool 'may attend' (same shape)."""
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def _as_mask(allowed: torch.Tensor, like: torch.Tensor | None, attn_impl: str, dtype: torch.dtype) -> torch.Tensor:
    """bool 'may attend' -> the mask format the attention implementation was given."""
    if like is not None and like.dtype == torch.bool:
        return allowed
    if like is None and attn_impl == "sdpa":
        return allowed
    out_dtype = like.dtype if like is not None else dtype
    zero = torch.zeros((), dtype=out_dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(out_dtype).min)


def _layer_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_output(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


# ---------------------------------------------------------------------------------------------------------------
# stats


@dataclass
class PrefillStats:
    """What one prefill kept. Lists are indexed [sample][layer] or [layer].

    vision_tokens: vision tokens each layer attends over / caches, per sample.
    tokens: all real (non-padding) tokens per layer, per sample.
    retained_fraction: per sample, mean over layers of vision_tokens / vision tokens of the prompt
        (None for a sample without images). mean_retained_fraction: average over samples with images.
    kv_bytes / vision_kv_bytes / uncompressed_kv_bytes: per layer, read from the real cache (keys + values,
        padding slots included in kv_bytes); None when the call ran without a cache.
    kept_positions: [sample][stage] the vision tokens still present after each stage that ran, as sorted
        positions among the sample's real (non-padding) input tokens, so they do not depend on batching.
    merge_maps: [stage] (B, N) long tensors: for every input position of the call (padding included), the input
        position of the token it lives in after that stage (itself when kept, its destination when merged).
    """

    vision_tokens: list[list[int]]
    tokens: list[list[int]]
    retained_fraction: list[float | None]
    mean_retained_fraction: float | None
    kv_bytes: list[int] | None = None
    vision_kv_bytes: list[int] | None = None
    uncompressed_kv_bytes: list[int] | None = None
    uncompressed_vision_kv_bytes: list[int] | None = None
    kept_positions: list[list[list[int]]] = field(default_factory=list)
    merge_maps: list[torch.Tensor] = field(default_factory=list)

    @property
    def kv_ratio(self) -> float | None:
        if self.kv_bytes is None:
            return None
        return sum(self.kv_bytes) / sum(self.uncompressed_kv_bytes)

    @property
    def vision_kv_ratio(self) -> float | None:
        if self.vision_kv_bytes is None:
            return None
        return sum(self.vision_kv_bytes) / max(1, sum(self.uncompressed_vision_kv_bytes))


# ---------------------------------------------------------------------------------------------------------------
# per-call states


@dataclass
class SequenceRecord:
    """Kept per cache between calls: which original prefill positions each shortened layer holds."""

    prefill_length: int
    segments: list[tuple[torch.Tensor, torch.Tensor]]  # per stage: (orig_index (B, M), valid (B, M))
    layer_segment: dict[int, int]  # shortened layer -> index into segments
    # per segment: no padding slot at all (read once at prefill, so decode steps need no device sync)
    segment_unpadded: list[bool] = field(default_factory=list)


class StageContext:
    """The current sequence at a stage layer, as a method sees it. All tensors are (B, M) unless noted."""

    def __init__(self, state: "PrefillState", hidden: torch.Tensor, layer_index: int):
        self._state = state
        self.layer_index = layer_index
        self.hidden = hidden  # (B, M, D)
        layout = state.layout
        self.token_valid = state.valid
        oi = state.orig_index
        self.vision_mask = layout.vision_mask.gather(1, oi) & state.valid
        self.image_index = torch.where(state.valid, layout.image_index.gather(1, oi), -1)
        self.grid_rows = layout.grid_rows.gather(1, oi)
        self.grid_cols = layout.grid_cols.gather(1, oi)
        self.grid_hw = layout.grid_hw  # (I, 2)
        # position of each slot among its row's real input tokens (batch-independent, unlike slot or column)
        self.input_positions = state.input_position.gather(1, oi)
        # per-token state a method carries across stages (e.g. ToMe sizes): (B, M) tensors that the engine
        # gathers at every compaction with the same index as the hidden states; a method may add entries
        self.token_state: dict[str, torch.Tensor] = state.token_state
        # whatever the method's own hooks (``Method.install``) left for this call, e.g. vision-encoder scores
        self.method_state: dict[str, Any] = state.method_state

    def image_token_counts(self) -> torch.Tensor:
        """(I,) current number of mergeable patches of each image."""
        patches = self.image_index[self.image_index >= 0]
        return torch.bincount(patches, minlength=self._state.layout.num_images)

    def after_first_image(self) -> torch.Tensor:
        """(B, M) bool, slots after the first vision token of their row."""
        first = torch.where(self.vision_mask.any(1), self.vision_mask.float().argmax(1), self.vision_mask.shape[1])
        return torch.arange(self.vision_mask.shape[1], device=first.device)[None, :] > first[:, None]

    def attention(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Post-RoPE queries (B, H, M, Dh), keys (B, Hkv, M, Dh) and the scaling of the stage layer."""
        return self._state.attention(self.layer_index)


class PrefillState:
    def __init__(self, handle: "Handle", layout: VisionLayout, attention_mask: torch.Tensor | None, N: int,
                 passthrough: bool = False):
        self.handle = handle
        self.passthrough = passthrough  # text-only prefill: layers run untouched, only stats are taken
        self.layout = layout
        B = layout.vision_mask.shape[0]
        device = layout.vision_mask.device
        self.N = N
        self.orig_index = torch.arange(N, device=device).expand(B, N)
        self.valid = attention_mask.bool() if attention_mask is not None else \
            torch.ones(B, N, dtype=torch.bool, device=device)
        self.slot_of_orig = self.orig_index
        self.shortened = False
        self.full_kwargs: dict | None = None
        self.segment_kwargs: dict | None = None
        self.segments: list[tuple[torch.Tensor, torch.Tensor]] = []
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

    def attention(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        if "q" not in self.capture or "k" not in self.capture:
            raise RuntimeError("lightkv: the queries/keys of the stage layer were not captured")
        adapter = self.handle.adapter
        layer = adapter.decoder_layers[layer_index]
        return adapter.queries_keys(layer, self.capture["q"], self.capture["k"], self.stage_position_embeddings)


class DecodeState:
    def __init__(self, record: SequenceRecord, cache: Any, padding_mask: torch.Tensor | None = None):
        self.record = record
        self.cache = cache
        self.padding_mask = padding_mask  # the call's 2-D attention mask (B, all tokens so far), if any
        self.masks: dict[int, Any] = {}  # segment -> mask of this call


# ---------------------------------------------------------------------------------------------------------------
# the handle


class Handle:
    """Returned by ``apply``: holds the hooks, removes them, reports the last prefill's stats."""

    def __init__(self, model: nn.Module, method: Method, adapter: Adapter):
        self.model = model
        self.method = method
        self.adapter = adapter
        self.num_layers = len(adapter.decoder_layers)
        method.validate_for(self.num_layers)
        self.stage_layers = tuple(method.stage_layers)
        adapter.validate_stage_layers(self.stage_layers)
        self.stage_of_layer = {layer: s for s, layer in enumerate(self.stage_layers)}
        self._state: contextvars.ContextVar = contextvars.ContextVar(f"lightkv_state_{id(self)}", default=None)
        self._records: "weakref.WeakKeyDictionary[Any, SequenceRecord]" = weakref.WeakKeyDictionary()
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
        self._hooks.append(entry.register_forward_pre_hook(self._timed("entry", self._entry_pre), with_kwargs=True))
        self._hooks.append(entry.register_forward_hook(self._timed("entry", self._entry_post), with_kwargs=True,
                                                       always_call=True))
        layers = self.adapter.decoder_layers
        for index in range(max(0, self.stage_layers[0]), self.num_layers):
            layer = layers[index]
            self._hooks.append(layer.register_forward_pre_hook(self._timed("layer_pre", self._make_layer_pre(index)),
                                                               with_kwargs=True))
            self._hooks.append(layer.register_forward_hook(self._timed("layer_post", self._make_layer_post(index))))
        if self.method.needs_attention:
            for index in (i for i in self.stage_layers if i >= 0):  # a stage -1 has no decoder attention
                layer = layers[index]
                self._hooks.append(self.adapter.query_projection(layer).register_forward_hook(
                    self._timed("capture", self._make_capture(index, "q"))))
                self._hooks.append(self.adapter.key_projection(layer).register_forward_hook(
                    self._timed("capture", self._make_capture(index, "k"))))
        try:  # last, so that the method's hooks on shared modules (e.g. the entry) run after the engine's
            self._hooks.extend(self.method.install(self))
        except BaseException:
            self.remove()
            raise
        self.model._lightkv_handle = self

    def _timed(self, section: str, hook):
        """``hook``, timed into ``self.timer`` under ``section`` while a timer is set."""
        def timed(*args, **kwargs):
            timer = self.timer
            if timer is None:
                return hook(*args, **kwargs)
            start = timer.start()
            try:
                return hook(*args, **kwargs)
            finally:
                timer.stop(section, start)
        return timed

    def remove(self) -> None:
        """Remove every hook; the model behaves exactly as before ``apply``."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if getattr(self.model, "_lightkv_handle", None) is self:
            del self.model._lightkv_handle

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def prefill_state(self) -> "PrefillState | None":
        """State of the prefill in progress in this thread/context (None outside one); for method hooks."""
        state = self._state.get()
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

    def _entry_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._state.set(None)
        call = self._call_arguments(args, kwargs)
        input_ids, inputs_embeds = call.get("input_ids"), call.get("inputs_embeds")
        if input_ids is None and inputs_embeds is None:
            return
        cache = next((call[k] for k in _CACHE_KWARGS if call.get(k) is not None), None)
        layout = self.adapter.vision_layout(input_ids, inputs_embeds, call)
        record = self._records.get(cache) if cache is not None else None
        if layout is None:
            if record is not None:
                padding = call.get("attention_mask")
                padding = padding if isinstance(padding, torch.Tensor) and padding.dim() == 2 else None
                self._state.set(DecodeState(record, cache, padding))
                if 0 in record.layer_segment and call.get("position_ids") is None:
                    # no layer holds the full prefill (a stage -1), so the model would count positions from a
                    # short cache: give the new tokens the positions they have in the uncompressed sequence
                    ref = input_ids if input_ids is not None else inputs_embeds
                    start = record.prefill_length + _decoded_tokens(record, cache, 0)
                    positions = self.adapter.decode_position_ids(start, ref.shape[1], ref.shape[0], ref.device)
                    return args, {**kwargs, "position_ids": positions}
            elif cache is None or cache.get_seq_length() == 0:
                # a prefill without images: nothing to compress, but stats still describe this call
                ref = input_ids if input_ids is not None else inputs_embeds
                B, N = ref.shape[:2]
                empty = torch.zeros(B, N, dtype=torch.bool, device=ref.device)
                none = torch.full((B, N), -1, dtype=torch.long, device=ref.device)
                layout = VisionLayout(empty, none, none.clamp(min=0), none.clamp(min=0),
                                      torch.zeros(0, 2, dtype=torch.long, device=ref.device))
                self._state.set(PrefillState(self, layout, call.get("attention_mask"), N, passthrough=True))
            return
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
        N = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        self._state.set(PrefillState(self, layout, attention_mask, N))

    def _entry_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        state = self._state.get()
        self._state.set(None)
        if not isinstance(state, PrefillState) or output is None:
            return
        if state.cache is not None and state.segments:
            layer_segment = {}
            for layer in range(self.stage_layers[0] + 1, self.num_layers):
                layer_segment[layer] = sum(1 for s in self.stage_layers if s < layer) - 1
            unpadded = [bool(valid.all()) for _, valid in state.segments]
            self._records[state.cache] = SequenceRecord(state.N, state.segments, layer_segment, unpadded)
        self.stats = self._stats(state)

    def _stats(self, state: PrefillState) -> PrefillStats:
        B = state.layout.vision_mask.shape[0]
        last = len(state.vision_counts) - 1  # 0 for a text-only prefill
        seg_of_layer = [min(last, sum(1 for s in self.stage_layers if s < layer)) for layer in range(self.num_layers)]
        vision = [[int(state.vision_counts[seg_of_layer[l]][b]) for l in range(self.num_layers)] for b in range(B)]
        tokens = [[int(state.token_counts[seg_of_layer[l]][b]) for l in range(self.num_layers)] for b in range(B)]
        prompt_vision = [int(state.vision_counts[0][b]) for b in range(B)]  # before any stage (-1 cuts layer 0)
        retained = [None if n == 0 else sum(row) / (n * self.num_layers) for row, n in zip(vision, prompt_vision)]
        with_images = [r for r in retained if r is not None]
        stats = PrefillStats(vision, tokens, retained, sum(with_images) / len(with_images) if with_images else None,
                             kept_positions=state.kept_positions, merge_maps=state.merge_maps)
        cache = state.cache
        if cache is not None and hasattr(cache, "layers"):
            kv, vis, full, full_vis = [], [], [], []
            for l, cache_layer in enumerate(cache.layers[: self.num_layers]):
                keys, values = cache_layer.keys, cache_layer.values
                per_token = (keys[0, :, :1].numel() * keys.element_size()
                             + values[0, :, :1].numel() * values.element_size())
                kv.append(keys.numel() * keys.element_size() + values.numel() * values.element_size())
                vis.append(per_token * sum(vision[b][l] for b in range(B)))
                full.append(per_token * B * state.N)
                full_vis.append(per_token * sum(prompt_vision))
            stats.kv_bytes, stats.vision_kv_bytes = kv, vis
            stats.uncompressed_kv_bytes, stats.uncompressed_vision_kv_bytes = full, full_vis
        return stats

    # -- q/k capture ----------------------------------------------------------------------------------------
    def _make_capture(self, index: int, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            state = self._state.get()
            if isinstance(state, PrefillState) and state.capture_layer == index:
                state.capture[name] = output
        return hook

    # -- decoder layers -------------------------------------------------------------------------------------
    def _make_layer_pre(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            state = self._state.get()
            if isinstance(state, PrefillState):
                if state.passthrough:
                    state.cache = state.cache or next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None),
                                                      None)
                    return None
                return self._prefill_layer_pre(state, index, args, kwargs)
            if isinstance(state, DecodeState) and index in state.record.layer_segment:
                return self._decode_layer_pre(state, index, args, kwargs)
            return None
        return hook

    def _make_layer_post(self, index: int):
        def hook(module: nn.Module, args: tuple, output: Any):
            state = self._state.get()
            if not isinstance(state, PrefillState) or state.passthrough:
                return None
            hidden = _layer_output(output)
            if index in self.stage_of_layer:
                hidden = self._run_stage(state, index, hidden)
            if index == self.num_layers - 1 and state.shortened:
                hidden = _gather_seq(hidden, state.slot_of_orig, dim=1)
            return _replace_output(output, hidden)
        return hook

    def _prefill_layer_pre(self, state: PrefillState, index: int, args: tuple, kwargs: dict):
        if state.cache is None:
            state.cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
            if state.cache is not None and not _is_dynamic(state.cache):
                raise ValueError(f"lightkv needs a DynamicCache (per-layer lengths), got {type(state.cache).__name__}")
        if state.full_kwargs is None:
            state.full_kwargs = {k: kwargs.get(k) for k in ("attention_mask", "position_embeddings", "position_ids")}
        if index == 0 and -1 in self.stage_of_layer:
            # a stage before the decoder: shorten the input embeddings, so every layer caches the short sequence
            hidden = self._run_stage(state, -1, args[0] if args else kwargs["hidden_states"])
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs = {**kwargs, "hidden_states": hidden}
        if state.shortened:
            kwargs = {**kwargs, **state.segment_kwargs}
        if index in self.stage_of_layer:
            state.capture_layer = index
            state.capture = {}
            state.stage_position_embeddings = kwargs.get("position_embeddings")
        return args, kwargs

    def _run_stage(self, state: PrefillState, index: int, hidden: torch.Tensor) -> torch.Tensor:
        stage = self.stage_of_layer[index]
        ctx = StageContext(state, hidden, index)
        result = self.method.reduce(ctx, stage)
        state.capture, state.capture_layer = {}, None
        keep = result.keep & state.valid  # padding never survives a stage
        source, valid, new_slot = compact_indices(keep, _destination_of_dropped(keep, result.destination))
        for name, value in state.token_state.items():
            if value.shape[:2] != keep.shape:
                raise ValueError(f"lightkv: token_state[{name!r}] has shape {tuple(value.shape)}, expected "
                                 f"(batch, current tokens) = {tuple(keep.shape)} at its first two dims")
            state.token_state[name] = _gather_seq(value, source, dim=1)
        state.orig_index = state.orig_index.gather(1, source)
        state.valid = valid
        state.slot_of_orig = new_slot.gather(1, state.slot_of_orig)
        state.merge_maps.append(state.orig_index.gather(1, state.slot_of_orig))
        state.shortened = True
        state.segments.append((state.orig_index, state.valid))
        state.vision_counts.append((state.layout.vision_mask.gather(1, state.orig_index) & valid).sum(1))
        state.token_counts.append(valid.sum(1))
        kept_vision = state.layout.vision_mask.gather(1, state.orig_index) & valid
        positions = state.input_position.gather(1, state.orig_index)
        for b in range(keep.shape[0]):
            state.kept_positions[b].append(positions[b][kept_vision[b]].tolist())
        state.segment_kwargs = self._segment_kwargs(state, hidden)
        return _gather_seq(result.hidden, source, dim=1)

    def _segment_kwargs(self, state: PrefillState, hidden: torch.Tensor) -> dict:
        full = state.full_kwargs
        oi, valid = state.orig_index, state.valid
        B, M = oi.shape
        out: dict[str, Any] = {}
        position_ids = full.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(state.N, device=oi.device)[None]
        if self.method.positions == "compact":
            start = _gather_seq(position_ids, oi[:, :1], dim=-1)
            rank = (torch.cumsum(valid.long(), dim=1) - 1).clamp(min=0)
            new_ids = start + rank.view([1] * (position_ids.dim() - 2) + [B, M])
            out["position_ids"] = new_ids
            out["position_embeddings"] = self.adapter.rotary_embeddings(hidden, new_ids)
        else:
            out["position_ids"] = _gather_seq(position_ids, oi, dim=-1)
            cos, sin = full["position_embeddings"]
            out["position_embeddings"] = (_gather_seq(cos, oi, dim=-2), _gather_seq(sin, oi, dim=-2))
        mask = full.get("attention_mask")
        if mask is None:
            if bool(valid.all()):
                out["attention_mask"] = None
                return out
            allowed = oi[:, None, :] <= oi[:, :, None]  # causal in original order, (B, M, M)
        else:
            if mask.dim() != 4:
                raise ValueError(f"lightkv expects a 4-D attention mask inside the decoder, got {mask.dim()}-D")
            full_allowed = _allowed(mask)[:, 0].expand(B, -1, -1)
            rows = full_allowed.gather(1, oi[:, :, None].expand(B, M, full_allowed.shape[2]))
            allowed = rows.gather(2, oi[:, None, :].expand(B, M, M))
        allowed = allowed & valid[:, None, :]
        # padding queries attend to themselves only, so no row is empty (an empty row gives NaN in sdpa)
        eye = torch.eye(M, dtype=torch.bool, device=oi.device)[None]
        allowed = allowed | (eye & ~valid[:, :, None])
        out["attention_mask"] = _as_mask(allowed[:, None], mask, self.adapter.attn_implementation(), hidden.dtype)
        return out

    def _decode_layer_pre(self, state: DecodeState, index: int, args: tuple, kwargs: dict):
        segment = state.record.layer_segment[index]
        if segment not in state.masks:
            state.masks[segment] = self._decode_mask(state, segment, index, args, kwargs)
        return args, {**kwargs, "attention_mask": state.masks[segment]}

    def _decode_mask(self, state: DecodeState, segment: int, index: int, args: tuple, kwargs: dict):
        oi, valid = state.record.segments[segment]
        hidden = args[0] if args else kwargs["hidden_states"]
        B, q = hidden.shape[:2]
        if oi.shape[0] != B:
            raise ValueError(f"lightkv: the cache was compressed for batch size {oi.shape[0]}, got {B}")
        cache_layer = state.cache.layers[index]
        decoded = cache_layer.get_seq_length() - oi.shape[1]  # tokens appended after prefill, before this call
        prefill = state.record.prefill_length
        total = prefill + decoded + q
        extra = torch.arange(prefill, total, device=oi.device)[None].expand(B, -1)
        cols = torch.cat([oi, extra], dim=1)  # (B, K) original column of each cache slot of this layer
        col_valid = torch.cat([valid, torch.ones_like(extra, dtype=torch.bool)], dim=1)
        mask = kwargs.get("attention_mask")
        if 0 in state.record.layer_segment:
            # no layer holds the full prefill (a stage -1): the model sized its mask from a short cache, so
            # this layer's mask is built from causality in original positions and the call's 2-D padding mask
            query_pos = prefill + decoded + torch.arange(q, device=oi.device)
            allowed = cols[:, None, :] <= query_pos[None, :, None]
            if state.padding_mask is not None:
                if state.padding_mask.shape[-1] != total:
                    raise ValueError(f"lightkv: the attention mask covers {state.padding_mask.shape[-1]} tokens, "
                                     f"expected {total} (prompt + generated tokens)")
                allowed = allowed & state.padding_mask.bool().gather(1, cols)[:, None, :]
        elif mask is None:
            if q == 1 and state.record.segment_unpadded[segment]:
                return None
            query_pos = prefill + decoded + torch.arange(q, device=oi.device)
            allowed = cols[:, None, :] <= query_pos[None, :, None]
        else:
            if mask.shape[-1] != total:
                raise ValueError(f"lightkv: decode mask covers {mask.shape[-1]} keys, expected {total}")
            full_allowed = _allowed(mask)[:, 0].expand(B, q, -1)
            allowed = full_allowed.gather(2, cols[:, None, :].expand(B, q, cols.shape[1]))
        allowed = allowed & col_valid[:, None, :]
        return _as_mask(allowed[:, None], mask, self.adapter.attn_implementation(), hidden.dtype)


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


def _is_dynamic(cache: Any) -> bool:
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return isinstance(cache, DynamicCache) and all(
        type(layer) is DynamicLayer for layer in getattr(cache, "layers", []))


def apply(model: nn.Module, method: Method) -> Handle:
    """Patch ``model`` in place so that ``method`` runs during every prefill with images.

    Returns a ``Handle``; ``handle.remove()`` (or leaving ``with apply(...)``) restores the model.
    Raises TypeError for an unsupported model family and ValueError for a schedule that does not fit it.
    """
    if not isinstance(method, Method):
        raise TypeError(f"method must be a lightkv Method (e.g. lightkv.LightKV(...)), got {type(method).__name__}")
    existing = getattr(model, "_lightkv_handle", None)
    if existing is not None and existing.active:
        raise ValueError("lightkv is already applied to this model; call remove() on the first handle")
    adapter = get_adapter(model)
    attn_impl = adapter.attn_implementation()
    if attn_impl not in SUPPORTED_ATTENTION:
        raise ValueError(f"lightkv supports attn_implementation in {SUPPORTED_ATTENTION}, got {attn_impl!r}; "
                         "load the model with attn_implementation='sdpa' or 'eager'")
    return Handle(model, method, adapter)
