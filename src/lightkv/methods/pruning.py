"""Shared pieces of the pruning baselines (Random, FastV, PDrop, DART): counts, score ranking, validation.

Pruning methods act per sample: the candidates are the image patches of a row (``image_index >= 0``; tokens
that are not patches, such as a CLS, are never removed), over all images of the sample together. A pruned
token is simply not kept; its ``MergeResult.destination`` is itself, and the engine sends its position in
the full-length output to the last kept slot before it.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..core import MergeResult

__all__ = ["drop_count", "kept_after_stages", "keep_top_scored", "last_token_attention", "check_ratio",
           "check_layer", "check_layers"]

# ratio * n is computed in float64; this slack keeps e.g. 0.3 * 10 from flooring to 2 on rounding noise
_EPS = 1e-9


def drop_count(ratio: float, n: int | torch.Tensor) -> int | torch.Tensor:
    """Tokens removed from ``n`` candidates at pruning ratio ``ratio``: floor(ratio * n)."""
    if isinstance(n, torch.Tensor):
        return torch.floor(n.to(torch.float64) * float(ratio) + _EPS).to(torch.long).clamp(max=n)
    return min(n, math.floor(n * float(ratio) + _EPS))


def kept_after_stages(n: int, ratios: Sequence[float]) -> list[int]:
    """Candidates left after each of a sequence of pruning stages, each removing ``drop_count`` of the rest."""
    out = []
    for ratio in ratios:
        n = n - drop_count(ratio, n)
        out.append(n)
    return out


def keep_top_scored(hidden: torch.Tensor, scores: torch.Tensor, candidates: torch.Tensor,
                    keep_counts: torch.Tensor, always_keep: torch.Tensor | None = None) -> MergeResult:
    """Keep, per row, the ``keep_counts`` highest-scored candidates; every other token is kept untouched.

    hidden: (B, M, D). scores: (B, M), only read on candidates (ties go to the earlier slot).
    candidates: (B, M) bool, the tokens that may be removed. keep_counts: (B,) long.
    always_keep: (B, M) bool, candidates kept first (they count towards ``keep_counts``).
    """
    B, M = candidates.shape
    ranked = scores.float().nan_to_num(nan=-math.inf)
    if always_keep is not None:
        ranked = torch.where(always_keep & candidates, math.inf, ranked)
    # non-candidates rank last; among candidates the stable sort keeps ties in slot order
    order = _lexsort(~candidates, -ranked)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(M, device=order.device).expand(B, M))
    keep = ~candidates | (rank < keep_counts[:, None])
    destination = torch.arange(M, device=hidden.device).expand(B, M)
    return MergeResult(keep, hidden, destination)


def _lexsort(primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """(B, M) order sorting each row by ``primary`` (bool, False first), then ``secondary`` ascending, then slot."""
    order = torch.argsort(secondary, dim=1, stable=True)
    return order.gather(1, torch.argsort(primary.gather(1, order).to(torch.uint8), dim=1, stable=True))


def last_token_attention(q: torch.Tensor, k: torch.Tensor, token_valid: torch.Tensor, scaling: float
                         ) -> torch.Tensor:
    """Attention that the last real token of each row pays to every slot, averaged over heads.

    q: (B, H, M, Dh) post-RoPE queries, k: (B, Hkv, M, Dh) post-RoPE keys (GQA: H a multiple of Hkv).
    token_valid: (B, M) bool. Causal softmax over keys (slots are in sequence order, so every real slot up
    to the last one), in fp32; only one query row per sample is formed. Returns (B, M), zero on padding.
    """
    B, H, M, Dh = q.shape
    Hkv = k.shape[1]
    slots = torch.arange(M, device=q.device)
    last = torch.where(token_valid, slots, -1).max(dim=1).values.clamp(min=0)  # (B,)
    q_last = q.gather(2, last[:, None, None, None].expand(B, H, 1, Dh))  # (B, H, 1, Dh)
    q_last = q_last.view(B, Hkv, H // Hkv, Dh).float()
    logits = torch.matmul(q_last, k.float().transpose(2, 3)) * scaling  # (B, Hkv, H/Hkv, M)
    allowed = token_valid & (slots[None, :] <= last[:, None])
    logits = logits.masked_fill(~allowed[:, None, None, :], -math.inf)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return probs.mean(dim=(1, 2))


def merge_into_nearest(hidden: torch.Tensor, image_index: torch.Tensor, centers: torch.Tensor,
                       members: torch.Tensor, destination: torch.Tensor) -> torch.Tensor:
    """Each member joins its most cosine-similar center of the same image; a center becomes the plain
    average of itself and its members. Used to recycle pruned tokens (SparseVLM, VisionZip's contextual tokens).

    hidden (B, M, D); image_index, centers, members (B, M); destination (B, M) is updated in place with the
    center slot of every member. Returns the new hidden states (a copy when anything merged).
    """
    if not bool(members.any()):
        return hidden
    rows_c, slots_c = torch.nonzero(centers, as_tuple=True)
    rows_m, slots_m = torch.nonzero(members, as_tuple=True)
    unit = torch.nn.functional.normalize(hidden.float(), dim=-1)
    sim = unit[rows_m, slots_m] @ unit[rows_c, slots_c].T  # (members, centers) cosine, fp32
    same_image = image_index[rows_m, slots_m][:, None] == image_index[rows_c, slots_c][None, :]
    best = sim.masked_fill(~same_image, -torch.inf).argmax(dim=1)
    destination[rows_m, slots_m] = slots_c[best]
    total = hidden[rows_c, slots_c].float()
    size = torch.ones(rows_c.numel(), device=hidden.device)
    total.index_add_(0, best, hidden[rows_m, slots_m].float())
    size.index_add_(0, best, torch.ones(best.numel(), device=hidden.device))
    hidden = hidden.clone()
    hidden[rows_c, slots_c] = (total / size[:, None]).to(hidden.dtype)
    return hidden


def check_ratio(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return float(value)


def check_layer(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer decoder layer index >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (a decoder layer index), got {value!r}")
    return value


def check_layers(name: str, values: Sequence[int]) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list of decoder layer indices, got {values!r}")
    out = tuple(check_layer(name, v) for v in values)
    if not out:
        raise ValueError(f"{name} needs at least one layer")
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"{name} must be strictly increasing, got {list(out)}")
    return out
