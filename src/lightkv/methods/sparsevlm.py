"""SparseVLM: text "raters" score the vision tokens at a few decoder layers; the rest are pruned and recycled.

At each stage (after decoder layer ``layers[s]``), per sample and image:
  1. Raters. The candidates are the prompt tokens after the row's first vision token (text before an image
     cannot attend to it). With A[t, j] the attention that candidate t pays to slot j at the stage layer
     (causal softmax over keys of the post-RoPE logits, averaged over heads, fp32), a candidate's relevance is
     its mean attention over the row's vision patches; the raters are the candidates whose relevance is at
     least the candidates' mean (SparseVLM's rule). Only the block candidates x keys is formed, never N x N.
     A row with images but no candidate (an image at the very end) uses its last token as the only rater.
  2. Scores. Each patch's score is the raters' mean attention to it.
  3. Prune. The ``keep_tokens[s]`` highest-scored patches of each image are kept as they are.
  4. Recycle. Of the p pruned patches, the r = min(p, floor(recycle_ratio * p) + 1) highest-scored are
     recycled into c = min(r, floor(cluster_ratio * r) + 1) extra tokens (the counts the reference code uses):
     the c highest-scored recycled patches are cluster centers, every other recycled patch joins its most
     similar center (cosine on the hidden states, fp32) and each center's hidden state becomes the plain
     average of its cluster. The center stays in its own slot (its original position); the other pruned
     patches are dropped. An image then holds keep + c tokens (or all of them when it had at most keep).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ._budget import search_schedule
from ..guidance import gather_rows
from ._common import check_ints, check_ratio, merge_into_nearest, rank_in_groups, set_field
from .base import Method, StageContext, StageResult
from .registry import register_method

__all__ = ["SparseVLM", "rater_scores", "SPARSEVLM_SETTINGS"]

# published kept tokens after layers 2 / 6 / 15 of LLaVA-1.5-7B (576 tokens per image), per setting
SPARSEVLM_SETTINGS = {64: (66, 30, 17), 128: (303, 110, 36), 192: (300, 200, 110)}
_REFERENCE_LAYERS, _REFERENCE_TOKENS = (2, 6, 15), 576
_EPS = 1e-9  # ratio * n is floored in float64; the slack keeps e.g. 0.3 * 10 from flooring to 2


def rater_scores(q: torch.Tensor, k: torch.Tensor, candidates: torch.Tensor, patches: torch.Tensor,
                 token_valid: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Raters' mean attention to every slot, and which slots are raters.

    q: (B, H, M, Dh) post-RoPE queries, k: (B, Hkv, M, Dh) post-RoPE keys (H a multiple of Hkv).
    candidates: (B, M) bool, possible raters. patches: (B, M) bool, the vision tokens being scored.
    token_valid: (B, M) bool. Slots are in sequence order, so causality is slot(key) <= slot(query).
    Returns scores (B, M) fp32 and raters (B, M) bool.
    """
    B, H, M, Dh = q.shape
    Hkv = k.shape[1]
    index, cand_valid = gather_rows(candidates)  # (B, T)
    T = index.shape[1]
    q_c = q.gather(2, index[:, None, :, None].expand(B, H, T, Dh)).view(B, Hkv, H // Hkv, T, Dh)
    slots = torch.arange(M, device=q.device)
    allowed = (slots[None, None, :] <= index[:, :, None]) & token_valid[:, None, :]  # (B, T, M)
    allowed |= slots[None, None, :] == index[:, :, None]  # keeps padded candidate rows finite
    attn = torch.zeros(B, T, M, dtype=torch.float32, device=q.device)
    for h in range(Hkv):  # one KV head (and its query group) at a time: (B, G, T, M) in memory
        logits = torch.matmul(q_c[:, h].float(), k[:, h, None].float().transpose(2, 3)) * scaling
        attn += torch.softmax(logits.masked_fill(~allowed[:, None], -math.inf), dim=-1).sum(dim=1)
    attn /= H
    relevance = (attn * patches[:, None, :]).sum(-1) / patches.sum(-1, keepdim=True).clamp(min=1)  # (B, T)
    mean = (relevance * cand_valid).sum(1, keepdim=True) / cand_valid.sum(1, keepdim=True).clamp(min=1)
    is_rater = cand_valid & (relevance >= mean)
    scores = (attn * is_rater[..., None]).sum(1) / is_rater.sum(1, keepdim=True).clamp(min=1)
    raters = torch.zeros(B, M, dtype=torch.bool, device=q.device)
    raters.scatter_(1, index, is_rater)  # padded entries of ``index`` carry False
    return scores, raters


@dataclass(frozen=True)
class SparseVLM(Method):
    """SparseVLM (Zhang et al., ICML 2025): text-rater-guided pruning with token recycling, at a few layers.

    layers: decoder layers after which a stage runs (strictly increasing, >= 0).
    keep_tokens: vision tokens of each image kept by score at each stage (>= 0, same length as layers);
        recycled tokens come on top. Published (layers 2/6/15 of LLaVA-1.5-7B, 576 tokens): (66, 30, 17),
        (303, 110, 36), (300, 200, 110) for the 64 / 128 / 192-token settings (``SparseVLM.published(n)``);
        the default is the 192-token one.
    recycle_ratio: fraction of the pruned tokens (highest-scored first) that are recycled, in [0, 1];
        0 turns recycling off. cluster_ratio: clusters per recycled token, in [0, 1] (see the module doc).
    """

    layers: Sequence[int] = _REFERENCE_LAYERS
    keep_tokens: Sequence[int] = SPARSEVLM_SETTINGS[192]
    recycle_ratio: float = 0.3
    cluster_ratio: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        set_field(self, "layers", check_ints("layers", self.layers, 0))
        set_field(self, "keep_tokens", check_ints("keep_tokens", self.keep_tokens, 0))
        if not self.layers:
            raise ValueError("SparseVLM needs at least one stage (layers is empty)")
        if any(b <= a for a, b in zip(self.layers, self.layers[1:])):
            raise ValueError(f"layers must be strictly increasing, got {list(self.layers)}")
        if len(self.keep_tokens) != len(self.layers):
            raise ValueError(f"keep_tokens needs one count per layer: {len(self.layers)} layers, "
                             f"{len(self.keep_tokens)} counts")
        set_field(self, "recycle_ratio", check_ratio("recycle_ratio", self.recycle_ratio))
        set_field(self, "cluster_ratio", check_ratio("cluster_ratio", self.cluster_ratio))

    @property
    def stage_layers(self) -> tuple[int, ...]:
        return tuple(self.layers)

    @property
    def needs_attention(self) -> bool:
        return True

    # -- counts -----------------------------------------------------------------------------------------------
    def stage_counts(self, stage: int, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image of ``n`` (long tensor) current patches: kept by score, recycled, and clusters."""
        keep = n.clamp(max=self.keep_tokens[stage])
        pruned = n - keep
        recycled = torch.floor(pruned.to(torch.float64) * self.recycle_ratio + _EPS).long() + 1
        recycled = torch.where((pruned > 0) & (self.recycle_ratio > 0), recycled.clamp(max=pruned), 0)
        clusters = (torch.floor(recycled.to(torch.float64) * self.cluster_ratio + _EPS).long() + 1)
        clusters = torch.where(recycled > 0, clusters.clamp(max=recycled), 0)
        return keep, recycled, clusters

    def kept_after_each_stage(self, grids: tuple[tuple[int, int], ...]) -> list[int]:
        """Vision tokens of the sample after each stage: every image keeps its own kept + recycled clusters."""
        current = torch.tensor([h * w for h, w in grids])
        out = []
        for stage in range(len(self.layers)):
            keep, _, clusters = self.stage_counts(stage, current)
            current = keep + clusters
            out.append(int(current.sum()))
        return out

    @classmethod
    def published(cls, tokens: int, **kwargs: Any) -> "SparseVLM":
        """The published schedule for the ``tokens`` (64, 128 or 192) setting of LLaVA-1.5-7B."""
        if tokens not in SPARSEVLM_SETTINGS:
            raise ValueError(f"published SparseVLM settings exist for {sorted(SPARSEVLM_SETTINGS)} tokens, "
                             f"got {tokens}")
        return cls(layers=_REFERENCE_LAYERS, keep_tokens=SPARSEVLM_SETTINGS[tokens], **kwargs)

    @classmethod
    def scaled(cls, layers: Sequence[int], tokens_per_image: int, scale: float, **kwargs: Any) -> "SparseVLM":
        """The published 192-token profile (300, 200, 110 of 576 tokens) times ``scale`` (>= 0), for images of
        ``tokens_per_image`` tokens, on the first ``len(layers)`` stages; used to match budgets."""
        profile = SPARSEVLM_SETTINGS[192][: len(layers)]
        keep = [min(tokens_per_image, math.floor(scale * t * tokens_per_image / _REFERENCE_TOKENS + 0.5))
                for t in profile]
        return cls(layers=layers, keep_tokens=keep, **kwargs)

    # -- the stage ----------------------------------------------------------------------------------------
    def reduce(self, ctx: StageContext, stage: int) -> StageResult:
        hidden = ctx.hidden
        B, M, D = hidden.shape
        device = hidden.device
        patches = ctx.image_index >= 0  # (B, M)
        keep = torch.ones(B, M, dtype=torch.bool, device=device)
        destination = torch.arange(M, device=device).expand(B, M).clone()
        counts = ctx.image_token_counts()  # (I,)
        n_keep, n_recycled, n_clusters = self.stage_counts(stage, counts)
        if not bool((n_keep < counts).any()):
            return StageResult(keep, hidden, destination)  # nothing to prune: no attention needed

        candidates = ctx.token_valid & ~ctx.vision_mask & ctx.after_first_image()
        slots = torch.arange(M, device=device).expand(B, M)
        last = torch.where(ctx.token_valid, slots, -1).max(dim=1, keepdim=True).values
        no_candidate = ~candidates.any(1, keepdim=True) & patches.any(1, keepdim=True)
        candidates = candidates | (no_candidate & (slots == last))
        q, k, scaling = ctx.attention()
        scores, _ = rater_scores(q, k, candidates, patches, ctx.token_valid, scaling)

        image = ctx.image_index.clamp(min=0)
        rank = rank_in_groups(ctx.image_index, -scores)  # 0 = highest score in its image
        kept = patches & (rank < n_keep[image])
        recycled = patches & ~kept & (rank < (n_keep + n_recycled)[image])
        centers = recycled & (rank < (n_keep + n_clusters)[image])
        members = recycled & ~centers
        keep = ~patches | kept | centers

        hidden = merge_into_nearest(hidden, ctx.image_index, centers, members, destination)
        return StageResult(keep, hidden, destination)


SPARSEVLM_REFERENCE = (_REFERENCE_LAYERS, 32)  # layers, depth (LLaVA-1.5-7B)


def _sparsevlm_matcher(target: float, num_layers: int, grids: tuple[tuple[int, int], ...], **fields: Any
                       ) -> Any:
    """Published layers placed on the depth; the published 192-token keep profile (300, 200, 110 of 576)
    scaled by one factor: ratio 0 keeps every token at every stage, ratio 1 keeps only recycled clusters.
    Keep counts are per image, sized on the sample's largest image."""
    layers_ref, depth = SPARSEVLM_REFERENCE
    tokens = max(h * w for h, w in grids)
    full_scale = _REFERENCE_TOKENS / SPARSEVLM_SETTINGS[192][-1]  # the smallest count reaches the whole image

    def build(layers: tuple[int, ...], ratio: float) -> SparseVLM:
        return SparseVLM.scaled(layers, tokens, (1.0 - ratio) * full_scale, **fields)

    return search_schedule(build, layers_ref, depth, target, num_layers, grids=grids)


register_method("sparsevlm", SparseVLM, matcher=_sparsevlm_matcher)
