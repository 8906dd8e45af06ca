"""PyramidDrop (Xing et al., CVPR 2025): drop a fixed fraction of the remaining vision tokens at several layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ._common import last_token_attention
from ._matchers import staged_matcher
from .base import ScorePruneMethod, StageContext
from .registry import register_method

__all__ = ["PDrop"]

PDROP_REFERENCE = ((8, 16, 24), 32)  # layers, depth (LLaVA-1.5-7B)


@dataclass(frozen=True)
class PDrop(ScorePruneMethod):
    """At each stage, score the remaining vision patches of a sample by the attention its last instruction
    token (the last real token of the prompt) pays to them at that layer (causal softmax over keys, mean
    over heads), and drop the floor(ratio * n) lowest-scored of the n remaining. Stages compound:
    ratio 0.5 at three stages leaves 1/2, 1/4, 1/8.

    layers: 0-based decoder layers after which a stage runs, strictly increasing (paper: 8, 16, 24 of 32).
    ratio: fraction lambda of the remaining patches dropped at each stage, in [0, 1] (paper: 0.5).
    """

    layers: Sequence[int] = (8, 16, 24)
    ratio: float = 0.5

    def score(self, ctx: StageContext, stage: int) -> torch.Tensor:
        q, k, scaling = ctx.attention()
        return last_token_attention(q, k, ctx.token_valid, scaling)  # (B, M)


register_method("pdrop", PDrop, matcher=staged_matcher(PDrop, *PDROP_REFERENCE))
