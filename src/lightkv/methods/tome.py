"""ToMe (Bolya et al., ICLR 2023) in the LLM: LightKV's windowed bipartite merge without prompt guidance."""

from __future__ import annotations

from dataclasses import dataclass
import torch

from ._matchers import window_merge_matcher
from .base import StageContext, StageResult, WindowMergeMethod
from .registry import register_method

__all__ = ["ToMe"]

SIZE_KEY = "tome_size"


@dataclass(frozen=True)
class ToMe(WindowMergeMethod):
    """Token merging at LightKV's stages, windows and ratios, prompt-agnostic.

    layers, windows, ratios, min_tokens_per_window: the schedule, exactly as in ``LightKV`` (same
        validation, same windows, same bipartite matching on cosine similarity of hidden states, same counts).
    size_weighted: False merges with equal weights, x_b <- (x_b + sum_a x_a) / (1 + |S_b|), which is
        ``LightKV(guidance="uniform")``. True is classic ToMe: every token carries a size s (original tokens it
        stands for, 1 at the start), a merge is the size-weighted mean
        x_b <- (s_b x_b + sum_a s_a x_a) / (s_b + sum_a s_a) and s_b <- s_b + sum_a s_a, sizes carried
        across stages (``StageContext.token_state``). ToMe's proportional attention (adding log s to the
        attention logits) is not applied: the decoder's attention runs unchanged.
    window_layout (keyword): "original" or "regrid", as in ``LightKV``.
    """

    min_tokens_per_window: int = 8
    size_weighted: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.size_weighted, bool):
            raise TypeError(f"size_weighted must be True or False, got {self.size_weighted!r}")

    def merge_weights(self, ctx: StageContext, stage: int, groups: torch.Tensor) -> torch.Tensor | None:
        if not self.size_weighted:
            return None
        sizes = ctx.token_state.get(SIZE_KEY)
        if sizes is None:
            sizes = torch.ones(ctx.hidden.shape[:2], dtype=torch.float32, device=ctx.hidden.device)
        return sizes

    def merged(self, ctx: StageContext, stage: int, result: StageResult, weights: torch.Tensor | None) -> None:
        if weights is None:
            return
        absorbed = torch.where(result.keep, torch.zeros_like(weights), weights)
        ctx.token_state[SIZE_KEY] = weights.scatter_add(1, result.destination, absorbed)


register_method("tome", ToMe, matcher=window_merge_matcher(ToMe))
