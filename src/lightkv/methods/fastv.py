"""FastV (Chen et al., ECCV 2024): after layer K, keep the vision tokens the last prompt token attends to most."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import last_token_attention
from ._matchers import single_stage_matcher
from .base import ScorePruneMethod, StageContext
from .registry import register_method

__all__ = ["FastV"]


@dataclass(frozen=True)
class FastV(ScorePruneMethod):
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

    def score(self, ctx: StageContext, stage: int) -> torch.Tensor:
        q, k, scaling = ctx.attention()
        return last_token_attention(q, k, ctx.token_valid, scaling)  # (B, M)


register_method("fastv", FastV, matcher=single_stage_matcher(FastV))
