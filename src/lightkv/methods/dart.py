"""DART (Wen et al., 2025): after layer K, keep the vision tokens least duplicated w.r.t. a few pivot tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import check_int, keep_top_scored, set_field
from ._matchers import single_stage_matcher
from .base import ScorePruneMethod, StageContext
from .registry import register_method

__all__ = ["DART"]

_PIVOTS = "dart_pivots"  # ctx.method_state key: the pivots of the stage in progress, from always_keep to score


@dataclass(frozen=True)
class DART(ScorePruneMethod):
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
        set_field(self, "num_pivots", check_int("num_pivots", self.num_pivots, 1))

    def always_keep(self, ctx: StageContext, stage: int, keep_counts: torch.Tensor) -> torch.Tensor:
        candidates = ctx.image_index >= 0  # (B, M)
        _, k, _ = ctx.attention()  # (B, Hkv, M, Dh)
        key_norm = k.float().pow(2).sum(dim=(1, 3)).sqrt()  # (B, M)
        pivots = keep_top_scored(ctx.hidden, key_norm, candidates, keep_counts.clamp(max=self.num_pivots))
        ctx.method_state[_PIVOTS] = pivots.keep & candidates
        return ctx.method_state[_PIVOTS]

    def score(self, ctx: StageContext, stage: int) -> torch.Tensor:
        unit = torch.nn.functional.normalize(ctx.hidden.float(), dim=-1)  # (B, M, D)
        # only tokens x pivots is formed; a row has at most num_pivots pivots (no host read of the count)
        return -_max_similarity_to(unit, ctx.method_state.pop(_PIVOTS), self.num_pivots)


def _max_similarity_to(unit: torch.Tensor, pivots: torch.Tensor, most: int) -> torch.Tensor:
    """(B, M) largest dot product of each row of ``unit`` (B, M, D) with that sample's pivot rows (at most
    ``most`` per row; missing ones are masked)."""
    B, M, D = unit.shape
    P = max(min(most, M), 1)
    order = torch.argsort((~pivots).to(torch.uint8), dim=1, stable=True)[:, :P]  # pivot slots first
    present = torch.arange(P, device=unit.device)[None, :] < pivots.sum(1, keepdim=True)  # (B, P)
    pivot_feats = unit.gather(1, order[:, :, None].expand(B, P, D))  # (B, P, D)
    sim = unit @ pivot_feats.transpose(1, 2)  # (B, M, P)
    sim = sim.masked_fill(~present[:, None, :], -torch.inf)
    return sim.max(dim=-1).values


register_method("dart", DART, matcher=single_stage_matcher(DART))
