"""FastV (Chen et al., ECCV 2024): after layer K, keep the vision tokens the last prompt token attends to most."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..core import MergeResult
from .base import Method
from .pruning import (check_layer, check_ratio, drop_count, keep_top_scored, kept_after_stages,
                      last_token_attention)

if TYPE_CHECKING:
    from ..engine import StageContext

__all__ = ["FastV"]


@dataclass
class FastV(Method):
    """Once, after decoder ``layer``: score each vision patch by the attention the last real token of its
    sample pays to it at that layer (causal softmax over keys, mean over heads) and drop the floor(ratio * n)
    lowest-scored of the sample's n patches.

    layer: 0-based decoder layer whose attention decides and after whose output tokens are dropped; layers
        0..layer keep every token. (The paper's K=2 counts layers from 1; ``layer=1`` reproduces its exact
        placement, the default 2 follows this project's convention "a stage runs on the output of layer K".)
    ratio: fraction R of the vision patches dropped, in [0, 1] (paper: 0.5).
    Only one query row per sample is formed (q of the last token x all keys); attention itself may run with
    sdpa.
    """

    layer: int = 2
    ratio: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.layer = check_layer("layer", self.layer)
        self.ratio = check_ratio("ratio", self.ratio)

    @property
    def stage_layers(self) -> tuple[int, ...]:
        return (self.layer,)

    @property
    def needs_attention(self) -> bool:
        return True

    def kept_after(self, n: int) -> list[int]:
        """Vision patches left after each stage for a sample of ``n`` patches."""
        return kept_after_stages(n, [self.ratio])

    def reduce(self, ctx: "StageContext", stage: int) -> MergeResult:
        candidates = ctx.image_index >= 0
        counts = candidates.sum(1)
        q, k, scaling = ctx.attention()
        scores = last_token_attention(q, k, ctx.token_valid, scaling)  # (B, M)
        return keep_top_scored(ctx.hidden, scores, candidates, counts - drop_count(self.ratio, counts))
