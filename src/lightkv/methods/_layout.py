"""Window layouts of the windowed merges: where a token sits when the windows of a stage are cut.

"original" (lightkv's default): every token keeps its original grid coordinate at every stage (a merged token
keeps its destination's); the windows are bands of the image's own grid. "regrid" (the authors' release,
METHOD.md): at every stage the n current tokens of one unit are re-laid by rank, in sequence order, on a
side x side grid (side = sqrt(n) if n is a perfect square, else floor(sqrt(n)) + 1), and the windows are bands
of that grid. A unit is one image grid, or for families whose reference code flattens the whole image span
(LLaVA-NeXT: base grid, high-res grid and newline tokens) one run of consecutive vision tokens.

Pure functions on tensors; the window bands themselves are ``lightkv.core.window_index``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..core import merge_count, window_index
from ._common import rank_in_groups

__all__ = ["WINDOW_LAYOUTS", "square_side", "vision_runs", "regrid_coordinates", "regrid_counts", "regrid_kept_counts"]

WINDOW_LAYOUTS = ("original", "regrid")


def square_side(n: torch.Tensor) -> torch.Tensor:
    """Side of the pseudo-square grid of ``n`` tokens: sqrt(n) when n is a perfect square, else floor(sqrt(n)) + 1
    (elementwise, long; exact integer square roots)."""
    n = n.long()
    side = torch.sqrt(n.double()).floor().long()
    side = side - (side * side > n).long()  # correct float rounding, both ways
    side = side + ((side + 1) * (side + 1) <= n).long()
    return side + (side * side < n).long()


def vision_runs(vision_mask: torch.Tensor) -> torch.Tensor:
    """(B, M) long id of the maximal run of consecutive vision tokens each token belongs to (ids unique over the
    batch, in row-major order), -1 off ``vision_mask`` (B, M) bool."""
    previous = torch.nn.functional.pad(vision_mask[:, :-1], (1, 0), value=False)
    starts = vision_mask & ~previous
    run = torch.cumsum(starts.reshape(-1).long(), 0).view_as(vision_mask) - 1
    return torch.where(vision_mask, run, torch.full_like(run, -1))


def regrid_coordinates(units: torch.Tensor, num_units: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The "regrid" rule: the tokens of each unit, by rank in sequence order, on a side x side grid.

    units: (B, M) long unit id of each current token (each unit within one batch row), -1 for tokens in none.
    Returns rows, cols: (B, M) long (0 off units); unit_hw: (U, 2) long, side x side per unit (U = num_units);
    counts: (U,) long current tokens per unit.
    """
    in_unit = units >= 0
    counts = torch.zeros(num_units + 1, dtype=torch.long, device=units.device)
    counts = counts.index_add_(0, torch.where(in_unit, units, num_units).reshape(-1), in_unit.reshape(-1).long())
    counts = counts[:-1]
    side = square_side(counts).clamp(min=1)
    rank = rank_in_groups(units, torch.zeros(units.shape, dtype=torch.float32, device=units.device))
    token_side = side[units.clamp(min=0)]
    rows = torch.where(in_unit, torch.div(rank, token_side, rounding_mode="floor"), 0)
    cols = torch.where(in_unit, rank % token_side, 0)
    return rows, cols, torch.stack([side, side], dim=1), counts


def regrid_counts(n: int, windows: int) -> list[int]:
    """Tokens in each of the windows x windows windows when ``n`` tokens are re-laid on their pseudo-square grid
    (window id = row band * windows + column band)."""
    side = int(square_side(torch.tensor([n]))[0]) if n else 1
    k = torch.arange(n)
    rows, cols = k // side, k % side
    size = torch.full_like(k, side)
    ids = window_index(rows, cols, size, size, windows)
    return torch.bincount(ids, minlength=windows * windows).tolist()



def regrid_kept_counts(n: int, windows: Sequence[int], ratios: Sequence[float], min_tokens_per_window: int,
                       rounds: Sequence[int] | None = None) -> list[int]:
    """Tokens of one grid of ``n`` tokens left after each windowed-merge stage (of ``rounds`` rounds in the same
    windows) under the "regrid" layout (exact: the windows follow from the count alone). A stage is skipped below
    min_tokens_per_window x windows^2."""
    counts_after = []
    for w_side, ratio, stage_rounds in zip(windows, ratios, rounds or (1,) * len(windows)):
        if n >= min_tokens_per_window * w_side * w_side:
            per_window = torch.tensor(regrid_counts(n, w_side))
            for _ in range(stage_rounds):
                per_window = per_window - merge_count(ratio, per_window)
            n = int(per_window.sum())
        counts_after.append(n)
    return counts_after
