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
    "GroupOrder",
    "group_order",
    "read_ints",
    "merged_per_row",
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
    kept_counts: optional, the kept real tokens of each row (``(keep & token_valid).sum(1)``) on the host, when
        the method read them back with its own read; the engine then needs no read of its own for the new length.
    """

    keep: torch.Tensor
    hidden: torch.Tensor
    destination: torch.Tensor
    kept_counts: list[int] | None = None


MergeResult = StageResult  # the former name, kept for compatibility


@dataclass
class GroupOrder:
    """Tokens sorted by merge group (``group_order``), shared by the sizing read and ``bipartite_merge``.

    All (T,) over the B * N flat tokens, in (group, slot) order: order (flat token ids), member (in a group),
    dense (dense group index, non-members form the last one), rank (rank inside the group), dense_member
    (dense index of members, T for non-members). group_sizes: (T + 1,) tokens of each dense group (spare last).
    sizes: (2,) long on the device, the number of groups and the largest group (what sizes the merge tables).
    """

    order: torch.Tensor
    member: torch.Tensor
    dense: torch.Tensor
    rank: torch.Tensor
    group_sizes: torch.Tensor
    sizes: torch.Tensor


def group_order(groups: torch.Tensor) -> GroupOrder:
    """Sort the tokens of ``groups`` (B, N) long (-1: not merged) by group, sequence order inside a group; no
    device -> host read (``GroupOrder.sizes`` stays on the device until the caller reads it)."""
    flat_groups = groups.reshape(-1)
    T = flat_groups.shape[0]
    device = groups.device
    is_member = flat_groups >= 0
    # a stable sort keeps sequence order inside each group; non-members last
    key = torch.where(is_member, flat_groups, torch.iinfo(torch.long).max)
    order = torch.sort(key, stable=True).indices  # flat token ids by (group, slot)
    sorted_member = is_member[order]
    sorted_key = key[order]
    is_start = torch.ones_like(sorted_member)
    is_start[1:] = sorted_key[1:] != sorted_key[:-1]
    dense = torch.cumsum(is_start.long(), 0) - 1  # dense group index; non-members form the last one
    positions = torch.arange(T, device=device)
    start = torch.cummax(torch.where(is_start, positions, 0), dim=0).values
    dense_member = torch.where(sorted_member, dense, T)
    group_sizes = torch.zeros(T + 1, dtype=torch.long, device=device).index_add_(
        0, dense_member, torch.ones_like(dense_member))
    largest = group_sizes[:T].max() if T else group_sizes.new_zeros(())
    sizes = torch.stack([(is_start & sorted_member).sum(), largest])
    return GroupOrder(order, sorted_member, dense, positions - start, group_sizes, sizes)


def merged_per_row(order: GroupOrder, ratio: float, batch: int, length: int) -> torch.Tensor:
    """(batch,) long, tokens ``bipartite_merge`` will merge away in each row at ``ratio``: the sum of
    ``merge_count`` over the row's groups (every group of n >= 2 tokens merges exactly r of its ceil(n / 2) A
    tokens); computed from the group sizes, before the merge, without a host read. ``length``: N."""
    T = order.order.shape[0]
    dense = torch.where(order.member, order.dense, T)  # members' dense group; T: none
    group_row = torch.zeros(T + 1, dtype=torch.long, device=dense.device).scatter_(
        0, dense, torch.div(order.order, length, rounding_mode="floor"))  # all members of a group: one row
    r = merge_count(ratio, order.group_sizes)  # (T + 1,), 0 for empty dense ids and the spare
    return torch.zeros(batch, dtype=torch.long, device=dense.device).index_add_(0, group_row[:T], r[:T])


def read_ints(*tensors: torch.Tensor) -> list[list[int]]:
    """One device -> host read of several integer or bool tensors (of one device): each as a flat list."""
    if not tensors:
        return []
    values = torch.cat([t.reshape(-1).long() for t in tensors]).tolist()
    out, at = [], 0
    for t in tensors:
        out.append(values[at:at + t.numel()])
        at += t.numel()
    return out


def bipartite_merge(hidden: torch.Tensor, groups: torch.Tensor, guidance: torch.Tensor | None,
                    ratio: float, order: GroupOrder | None = None,
                    sizes: tuple[int, int] | None = None) -> StageResult:
    """Windowed bipartite matching and guided many-to-one merge, batched over all groups.

    hidden: (B, N, D). groups: (B, N) long group ids, -1 = not merged; a group must not span rows.
    guidance: (B, N) non-negative weights g_t, or None for equal weights. ratio: fraction P of each group.
    Inside a group tokens are ranked by slot (= sequence order); even ranks form A, odd ranks form B.
    order: ``group_order(groups)`` when the caller already built it. sizes: the number of groups and the largest
    group, ``order.sizes`` read back by a caller that batches it with its own reads.

    One device -> host read when ``sizes`` is not given (the number of groups and the largest group, which size
    the tables), none otherwise; every other step works on tensors of sizes known from the shapes (a spare row or
    slot absorbs what a boolean mask would have dropped), so the cost does not grow with the batch or the number
    of images.
    """
    B, N, D = hidden.shape
    device = hidden.device
    T = B * N
    spare = T  # index of a spare slot past the last token
    if order is None:
        order = group_order(groups)
    if sizes is None:
        sizes = order.sizes.tolist()  # the one host read
    G, max_size = int(sizes[0]), int(sizes[1])
    sorted_member, dense, rank = order.member, order.dense, order.rank
    group_sizes_all = order.group_sizes
    order = order.order
    keep = torch.ones(T, dtype=torch.bool, device=device)
    destination = torch.arange(T, device=device)
    if G == 0:
        return StageResult(keep.view(B, N), hidden, (destination % N).view(B, N))
    group_sizes = group_sizes_all[:G]

    # Padded (G, nA) / (G, nB) tables of flat token ids; -1 pads (row G is a spare row for non-members).
    n_a, n_b = (max_size + 1) // 2, max_size // 2
    is_a = rank % 2 == 0
    half_rank = torch.div(rank, 2, rounding_mode="floor")
    table_a = torch.full((G + 1, max(n_a, 1)), -1, dtype=torch.long, device=device)
    table_b = torch.full((G + 1, max(n_b, 1)), -1, dtype=torch.long, device=device)
    for table, side in ((table_a, sorted_member & is_a), (table_b, sorted_member & ~is_a)):
        table.index_put_((torch.where(side, dense, G), torch.where(side, half_rank, 0)), order)
    table_a, table_b = table_a[:G], table_b[:G]

    flat_hidden = hidden.reshape(T, D)
    # the group members only (every other token is never compared nor changed), in fp32
    x_a = flat_hidden[table_a.clamp(min=0)].float()  # (G, nA, D)
    x_b = flat_hidden[table_b.clamp(min=0)].float()  # (G, nB, D)
    feats_a = torch.nn.functional.normalize(x_a, dim=-1)
    feats_b = torch.nn.functional.normalize(x_b, dim=-1)
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
    merged_a = ((position < r[:, None]) & valid_a).reshape(-1)  # (G * nA,) in (group, rank) order

    # merged A tokens (others aim at the spare slot) and their best(a)
    src = torch.where(merged_a, table_a.reshape(-1), spare)
    dst = torch.where(merged_a, table_b.gather(1, best).reshape(-1), spare)
    keep_ext = torch.cat([keep, keep.new_ones(1)]).index_put_((src,), keep.new_zeros(()))
    destination_ext = torch.cat([destination, destination.new_full((1,), spare)]).index_put_((src,), dst)
    keep, destination = keep_ext[:T], destination_ext[:T]

    # Message passing, over the B slots of the tables only: x_b <- (g_b x_b + sum g_a x_a) / (g_b + sum g_a);
    # equal weights when the sum is 0. Each receiver sums itself first, then its merged A tokens in (group, rank)
    # order; B tokens that receive nothing are left untouched.
    if guidance is None:
        weights = torch.ones(T, device=device, dtype=torch.float32)
    else:
        weights = guidance.reshape(-1).float().clamp(min=0)
    b_ids = table_b.reshape(-1)  # (R,) flat token id of each B slot, -1 pads
    R = b_ids.shape[0]
    a_slot = torch.arange(G, device=device)[:, None] * table_b.shape[1] + best  # (G, nA) B slot of best(a)
    a_slot = torch.where(merged_a, a_slot.reshape(-1), R)  # R: a spare slot for A tokens not merged
    b_slot = torch.where(b_ids >= 0, torch.arange(R, device=device), R)
    w_b, w_a = weights[b_ids.clamp(min=0)], weights[table_a.reshape(-1).clamp(min=0)]
    den = torch.zeros(R + 1, dtype=torch.float32, device=device).index_add_(0, b_slot, w_b).index_add_(0, a_slot, w_a)
    size = torch.zeros(R + 1, dtype=torch.float32, device=device).index_add_(0, b_slot, torch.ones_like(w_b))
    size = size.index_add_(0, a_slot, torch.ones_like(w_a))
    equal = den <= 0  # a receiver whose weights sum to 0 takes the plain mean: every weight becomes 1
    w_b, w_a = torch.where(equal[b_slot], 1.0, w_b), torch.where(equal[a_slot], 1.0, w_a)
    num = torch.zeros(R + 1, D, dtype=torch.float32, device=device)
    num.index_add_(0, b_slot, w_b[:, None] * x_b.reshape(-1, D))
    num.index_add_(0, a_slot, w_a[:, None] * x_a.reshape(-1, D))
    den = torch.where(equal, size, den)[:R]
    merged = num[:R] / den.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    receives = torch.zeros(R + 1, dtype=torch.bool, device=device).index_fill_(0, a_slot, True)[:R]
    rows = torch.where(receives, b_ids, T)  # others write to a spare row past the last token
    new_hidden = torch.cat([flat_hidden, flat_hidden.new_zeros(1, D)]).index_copy_(0, rows, merged.to(hidden.dtype))
    return StageResult(keep.view(B, N), new_hidden[:T].view(B, N, D), (destination % N).view(B, N))


def compact_indices(keep: torch.Tensor, destination: torch.Tensor | None = None, length: int | None = None,
                    counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded gather indices for the kept slots of every row.

    keep: (B, N) bool. destination: (B, N) long slot each token lives in (None: tokens that are not kept
    map to slot 0 of their row). length: the most kept slots of a row, when the caller already read it
    (otherwise it is read here: one device -> host sync); counts: ``keep.sum(1)`` when already computed.
    No other host read, whatever the batch. Returns
      source: (B, M) long, old slot of each new slot (pads point at the row's first kept slot, or 0),
      valid: (B, M) bool, False on pads,
      new_slot: (B, N) long, new slot of each old token (merged tokens follow their destination).
    Kept slots keep their order, and the last kept slot of every row lands in column M-1.
    """
    B, N = keep.shape
    device = keep.device
    if counts is None:
        counts = keep.sum(dim=1)
    M = length if length is not None else (int(counts.max()) if B > 0 else 0)
    offset = (M - counts)[:, None]
    rank = torch.cumsum(keep.long(), dim=1) - 1
    target = torch.where(keep, offset + rank, torch.zeros_like(rank))
    first_kept = torch.where(counts > 0, keep.long().argmax(dim=1), torch.zeros_like(counts))
    # scatter every kept slot to its target column; dropped slots go to a spare column M, cut off after
    spare = torch.where(keep, target, M)
    slots = torch.arange(N, device=device).expand(B, N)
    source = torch.cat([first_kept[:, None].expand(B, M), first_kept[:, None]], dim=1)
    source = source.scatter(1, spare, torch.where(keep, slots, first_kept[:, None]))[:, :M]
    valid = torch.zeros(B, M + 1, dtype=torch.bool, device=device).scatter(1, spare, keep)[:, :M]
    if destination is None:
        destination = torch.where(keep, torch.arange(N, device=device).expand(B, N), first_kept[:, None])
    new_slot = target.gather(1, destination)
    return source, valid, new_slot


def reference_merge_count(ratio: float, n: int) -> int:
    """Scalar form of ``merge_count`` for plain-Python callers."""
    return min(math.floor(n * ratio), n // 2)
