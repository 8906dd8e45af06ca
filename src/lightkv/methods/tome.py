"""ToMe (Bolya et al., ICLR 2023) in the LLM: LightKV's windowed bipartite merge without prompt guidance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from ..core import MergeResult, bipartite_merge, window_groups
from .base import Method
from .lightkv import LightKV

if TYPE_CHECKING:
    from ..engine import StageContext

__all__ = ["ToMe"]

SIZE_KEY = "tome_size"


@dataclass
class ToMe(Method):
    """Token merging at LightKV's stages, windows and ratios, prompt-agnostic.

    layers, windows, ratios, min_tokens_per_window: the schedule, exactly as in ``LightKV`` (same
        validation, same windows, same bipartite matching on cosine similarity of hidden states, same counts).
    size_weighted: False merges with equal weights, x_b <- (x_b + sum_a x_a) / (1 + |S_b|), which is
        ``LightKV(guidance="uniform")``. True is classic ToMe: every token carries a size s (original tokens it
        stands for, 1 at the start), a merge is the size-weighted mean
        x_b <- (s_b x_b + sum_a s_a x_a) / (s_b + sum_a s_a) and s_b <- s_b + sum_a s_a, sizes carried
        across stages (``StageContext.token_state``). ToMe's proportional attention (adding log s to the
        attention logits) is not applied: the decoder's attention runs unchanged.
    """

    layers: Sequence[int] = (12, 18, 24)
    windows: Sequence[int] = (4, 2, 1)
    ratios: Sequence[float] = (0.5, 0.5, 0.5)
    min_tokens_per_window: int = 8
    size_weighted: bool = False
    _schedule: LightKV = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.size_weighted, bool):
            raise TypeError(f"size_weighted must be True or False, got {self.size_weighted!r}")
        self._schedule = LightKV(layers=self.layers, windows=self.windows, ratios=self.ratios, guidance="uniform",
                                 min_tokens_per_window=self.min_tokens_per_window, positions=self.positions)
        self.layers, self.windows, self.ratios = self._schedule.layers, self._schedule.windows, self._schedule.ratios

    @property
    def stage_layers(self) -> tuple[int, ...]:
        return tuple(self.layers)

    def as_lightkv(self) -> LightKV:
        """The equal-weight schedule as a ``LightKV`` (used to predict kept counts)."""
        return self._schedule

    def reduce(self, ctx: "StageContext", stage: int) -> MergeResult:
        if not self.size_weighted:
            return self._schedule.reduce(ctx, stage)
        windows = self.windows[stage]
        active = ctx.image_token_counts() >= self.min_tokens_per_window * windows * windows
        groups = window_groups(ctx.image_index, ctx.grid_rows, ctx.grid_cols, ctx.grid_hw, windows, active)
        sizes = ctx.token_state.get(SIZE_KEY)
        if sizes is None:
            sizes = torch.ones(ctx.hidden.shape[:2], dtype=torch.float32, device=ctx.hidden.device)
        result = bipartite_merge(ctx.hidden, groups, sizes, self.ratios[stage])
        absorbed = torch.where(result.keep, torch.zeros_like(sizes), sizes)
        ctx.token_state[SIZE_KEY] = sizes.scatter_add(1, result.destination, absorbed)
        return result
