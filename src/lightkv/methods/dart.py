"""DART (Wen et al., 2025): after layer K, keep the vision tokens least duplicated w.r.t. a few pivot tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..core import MergeResult
from .base import Method
from .pruning import check_layer, check_ratio, drop_count, keep_top_scored, kept_after_stages

if TYPE_CHECKING:
    from ..engine import StageContext

__all__ = ["DART"]


@dataclass
class DART(Method):
    """Once, after decoder ``layer``, per sample of n vision patches:

    1. pivots: the ``num_pivots`` patches with the largest key norm at that layer. The norm is the L2 norm of
       the layer's post-RoPE key over all KV heads; RoPE rotates pairs of dimensions, so it equals the
       pre-RoPE norm (up to float rounding).
    2. duplication of every other patch: its largest cosine similarity to any pivot, on the layer's output
       hidden states (fp32).
    3. keep n - floor(ratio * n) patches: the pivots (always kept; only the top ones by key norm when fewer
       than ``num_pivots`` are kept) and then the least duplicated patches.

    layer: 0-based decoder layer (paper K=2; see FastV for the counting convention). ratio: fraction of the
    patches dropped, in [0, 1]. num_pivots: >= 1 (paper: 8). Needs no attention map, only the keys.
    """

    layer: int = 2
    ratio: float = 0.5
    num_pivots: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        self.layer = check_layer("layer", self.layer)
        self.ratio = check_ratio("ratio", self.ratio)
        if isinstance(self.num_pivots, bool) or not isinstance(self.num_pivots, int):
            raise TypeError(f"num_pivots must be an integer >= 1, got {self.num_pivots!r}")
        if self.num_pivots < 1:
            raise ValueError(f"num_pivots must be >= 1, got {self.num_pivots}")

    @property
    def stage_layers(self) -> tuple[int, ...]:
        return (self.layer,)

    @property
    def needs_attention(self) -> bool:
        return True  # the keys of the stage layer

    def kept_after(self, n: int) -> list[int]:
        """Vision patches left after each stage for a sample of ``n`` patches."""
        return kept_after_stages(n, [self.ratio])

    def reduce(self, ctx: "StageContext", stage: int) -> MergeResult:
        candidates = ctx.image_index >= 0  # (B, M)
        counts = candidates.sum(1)
        keep_counts = counts - drop_count(self.ratio, counts)
        _, k, _ = ctx.attention()  # (B, Hkv, M, Dh)
        key_norm = k.float().pow(2).sum(dim=(1, 3)).sqrt()  # (B, M)
        pivot_counts = keep_counts.clamp(max=self.num_pivots)
        pivots = keep_top_scored(ctx.hidden, key_norm, candidates, pivot_counts).keep & candidates
        unit = torch.nn.functional.normalize(ctx.hidden.float(), dim=-1)  # (B, M, D)
        duplication = _max_similarity_to(unit, pivots)  # (B, M); only tokens x pivots is formed
        return keep_top_scored(ctx.hidden, -duplication, candidates, keep_counts, always_keep=pivots)


def _max_similarity_to(unit: torch.Tensor, pivots: torch.Tensor) -> torch.Tensor:
    """(B, M) largest dot product of each row of ``unit`` (B, M, D) with that sample's pivot rows."""
    B, M, D = unit.shape
    P = max(int(pivots.sum(1).max()), 1)
    order = torch.argsort((~pivots).to(torch.uint8), dim=1, stable=True)[:, :P]  # pivot slots first
    present = torch.arange(P, device=unit.device)[None, :] < pivots.sum(1, keepdim=True)  # (B, P)
    pivot_feats = unit.gather(1, order[:, :, None].expand(B, P, D))  # (B, P, D)
    sim = unit @ pivot_feats.transpose(1, 2)  # (B, M, P)
    sim = sim.masked_fill(~present[:, None, :], -torch.inf)
    return sim.max(dim=-1).values
