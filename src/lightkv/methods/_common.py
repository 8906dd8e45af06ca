"""Shared pieces of the methods: counting, ranking, scoring helpers, field validation and image grids.

Private to ``lightkv.methods``: every method imports what it shares from here, never from another method.
Pruning acts per sample: the candidates are the image patches of a row (``image_index >= 0``; tokens that are
not patches, such as a CLS, are never removed), over all images of the sample together. A pruned token is
simply not kept; its ``StageResult.destination`` is itself, and the engine sends its position in the
full-length output to the last kept slot before it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import torch

from ..core import StageResult

__all__ = ["drop_count", "kept_after_stages", "keep_top_scored", "last_token_attention", "merge_into_nearest",
           "rank_in_groups", "check_ratio", "check_ratios", "check_layer", "check_layers", "check_int",
           "check_ints", "normalize_grids", "as_grid", "set_field"]

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
                    keep_counts: torch.Tensor, always_keep: torch.Tensor | None = None) -> StageResult:
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
    return StageResult(keep, hidden, destination)


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



def rank_in_groups(groups: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """(B, M) rank of each token inside its group by ascending ``key`` (ties: earlier row, then slot).

    groups: (B, M) long group ids, -1 = no group (those get arbitrary ranks). key: (B, M) float.
    """
    flat_groups = groups.reshape(-1)
    order = torch.argsort(key.reshape(-1), stable=True)
    order = order[torch.argsort(flat_groups[order], stable=True)]  # by group, then key, then position
    sorted_groups = flat_groups[order]
    is_start = torch.ones_like(sorted_groups, dtype=torch.bool)
    is_start[1:] = sorted_groups[1:] != sorted_groups[:-1]
    positions = torch.arange(order.numel(), device=order.device)
    start = torch.cummax(torch.where(is_start, positions, 0), dim=0).values
    rank = torch.empty_like(order)
    rank[order] = positions - start
    return rank.view_as(groups)


def set_field(method: Any, name: str, value: Any) -> None:
    """Assign a field of a frozen method while it is being built (its ``__post_init__``)."""
    object.__setattr__(method, name, value)


# ---------------------------------------------------------------------------------------------------------------
# field validation: plain Python numbers, numpy scalars and arrays alike (numbers.Integral / numbers.Real);
# booleans are never numbers here


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def _as_list(name: str, values: Any, what: str) -> list:
    """A list from a sequence or an array (numpy/torch ``tolist``); strings and mappings are refused."""
    if isinstance(values, (str, bytes, dict)):
        raise TypeError(f"{name} must be a list of {what}, got {values!r}")
    if not isinstance(values, (list, tuple)) and callable(getattr(values, "tolist", None)):
        values = values.tolist()
        if not isinstance(values, list):  # a 0-d array
            raise TypeError(f"{name} must be a list of {what}, got a single value {values!r}")
    if not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list of {what}, got {values!r}")
    return list(values)


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an int (any integral number, not a bool), at least ``minimum``."""
    if not _is_int(value):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise TypeError(f"{name} must be an integer{bound}, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_ints(name: str, values: Any, minimum: int | None = None) -> tuple[int, ...]:
    """A tuple of ints from a list or array; every entry at least ``minimum``."""
    items = _as_list(name, values, "integers")
    for v in items:
        if not _is_int(v):
            raise TypeError(f"{name} must contain integers, got {v!r}")
    out = tuple(int(v) for v in items)
    if minimum is not None and any(v < minimum for v in out):
        raise ValueError(f"{name} must contain integers >= {minimum}, got {list(out)}")
    return out


def check_ratio(name: str, value: Any) -> float:
    """``value`` as a float in [0, 1]."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return float(value)


def check_ratios(name: str, values: Any) -> tuple[float, ...]:
    """A tuple of floats in [0, 1] from a list or array."""
    items = _as_list(name, values, "numbers")
    for v in items:
        if not _is_real(v):
            raise TypeError(f"{name} must contain numbers, got {v!r}")
    out = tuple(float(v) for v in items)
    if any(not (0.0 <= p <= 1.0) or math.isnan(p) for p in out):
        raise ValueError(f"{name} must lie in [0, 1], got {list(out)}")
    return out


def check_layer(name: str, value: Any) -> int:
    """A decoder layer index >= 0."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an integer decoder layer index >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (a decoder layer index), got {value!r}")
    return int(value)


def check_layers(name: str, values: Any) -> tuple[int, ...]:
    """Decoder layer indices >= 0, at least one, strictly increasing."""
    out = tuple(check_layer(name, v) for v in _as_list(name, values, "decoder layer indices"))
    if not out:
        raise ValueError(f"{name} needs at least one layer")
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"{name} must be strictly increasing, got {list(out)}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# image grids


def as_grid(grid: Any) -> tuple[int, int]:
    """One image's token grid: (rows, cols) of positive integers, or a token count that is a perfect square."""
    if _is_int(grid):
        side = math.isqrt(int(grid)) if grid > 0 else 0
        if side < 1 or side * side != grid:
            raise ValueError(f"{grid} vision tokens is not a square grid; pass grid=(rows, cols)")
        return side, side
    if isinstance(grid, Sequence) and not isinstance(grid, str) and len(grid) == 2 \
            and all(_is_int(g) and g > 0 for g in grid):
        return int(grid[0]), int(grid[1])
    raise ValueError(f"grid must be (rows, cols) of positive integers or a square token count, got {grid!r}")


def normalize_grids(grids: Any) -> tuple[tuple[int, int], ...]:
    """The (rows, cols) token grid of every image of one sample, e.g. [(24, 24), (12, 18)]; at least one."""
    if isinstance(grids, (str, bytes)) or not isinstance(grids, Sequence) or not grids:
        raise ValueError(f"grids must be a non-empty list of (rows, cols), one per image, got {grids!r}")
    out = []
    for grid in grids:
        if _is_int(grid):
            raise ValueError(f"grids must be a list of (rows, cols) pairs, one per image, got {grids!r}; "
                             f"for one image write [{tuple(grids)!r}]" if len(grids) == 2 else
                             f"grids must be a list of (rows, cols) pairs, one per image, got {grids!r}")
        out.append(as_grid(grid))
    return tuple(out)


def scale_layers(layers: tuple[int, ...] | list[int], reference_depth: int, depth: int) -> tuple[int, ...]:
    """Map stage layers of a ``reference_depth``-layer decoder to a ``depth``-layer one.

    Keeps the share of layers before, between and after stages: layer l (0-based) becomes
    round((l + 1) * depth / reference_depth) - 1, bumped to stay strictly increasing. Stages that would land on
    the last layer or beyond (where they cannot shorten anything) are dropped. E.g. 12, 18, 24 of 32 -> 2, 4, 5
    of 8 and 15, 23, 30 of 40.
    """
    if depth == reference_depth:
        return tuple(layers)
    out: list[int] = []
    for layer in layers:
        scaled = math.floor((layer + 1) * depth / reference_depth + 0.5) - 1
        scaled = max(scaled, out[-1] + 1 if out else 0)
        if scaled >= depth - 1:
            break
        out.append(scaled)
    return tuple(out)
