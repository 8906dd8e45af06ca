"""What one prefill kept: counts per layer and sample, KV bytes read from the real cache."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .state import PrefillState

__all__ = ["PrefillStats", "prefill_stats"]


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
    kept_positions and merge_maps are diagnostics, filled only with ``apply(..., record=True)`` (empty lists
    otherwise): they read every sample back to the host at every stage.
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


def prefill_stats(state: PrefillState, num_layers: int, stage_layers: Sequence[int],
                  record: bool = False) -> PrefillStats:
    """Stats of a finished prefill (``state.vision_counts[s]`` holds the counts before stage s + 1 ran);
    ``record``: include the diagnostics (kept_positions, merge_maps) the engine recorded."""
    B = state.layout.vision_mask.shape[0]
    last = len(state.vision_counts) - 1  # 0 for a text-only prefill
    seg_of_layer = [min(last, sum(1 for s in stage_layers if s < layer)) for layer in range(num_layers)]
    # one host read for every count of the call
    counts = torch.stack([*state.vision_counts, *state.token_counts]).tolist()
    vision_counts, token_counts = counts[:len(state.vision_counts)], counts[len(state.vision_counts):]
    vision = [[vision_counts[seg_of_layer[l]][b] for l in range(num_layers)] for b in range(B)]
    tokens = [[token_counts[seg_of_layer[l]][b] for l in range(num_layers)] for b in range(B)]
    prompt_vision = vision_counts[0]  # before any stage (a stage -1 cuts layer 0 too)
    retained = [None if n == 0 else sum(row) / (n * num_layers) for row, n in zip(vision, prompt_vision)]
    with_images = [r for r in retained if r is not None]
    stats = PrefillStats(vision, tokens, retained, sum(with_images) / len(with_images) if with_images else None,
                         kept_positions=state.kept_positions if record else [],
                         merge_maps=state.merge_maps if record else [])
    cache: Any = state.cache
    if cache is not None and hasattr(cache, "layers"):
        kv, vis, full, full_vis = [], [], [], []
        for l, cache_layer in enumerate(cache.layers[:num_layers]):
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
