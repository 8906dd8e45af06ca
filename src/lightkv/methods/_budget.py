"""Matched budgets: configure any method so that its average retained vision fraction hits a target.

The budget of a run is the mean over *all* decoder layers of (vision tokens the layer caches) / (vision
tokens of the prompt); layers before a method's first stage count with 1.0. It is predicted analytically with
``Method.kept_per_layer``: pruning methods keep deterministic counts (n - floor(ratio * n) per stage), LightKV
and ToMe predict their windowed merges. The result equals ``handle.stats.mean_retained_fraction`` of a run on a
prompt with those grids (exactly for pruning methods and for LightKV windows that nest, e.g. 4, 2, 1 on 24x24).

Each method registers its own matcher with its class (``lightkv.methods.register_method``). The built-in ones:
the published layers are placed on the model's depth (LightKV and ToMe: layers 12, 18, 24 of 32 with windows
4, 2, 1, smaller windows on grids too small for them; PDrop: 8, 16, 24 of 32; FastV, DART and Random: layer 2),
and the ratio is searched (one ratio shared by all stages). When even the largest ratio cannot reach the
target, the layers are moved earlier (scaled towards layer 0) until it can. SparseVLM: layers 2, 6, 15 of 32
and its published 192-token keep profile scaled by one factor, searched the same way. VisionZip: one count per
image at every layer (it acts before the decoder), split 54:10 between dominant and contextual tokens.
``register_budget`` is the former way to add a matcher, kept for compatibility.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ._common import as_grid, normalize_grids
from .base import predict_kept_per_layer  # deprecated, re-exported for old imports
from .registry import _set_matcher, get_method, method_names

if TYPE_CHECKING:
    from .base import Method

__all__ = ["BudgetMatch", "match_budget", "register_budget", "budget_methods", "predict_kept_per_layer",
           "search_schedule", "place_layers"]


@dataclass(frozen=True)
class BudgetMatch:
    """A configured method and the budget it reaches.

    retained_fraction: predicted average retained vision fraction over all decoder layers.
    kept_per_layer: predicted vision tokens per decoder layer (all images of one sample).
    """

    method: "Method"
    retained_fraction: float
    kept_per_layer: list[int]
    target: float


# a budget counts as reached when the matched fraction is at most this much above it (fractions move in steps:
# windows and token counts are integers)
REACH_TOLERANCE = 0.01

# old-style matcher(target, num_layers, grid (H, W), num_images, **method_kwargs) -> BudgetMatch
Matcher = Callable[..., BudgetMatch]


def register_budget(name: str, matcher: Matcher, replace: bool = False) -> None:
    """Compatibility: make ``match_budget(name, ...)`` call ``matcher(target, num_layers, grid, num_images,
    **kwargs)`` (the former matcher signature; ``grid`` reaches it as (H, W)). Samples whose images have
    different grids are refused. New code registers ``matcher(target, num_layers, grids, **fields)`` with the
    method: ``lightkv.methods.register_method(name, cls, matcher=...)``.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"a budget name must be a non-empty string, got {name!r}")
    if not callable(matcher):
        raise TypeError(f"a budget matcher must be callable, got {matcher!r}")

    def adapted(target: float, num_layers: int, grids: tuple[tuple[int, int], ...], **fields: Any) -> BudgetMatch:
        if len(set(grids)) != 1:
            raise ValueError(f"the budget matcher of {name!r} handles images of one grid only, got {list(grids)}")
        return matcher(target, num_layers, grids[0], len(grids), **fields)

    _set_matcher(name, adapted, replace=replace)


def budget_methods() -> tuple[str, ...]:
    """Names ``match_budget`` accepts (registered methods with a budget matcher)."""
    return tuple(name for name in method_names() if get_method(name).matcher is not None)


def _sample_grids(grid: Any, num_images: Any, grids: Any) -> tuple[tuple[int, int], ...]:
    if grids is not None:
        if grid is not None:
            raise ValueError("give grid= (with num_images) or grids= (one (rows, cols) per image), not both")
        return normalize_grids(grids)
    if grid is None:
        raise ValueError("match_budget needs grid=(rows, cols) (with num_images) or grids=[(rows, cols), ...]")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
    return (as_grid(grid),) * num_images


def match_budget(name: str, target: float, num_layers: int, grid: Any = None, num_images: int = 1, *,
                 grids: Sequence[tuple[int, int]] | None = None, strict: bool = True,
                 **method_kwargs: Any) -> BudgetMatch:
    """A ``name`` method whose average retained vision fraction over ``num_layers`` layers is closest to
    ``target`` for prompts with ``num_images`` images of ``grid`` = (rows, cols) tokens (or a square count),
    or with images of ``grids`` = [(rows, cols), ...] (one per image of a sample).

    ``method_kwargs`` fix other fields (e.g. ``guidance``, ``seed``, ``num_pivots``, ``size_weighted``).
    A target below the lowest fraction the method reaches there (by more than ``REACH_TOLERANCE``) is a
    ValueError naming that lowest fraction; strict=False returns the closest match instead.
    """
    try:
        entry = get_method(name)
    except ValueError:
        entry = None
    if entry is None or entry.matcher is None:
        raise ValueError(f"unknown method {name!r}; budgets are known for {sorted(budget_methods())}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < float(target) <= 1.0:
        raise ValueError(f"target must be a retained fraction in (0, 1], got {target!r}")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False, got {strict!r}")
    sample = _sample_grids(grid, num_images, grids)
    found = entry.matcher(float(target), num_layers, sample, **method_kwargs)
    if strict and found.retained_fraction > target + REACH_TOLERANCE:
        floor = entry.matcher(_LOWEST, num_layers, sample, **method_kwargs).retained_fraction
        if floor > target + REACH_TOLERANCE:
            shapes = ", ".join(f"{h}x{w}" for h, w in sample)
            fixed = f" with {', '.join(f'{k}={v!r}' for k, v in method_kwargs.items())}" if method_kwargs else ""
            raise ValueError(f"{name}@{target:g} is out of reach on {num_layers} decoder layers with images of "
                             f"{shapes} tokens{fixed}: the lowest budget {name} reaches there is {floor:.3f}")
    return found


_LOWEST = 1e-9  # a target below every reachable fraction: the matchers return their floor for it


def _fraction(kept: list[int], prompt_tokens: int) -> float:
    """Average over layers of kept / prompt vision tokens (a stage before layer 0 shortens layer 0 too)."""
    return sum(kept) / (len(kept) * prompt_tokens)


# ---------------------------------------------------------------------------------------------------------------
# search


def place_layers(reference: Sequence[int], reference_depth: int | None, num_layers: int, scale: float = 1.0
                 ) -> tuple[int, ...]:
    """Put reference stage layers on a decoder of ``num_layers`` layers.

    reference_depth: depth the reference was published for (layers scale with depth), or None for layers
    that are absolute (FastV's K=2). ``scale`` in [0, 1] moves them towards layer 0. Layers stay strictly
    increasing and inside the model; stages that do not fit are dropped.
    """
    out: list[int] = []
    for layer in reference:
        placed = layer * num_layers / reference_depth if reference_depth else float(layer)
        placed = math.floor(placed * scale + 0.5)
        placed = max(placed, out[-1] + 1 if out else 0)
        if placed <= num_layers - 1:
            out.append(placed)
    return tuple(out)


def _short_decimal(value: float, up: bool, same: Callable[[float], bool]) -> float:
    """``value`` rounded up (or down) to the fewest decimals for which ``same(candidate)`` holds."""
    for digits in range(1, 10):
        scaled = value * 10 ** digits
        units = math.ceil(scaled - 1e-9) if up else math.floor(scaled + 1e-9)
        candidate = round(units / 10 ** digits, digits)
        if same(candidate):
            return candidate
    return value


def search_schedule(build: Callable[[tuple[int, ...], float], "Method"], reference: Sequence[int],
                    reference_depth: int | None, target: float, num_layers: int, grid: Any = None,
                    num_images: int = 1, max_ratio: float = 1.0, iterations: int = 40, *,
                    grids: Sequence[tuple[int, int]] | None = None) -> BudgetMatch:
    """The generic matcher: ``build(layers, ratio)`` for the latest placement of ``reference`` layers that can
    reach ``target`` (see ``place_layers``), with the ratio in [0, max_ratio] whose predicted fraction is
    closest to ``target`` (ties: the smaller ratio). The fraction must not increase with the ratio.
    The sample has ``num_images`` images of ``grid``, or images of ``grids`` (one (rows, cols) each).
    """
    grids = _sample_grids(grid, num_images, grids)
    prompt_tokens = sum(h * w for h, w in grids)

    def predict(layers: tuple[int, ...], ratio: float) -> tuple[float, list[int]]:
        kept = build(layers, ratio).kept_per_layer(num_layers, grids)
        return _fraction(kept, prompt_tokens), kept

    placements: list[tuple[int, ...]] = []
    for step in range(64, -1, -1):
        layers = place_layers(reference, reference_depth, num_layers, step / 64)
        if layers and layers not in placements:
            placements.append(layers)
    if not placements:
        raise ValueError(f"no stage fits a decoder of {num_layers} layers")
    chosen = placements[-1]  # earliest: the best we can do when nothing reaches the target
    for layers in placements:
        if predict(layers, max_ratio)[0] <= target + 1e-12:
            chosen = layers
            break

    # f(ratio) is a non-increasing step function: bisect for the step that crosses the target
    lo, hi = 0.0, max_ratio
    f_lo, f_hi = predict(chosen, lo)[0], predict(chosen, hi)[0]
    if f_lo <= target:
        hi, f_hi = lo, f_lo
    elif f_hi < target:
        for _ in range(iterations):
            mid = (lo + hi) / 2
            f_mid = predict(chosen, mid)[0]
            if f_mid > target:
                lo, f_lo = mid, f_mid
            else:
                hi, f_hi = mid, f_mid
    else:
        lo, f_lo = hi, f_hi
    # both sides of the crossing, each as the shortest decimal ratio that gives the same counts
    best: tuple[float, float] | None = None
    for ratio, f, up in ((lo, f_lo, False), (hi, f_hi, True)):
        ratio = _short_decimal(ratio, up, lambda r: 0.0 <= r <= max_ratio and predict(chosen, r)[0] == f)
        if best is None or abs(f - target) < abs(best[1] - target) - 1e-15:
            best = (ratio, f)
    ratio = best[0]
    fraction, kept = predict(chosen, ratio)
    return BudgetMatch(build(chosen, ratio), fraction, kept, target)
