"""Random: drop a uniformly random subset of the vision tokens after one decoder layer (a seeded baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ._common import check_int, set_field
from ._matchers import single_stage_matcher
from .base import ScorePruneMethod, StageContext
from .registry import register_method

__all__ = ["Random"]

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant (golden ratio), spreads nearby seeds apart
_MASK = (1 << 63) - 1


@dataclass(frozen=True)
class Random(ScorePruneMethod):
    """Drop floor(ratio * n) of a sample's n vision patches, chosen uniformly at random, after ``layer``.

    layer: decoder layer after whose output tokens are dropped (0-based). ratio: fraction dropped, in [0, 1].
    seed: integer. Each sample draws from its own generator, seeded from ``seed``, the stage, the sample's
    current number of vision patches and the position of its first patch among its real (non-padding)
    tokens, never from its row in the batch: the same prompt keeps the same tokens alone or in any batch,
    and the same seed repeats a run.
    """

    layer: int = 2
    ratio: float = 0.5
    seed: int = 0

    needs_attention: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        set_field(self, "seed", check_int("seed", self.seed))

    def sample_seed(self, stage: int, num_patches: int, first_patch_position: int) -> int:
        """Seed of one sample's generator (see the class docstring)."""
        x = self.seed & _MASK
        for part in (stage, num_patches, first_patch_position):
            x = ((x ^ part) * _MIX + 1) & _MASK
        return x

    def score(self, ctx: StageContext, stage: int) -> torch.Tensor:
        candidates = ctx.image_index >= 0  # (B, M)
        counts = candidates.sum(1)
        # position of each row's first patch among its real tokens: independent of padding and batch row
        first = torch.where(candidates, ctx.input_positions, torch.iinfo(torch.long).max).min(dim=1).values
        scores = torch.zeros(candidates.shape, dtype=torch.float64)
        for b in range(candidates.shape[0]):
            n = int(counts[b])
            if n == 0:
                continue
            gen = torch.Generator().manual_seed(self.sample_seed(stage, n, int(first[b])))
            scores[b, candidates[b].cpu()] = torch.rand(n, generator=gen, dtype=torch.float64)
        return scores.to(candidates.device)


register_method("random", Random, matcher=single_stage_matcher(Random))
