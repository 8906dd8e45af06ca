"""Budget matchers shared by several methods: ``matcher(target, num_layers, grids, **fields) -> BudgetMatch``.

Each factory takes the method class and returns its matcher (see ``lightkv.budget.search_schedule``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from ._budget import REACH_TOLERANCE, search_schedule

__all__ = ["window_merge_matcher", "single_stage_matcher", "staged_matcher", "LIGHTKV_REFERENCE"]


LIGHTKV_REFERENCE = ((12, 18, 24), (4, 2, 1), 32)  # layers, windows, depth (LLaVA-1.5-7B)


MAX_ROUNDS = 4  # the most bipartite rounds per stage the matcher tries (each keeps at least half a window)


def window_merge_matcher(cls: type) -> Any:
    """LightKV's reference layers (12, 18, 24 of 32) placed on the depth, windows 4, 2, 1 (smaller on grids
    too small for them), one ratio for all stages searched in [0, 0.5]. When even the earliest layers and the
    largest ratio stay above the target (a short decoder: layer 0 always holds every token), every stage gets
    more bipartite rounds (``rounds`` 2, 3, 4: beyond the paper, see ``WindowMergeMethod``), the fewest that
    reach it; a ``rounds`` field given by the caller is kept as it is."""
    def matcher(target: float, num_layers: int, grids: tuple[tuple[int, int], ...], **fields: Any) -> Any:
        if "rounds" in fields:
            return match(target, num_layers, grids, **fields)
        for rounds in range(1, MAX_ROUNDS + 1):
            found = match(target, num_layers, grids, rounds=rounds, **fields)
            if found.retained_fraction <= target + REACH_TOLERANCE:
                return found
        return found

    def match(target: float, num_layers: int, grids: tuple[tuple[int, int], ...], **fields: Any) -> Any:
        layers_ref, windows_ref, depth = LIGHTKV_REFERENCE
        # a stage is skipped for an image with fewer than min_tokens * W^2 tokens: shrink the windows of small
        # grids so that every stage still runs even at the largest ratio (stage s then holds n / 2^s tokens)
        min_tokens = fields.get("min_tokens_per_window", 8)
        tokens = min(h * w for h, w in grids)  # the smallest image decides
        windows = tuple(min(w, max(1, math.isqrt(tokens // (min_tokens * 2 ** s))))
                        for s, w in enumerate(windows_ref))

        def build(layers: tuple[int, ...], ratio: float) -> Any:
            # stages dropped by place_layers are the last ones: keep the first len(layers) windows
            return cls(layers=layers, windows=windows[:len(layers)], ratios=[ratio] * len(layers), **fields)

        # a window merges at most half its tokens, so ratios above 0.5 change nothing
        return search_schedule(build, layers_ref, depth, target, num_layers, grids=grids, max_ratio=0.5)
    return matcher


def single_stage_matcher(cls: type) -> Any:
    """One stage after ``layer`` (default 2, the published K; moved earlier when the target needs it), the
    ratio searched in [0, 1]."""
    def matcher(target: float, num_layers: int, grids: tuple[tuple[int, int], ...], **fields: Any) -> Any:
        layer = fields.pop("layer", 2)

        def build(layers: tuple[int, ...], ratio: float) -> Any:
            return cls(layer=layers[0], ratio=ratio, **fields)

        return search_schedule(build, (layer,), None, target, num_layers, grids=grids)
    return matcher


def staged_matcher(cls: type, reference_layers: Sequence[int], reference_depth: int) -> Any:
    """``reference_layers`` (published for ``reference_depth`` layers) placed on the depth, one ratio for all
    stages searched in [0, 1]."""
    def matcher(target: float, num_layers: int, grids: tuple[tuple[int, int], ...], **fields: Any) -> Any:
        def build(layers: tuple[int, ...], ratio: float) -> Any:
            return cls(layers=layers, ratio=ratio, **fields)

        return search_schedule(build, tuple(reference_layers), reference_depth, target, num_layers, grids=grids)
    return matcher
