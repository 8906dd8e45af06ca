"""Pure tensor functions of LightKV's merge step (METHOD.md, steps 1-6).

Nothing here knows about models: inputs are hidden states, per-token group ids and guidance weights.
Shapes: B batch rows, N tokens per row, D hidden size, G groups (image windows) in the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "StageResult",
    "MergeResult",
    "band_index",
    "window_index",
    "window_groups",
    "merge_count",
    "bipartite_merge",
    "compact_indices",
]


def band_index(size: int, bands: int, device: torch.device | None = None) -> torch.Tensor:
    """Band of each of ``size`` rows when split into ``bands`` near-equal bands.

    The first ``size % bands`` bands get one extra row. Returns a long tensor of shape (size,).
    """
    base, extra = divmod(size, bands)
    sizes = torch.tensor([base + (1 if b < extra else 0) for b in range(bands)], device=device)
    return torch.repeat_interleave(torch.arange(bands, device=device), sizes)


def window_index(rows: torch.Tensor, cols: torch.Tensor, grid_h: torch.Tensor, grid_w: torch.Tensor,
                 windows: int) -> torch.Tensor:
    """Window id in [0, windows**2) of tokens at grid coordinates (rows, cols).

    ``grid_h``/``grid_w`` hold each token's grid size (any shape broadcastable with ``rows``), so tokens of
    images with different grids are handled in one call. Row r of an H-row grid lies in band b when
    start(b) <= r < start(b+1), start(b) = b*(H//W) + min(b, H%W); this is ``band_index`` in closed form.
    """
    def band(coord: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        base = torch.div(size, windows, rounding_mode="floor")
        extra = size - base * windows
        # rows covered by the first `extra` bands, each of height base + 1
        big = extra * (base + 1)
        in_big = coord < big
        b_big = torch.div(coord, base + 1, rounding_mode="floor")
        b_small = extra + torch.div(coord - big, base.clamp(min=1), rounding_mode="floor")
        return torch.where(in_big, b_big, b_small)

    return band(rows, grid_h) * windows + band(cols, grid_w)


def window_groups(image_index: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, grid_hw: torch.Tensor,
                  windows: int, active_images: torch.Tensor | None = None) -> torch.Tensor:
    """Group id of each token for one stage: one group per (image, window); -1 for tokens never merged.

    image_index: (B, N) long, index into ``grid_hw`` or -1 for tokens that are not image patches.
    rows, cols: (B, N) long, original grid coordinates of the patches.
    grid_hw: (I, 2) long, grid rows and columns of each image.
    active_images: (I,) bool, images that take part in this stage (others are skipped).
    Returns (B, N) long.
    """
    is_patch = image_index >= 0
    safe_image = image_index.clamp(min=0)
    grid_h = grid_hw[safe_image, 0]
    grid_w = grid_hw[safe_image, 1]
    window = window_index(rows.clamp(min=0), cols.clamp(min=0), grid_h, grid_w, windows)
    groups = safe_image * (windows * windows) + window
    if active_images is not None:
        is_patch = is_patch & active_images[safe_image]
    return torch.where(is_patch, groups, torch.full_like(groups, -1))


def merge_count(ratio: float, n_tokens: torch.Tensor) -> torch.Tensor:
    """r = min(floor(ratio * n), floor(n / 2)) per window (METHOD.md step 4), computed in float64."""
    r = torch.floor(n_tokens.to(torch.float64) * float(ratio)).to(torch.long)
    return torch.minimum(r, torch.div(n_tokens, 2, rounding_mode="floor"))


@dataclass
class StageResult:
    """Output of one stage of any method (merge or prune).

    keep: (B, N) bool, tokens that survive.
    hidden: (B, N, D), hidden states after the stage (kept tokens updated, others unchanged).
    destination: (B, N) long, slot each token now lives in: itself when kept, the kept slot it was merged
        into, or itself for a pruned token (merged nowhere).
    """

    keep: torch.Tensor
    hidden: torch.Tensor
    destination: torch.Tensor


MergeResult = StageResult  # the former name, kept for compatibility


def bipartite_merge(hidden: torch.Tensor, groups: torch.Tensor, guidance: torch.Tensor | None,
                    ratio: float) -> StageResult:
    """Windowed bipartite matching and guided many-to-one merge, batched over all groups.

    hidden: (B, N, D). groups: (B, N) long group ids, -1 = not merged; a group must not span rows.
    guidance: (B, N) non-negative weights g_t, or None for equal weights. ratio: fraction P of each group.
    Inside a group tokens are ranked by slot (= sequence order); even ranks form A, odd ranks form B.
    """
    B, N, D = hidden.shape
    device = hidden.device
    flat_groups = groups.reshape(-1)
    members = torch.nonzero(flat_groups >= 0).squeeze(1)  # flat token ids, already in (row, slot) order
    keep = torch.ones(B * N, dtype=torch.bool, device=device)
    destination = torch.arange(B * N, device=device)
    if members.numel() == 0:
        return StageResult(keep.view(B, N), hidden, (destination % N).view(B, N))

    # Sort members by group; a stable sort keeps sequence order inside each group.
    member_groups = flat_groups[members]
    order = torch.sort(member_groups, stable=True).indices
    members = members[order]
    member_groups = member_groups[order]
    unique_groups, group_of_member, group_sizes = torch.unique_consecutive(
        member_groups, return_inverse=True, return_counts=True)
    G = unique_groups.numel()
    starts = torch.cumsum(group_sizes, 0) - group_sizes
    rank = torch.arange(members.numel(), device=device) - starts[group_of_member]

    # Padded (G, nA) / (G, nB) tables of flat token ids; -1 pads.
    max_size = int(group_sizes.max())
    n_a, n_b = (max_size + 1) // 2, max_size // 2
    is_a = rank % 2 == 0
    half_rank = torch.div(rank, 2, rounding_mode="floor")
    table_a = torch.full((G, max(n_a, 1)), -1, dtype=torch.long, device=device)
    table_b = torch.full((G, max(n_b, 1)), -1, dtype=torch.long, device=device)
    table_a[group_of_member[is_a], half_rank[is_a]] = members[is_a]
    table_b[group_of_member[~is_a], half_rank[~is_a]] = members[~is_a]

    flat_hidden = hidden.reshape(B * N, D)
    unit = torch.nn.functional.normalize(flat_hidden.float(), dim=-1)
    feats_a = unit[table_a.clamp(min=0)]  # (G, nA, D)
    feats_b = unit[table_b.clamp(min=0)]  # (G, nB, D)
    sim = feats_a @ feats_b.transpose(1, 2)  # (G, nA, nB) cosine similarity in fp32
    sim = sim.masked_fill((table_b < 0)[:, None, :], float("-inf"))
    score, best = sim.max(dim=-1)  # (G, nA)
    valid_a = (table_a >= 0) & (table_b[:, :1] >= 0)  # a group of one token has no B side
    score = score.masked_fill(~valid_a, float("-inf"))

    # Top-r of A per group; ties go to the lower rank (stable sort).
    r = merge_count(ratio, group_sizes)  # (G,)
    sorted_idx = torch.sort(score, dim=-1, descending=True, stable=True).indices
    position = torch.empty_like(sorted_idx)
    position.scatter_(1, sorted_idx, torch.arange(sorted_idx.shape[1], device=device).expand_as(sorted_idx))
    merged_a = (position < r[:, None]) & valid_a  # (G, nA)

    src = table_a[merged_a]  # flat ids of merged A tokens
    dst = table_b.gather(1, best)[merged_a]  # their best(a)
    keep[src] = False
    destination[src] = dst

    # Message passing: x_b <- (g_b x_b + sum g_a x_a) / (g_b + sum g_a); equal weights when the sum is 0.
    if guidance is None:
        weights = torch.ones(B * N, device=device, dtype=torch.float32)
    else:
        weights = guidance.reshape(-1).float().clamp(min=0)
    receivers = torch.unique(dst)
    touched = torch.cat([receivers, src])
    group_dst = torch.cat([receivers, dst])  # every touched token is summed into its receiver
    x = flat_hidden[touched].float()
    num = torch.zeros(B * N, D, dtype=torch.float32, device=device)
    den = torch.zeros(B * N, dtype=torch.float32, device=device)
    num.index_add_(0, group_dst, weights[touched, None] * x)
    den.index_add_(0, group_dst, weights[touched])
    equal_num = torch.zeros_like(num).index_add_(0, group_dst, x)
    equal_den = torch.zeros_like(den).index_add_(0, group_dst, torch.ones_like(den[touched]))
    zero = den[receivers] <= 0
    merged = torch.where(zero[:, None], equal_num[receivers] / equal_den[receivers, None],
                         num[receivers] / den[receivers].clamp(min=torch.finfo(torch.float32).tiny)[:, None])
    new_hidden = flat_hidden.clone()
    new_hidden[receivers] = merged.to(hidden.dtype)
    return StageResult(keep.view(B, N), new_hidden.view(B, N, D), (destination % N).view(B, N))


def compact_indices(keep: torch.Tensor, destination: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded gather indices for the kept slots of every row.

    keep: (B, N) bool. destination: (B, N) long slot each token lives in (None: tokens that are not kept
    map to slot 0 of their row). Returns
      source: (B, M) long, old slot of each new slot (pads point at the row's first kept slot, or 0),
      valid: (B, M) bool, False on pads,
      new_slot: (B, N) long, new slot of each old token (merged tokens follow their destination).
    Kept slots keep their order, and the last kept slot of every row lands in column M-1.
    """
    B, N = keep.shape
    device = keep.device
    counts = keep.sum(dim=1)
    M = int(counts.max()) if B > 0 else 0
    offset = (M - counts)[:, None]
    rank = torch.cumsum(keep.long(), dim=1) - 1
    target = torch.where(keep, offset + rank, torch.zeros_like(rank))
    first_kept = torch.where(counts > 0, keep.long().argmax(dim=1), torch.zeros_like(counts))
    source = first_kept[:, None].expand(B, M).clone()
    valid = torch.zeros(B, M, dtype=torch.bool, device=device)
    rows = torch.arange(B, device=device)[:, None].expand(B, N)
    source[rows[keep], target[keep]] = torch.arange(N, device=device).expand(B, N)[keep]
    valid[rows[keep], target[keep]] = True
    if destination is None:
        destination = torch.where(keep, torch.arange(N, device=device).expand(B, N), first_kept[:, None])
    new_slot = target.gather(1, destination)
    return source, valid, new_slot


def reference_merge_count(ratio: float, n: int) -> int:
    """Scalar form of ``merge_count`` for plain-Python callers."""
    return min(math.floor(n * ratio), n // 2)
