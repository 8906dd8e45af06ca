"""LightKV: prompt-guided, windowed merging of vision tokens (METHOD.md)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from ..core import MergeResult, bipartite_merge, merge_count, window_groups
from ..guidance import GUIDANCE_MODES, faithful_guidance, text_to_vision_guidance
from .base import Method

if TYPE_CHECKING:
    from ..engine import StageContext

__all__ = ["LightKV", "predict_retained_fraction"]

logger = logging.getLogger("lightkv")


def _as_tuple(name: str, values: Sequence, kind: type) -> tuple:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list of {kind.__name__}, got {values!r}")
    out = []
    for v in values:
        if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
            raise TypeError(f"{name} must contain integers, got {v!r}")
        if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise TypeError(f"{name} must contain numbers, got {v!r}")
        out.append(kind(v))
    return tuple(out)


@dataclass
class LightKV(Method):
    """LightKV: prompt-guided, windowed merging of vision tokens during prefill.

    layers: decoder layers after which a stage runs (strictly increasing, >= 0).
    windows: windows per side W_s of each stage (>= 1).
    ratios: fraction P_s of the current tokens of each window that is merged away, in [0, 1]
        (capped at half a window).
    guidance: "faithful" (paper), "uniform" (g = 1, vision-only merge) or "text_to_vision".
    min_tokens_per_window: a stage is skipped for an image with fewer than this many tokens per window
        (8 in the reference code).
    """

    layers: Sequence[int] = (12, 18, 24)
    windows: Sequence[int] = (4, 2, 1)
    ratios: Sequence[float] = (0.5, 0.5, 0.5)
    guidance: str = "faithful"
    min_tokens_per_window: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        self.layers = _as_tuple("layers", self.layers, int)
        self.windows = _as_tuple("windows", self.windows, int)
        self.ratios = _as_tuple("ratios", self.ratios, float)
        if not self.layers:
            raise ValueError("a LightKV schedule needs at least one stage (layers is empty)")
        if not len(self.layers) == len(self.windows) == len(self.ratios):
            raise ValueError(
                f"layers, windows and ratios must have the same length, got {len(self.layers)}, "
                f"{len(self.windows)} and {len(self.ratios)}")
        if any(layer < 0 for layer in self.layers):
            raise ValueError(f"layers must be >= 0, got {list(self.layers)}")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must not repeat, got {list(self.layers)}")
        if list(self.layers) != sorted(self.layers):
            raise ValueError(f"layers must be in increasing order, got {list(self.layers)}")
        if any(w < 1 for w in self.windows):
            raise ValueError(f"windows must be >= 1 per side, got {list(self.windows)}")
        if any(not (0.0 <= p <= 1.0) or math.isnan(p) for p in self.ratios):
            raise ValueError(f"ratios must lie in [0, 1], got {list(self.ratios)}")
        if self.guidance not in GUIDANCE_MODES:
            raise ValueError(f"guidance must be one of {GUIDANCE_MODES}, got {self.guidance!r}")
        if isinstance(self.min_tokens_per_window, bool) or not isinstance(self.min_tokens_per_window, int) \
                or self.min_tokens_per_window < 1:
            raise ValueError(f"min_tokens_per_window must be an integer >= 1, got {self.min_tokens_per_window!r}")

    @property
    def stage_layers(self) -> tuple[int, ...]:
        return tuple(self.layers)

    @property
    def needs_attention(self) -> bool:
        return self.guidance != "uniform"

    def reduce(self, ctx: "StageContext", stage: int) -> MergeResult:
        windows, ratio = self.windows[stage], self.ratios[stage]
        counts = ctx.image_token_counts()  # (I,) current patches per image
        active = counts >= self.min_tokens_per_window * windows * windows
        for image in torch.nonzero(~active & (counts > 0)).flatten().tolist():
            logger.debug("lightkv: stage %d (layer %d) skipped for image %d: %d tokens < %d x %d^2",
                         stage, self.layers[stage], image, int(counts[image]), self.min_tokens_per_window,
                         windows)
        groups = window_groups(ctx.image_index, ctx.grid_rows, ctx.grid_cols, ctx.grid_hw, windows, active)
        guidance = None
        if self.guidance != "uniform" and bool((groups >= 0).any()):
            q, k, scaling = ctx.attention()
            prompt = ctx.token_valid & ~ctx.vision_mask
            if self.guidance == "faithful":
                guidance = faithful_guidance(q, k, prompt, ctx.token_valid, scaling)
            else:
                guidance = text_to_vision_guidance(q, k, prompt & ctx.after_first_image(), ctx.token_valid,
                                                   scaling)
        return bipartite_merge(ctx.hidden, groups, guidance, ratio)


def predict_retained_fraction(method: LightKV, num_layers: int, grid: tuple[int, int] | int,
                              num_images: int = 1) -> dict:
    """Predict kept vision tokens per layer and the average retained fraction, without running a model.

    grid: (H, W) of each image's token grid, or a token count that is a perfect square.
    Counts are exact when each stage's windows are unions of the previous stage's windows (e.g. 4, 2, 1
    on 24 x 24) since r depends only on window sizes; otherwise survivors are spread over the next stage's
    windows in proportion to overlap, an estimate. Returns {"kept_per_layer": [...], "retained_fraction": x}.
    """
    method.validate_for(num_layers)
    if isinstance(grid, int):
        side = math.isqrt(grid)
        if side * side != grid:
            raise ValueError(f"{grid} vision tokens is not a square grid; pass grid=(rows, cols)")
        grid = (side, side)
    H, W = grid
    # per-cell survivor density (fraction of the cell still present), refined stage by stage
    density = torch.ones(H, W, dtype=torch.float64)
    rows = torch.arange(H)[:, None].expand(H, W)
    cols = torch.arange(W)[None, :].expand(H, W)
    counts_after = []
    for windows, ratio in zip(method.windows, method.ratios):
        total = float(density.sum())
        if round(total) < method.min_tokens_per_window * windows * windows:
            counts_after.append(round(total))
            continue
        hw = torch.tensor([[H, W]])
        win = window_groups(torch.zeros(H, W, dtype=torch.long), rows, cols, hw, windows)
        new_density = density.clone()
        for w in range(windows * windows):
            cell = win == w
            n = float(density[cell].sum())
            n_int = round(n)
            r = int(merge_count(ratio, torch.tensor([n_int]))[0])
            if n > 0:
                new_density[cell] = density[cell] * (n_int - r) / n
        density = new_density
        counts_after.append(round(float(density.sum())))
    kept = []
    full = H * W
    stage = 0
    current = full
    for layer in range(num_layers):
        kept.append(current * num_images)
        while stage < len(method.layers) and method.layers[stage] == layer:
            current = counts_after[stage]
            stage += 1
    return {"kept_per_layer": kept, "retained_fraction": sum(kept) / (num_layers * full * num_images)}
