"""PyramidDrop (Xing et al., CVPR 2025): drop a fixed fraction of the remaining vision tokens at several layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from ..core import MergeResult
from .base import Method
from .pruning import (check_layers, check_ratio, drop_count, keep_top_scored, kept_after_stages,
                      last_token_attention)

if TYPE_CHECKING:
    from ..engine import StageContext

__all__ = ["PDrop"]


@dataclass
class PDrop(Method):
    """At each stage, score the remaining vision patches of a sample by the attention its last instruction
    token (the last real token of the prompt) pays to them at that layer (causal softmax over keys, mean
    over heads), and drop the floor(ratio * n) lowest-scored of the n remaining. Stages compound:
    ratio 0.5 at three stages leaves 1/2, 1/4, 1/8.

    layers: 0-based decoder layers after which a stage runs, strictly increasing (paper: 8, 16, 24 of 32).
    ratio: fraction lambda of the remaining patches dropped at each stage, in [0, 1] (paper: 0.5).
    """

    layers: Sequence[int] = (8, 16, 24)
    ratio: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.layers = check_layers("layers", self.layers)
        self.ratio = check_ratio("ratio", self.ratio)

    @property
    def stage_layers(self) -> tuple[int, ...]:
        return tuple(self.layers)

    @property
    def needs_attention(self) -> bool:
        return True

    def kept_after(self, n: int) -> list[int]:
        """Vision patches left after each stage for a sample of ``n`` patches."""
        return kept_after_stages(n, [self.ratio] * len(self.layers))

    def reduce(self, ctx: "StageContext", stage: int) -> MergeResult:
        candidates = ctx.image_index >= 0
        counts = candidates.sum(1)
        q, k, scaling = ctx.attention()
        scores = last_token_attention(q, k, ctx.token_valid, scaling)
        return keep_top_scored(ctx.hidden, scores, candidates, counts - drop_count(self.ratio, counts))
