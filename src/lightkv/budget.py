"""Matched budgets: configure any method so that its average retained vision fraction hits a target.

The budget of a run is the mean over *all* decoder layers of (vision tokens the layer caches) / (vision
tokens of the prompt); layers before a method's first stage count with 1.0. It is predicted analytically:
pruning methods keep deterministic counts (n - floor(ratio * n) per stage), LightKV and ToMe use
``predict_retained_fraction``. The result equals ``handle.stats.mean_retained_fraction`` of a run on a
prompt with that grid (exactly for pruning methods and for LightKV windows that nest, e.g. 4, 2, 1 on 24x24).

How each method is matched (``match_budget``): its published layers are placed on the model's depth (LightKV
and ToMe: layers 12, 18, 24 of 32 with windows 4, 2, 1, smaller windows on grids too small for them; PDrop:
8, 16, 24 of 32; FastV, DART and Random: layer 2), and its ratio is searched (one ratio shared by all
stages). When even the largest ratio cannot reach the target, the layers are moved earlier (scaled towards
layer 0) until it can. SparseVLM: layers
2, 6, 15 of 32 and its published 192-token keep profile scaled by one factor, searched the same way.
VisionZip: one count per image at every layer (it acts before the decoder), split 54:10 between dominant and
contextual tokens. Other methods plug in with ``register_budget``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .methods import DART, FastV, LightKV, Method, PDrop, Random, SparseVLM, ToMe, VisionZip, predict_retained_fraction

__all__ = ["BudgetMatch", "match_budget", "register_budget", "budget_methods", "predict_kept_per_layer",
           "search_schedule", "place_layers"]


@dataclass(frozen=True)
class BudgetMatch:
    """A configured method and the budget it reaches.

    retained_fraction: predicted average retained vision fraction over all decoder layers.
    kept_per_layer: predicted vision tokens per decoder layer (all images of one sample).
    """

    method: Method
    retained_fraction: float
    kept_per_layer: list[int]
    target: float


# matcher(target, num_layers, grid (H, W), num_images, **method_kwargs) -> BudgetMatch
Matcher = Callable[..., BudgetMatch]
_MATCHERS: dict[str, Matcher] = {}


def register_budget(name: str, matcher: Matcher, replace: bool = False) -> None:
    """Make ``match_budget(name, ...)`` call ``matcher(target, num_layers, grid, num_images, **kwargs)``.

    ``grid`` reaches the matcher as (H, W). ``search_schedule`` and ``predict_kept_per_layer`` help to write one.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"a budget name must be a non-empty string, got {name!r}")
    if name in _MATCHERS and not replace:
        raise ValueError(f"a budget matcher for {name!r} is already registered (pass replace=True)")
    _MATCHERS[name] = matcher


def budget_methods() -> tuple[str, ...]:
    """Names ``match_budget`` accepts."""
    return tuple(_MATCHERS)


def _as_grid(grid: Any) -> tuple[int, int]:
    if isinstance(grid, int) and not isinstance(grid, bool):
        side = math.isqrt(grid)
        if side * side != grid:
            raise ValueError(f"{grid} vision tokens is not a square grid; pass grid=(rows, cols)")
        return side, side
    if isinstance(grid, Sequence) and len(grid) == 2 and all(isinstance(g, int) and g > 0 for g in grid):
        return int(grid[0]), int(grid[1])
    raise ValueError(f"grid must be (rows, cols) of positive integers or a square token count, got {grid!r}")


def match_budget(name: str, target: float, num_layers: int, grid: Any, num_images: int = 1,
                 **method_kwargs: Any) -> BudgetMatch:
    """A ``name`` method whose average retained vision fraction over ``num_layers`` layers is closest to
    ``target`` for prompts with ``num_images`` images of ``grid`` = (rows, cols) tokens (or a square count).

    ``method_kwargs`` fix other fields (e.g. ``guidance``, ``seed``, ``num_pivots``, ``size_weighted``).
    """
    if name not in _MATCHERS:
        raise ValueError(f"unknown method {name!r}; budgets are known for {sorted(_MATCHERS)}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < float(target) <= 1.0:
        raise ValueError(f"target must be a retained fraction in (0, 1], got {target!r}")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
    return _MATCHERS[name](float(target), num_layers, _as_grid(grid), num_images, **method_kwargs)


# ---------------------------------------------------------------------------------------------------------------
# prediction


def predict_kept_per_layer(method: Method, num_layers: int, grid: Any, num_images: int = 1) -> list[int]:
    """Vision tokens per decoder layer for one sample with ``num_images`` images of ``grid``, without a model.

    Works for LightKV, ToMe, any method with ``kept_after(n) -> [count after each stage]`` (the pruning
    methods) and any method that defines ``predict_kept_per_layer(num_layers, grid, num_images)`` itself.
    """
    H, W = _as_grid(grid)
    method.validate_for(num_layers)
    own = getattr(method, "predict_kept_per_layer", None)
    if callable(own):
        return list(own(num_layers, (H, W), num_images))
    if isinstance(method, ToMe):
        method = method.as_lightkv()
    if isinstance(method, LightKV):
        return predict_retained_fraction(method, num_layers, (H, W), num_images)["kept_per_layer"]
    if not hasattr(method, "kept_after"):
        raise TypeError(f"cannot predict kept counts of {type(method).__name__}: give it kept_after(n) or "
                        "predict_kept_per_layer(num_layers, grid, num_images)")
    n = H * W * num_images
    after = method.kept_after(n)
    # layer l caches what is left after every stage that runs before it (stage layer < l; -1 = before layer 0)
    counts = [n, *after]
    return [counts[sum(1 for stage_layer in method.stage_layers if stage_layer < layer)] for layer in range(num_layers)]


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


def search_schedule(build: Callable[[tuple[int, ...], float], Method], reference: Sequence[int],
                    reference_depth: int | None, target: float, num_layers: int, grid: tuple[int, int],
                    num_images: int = 1, max_ratio: float = 1.0, iterations: int = 40) -> BudgetMatch:
    """The generic matcher: ``build(layers, ratio)`` for the latest placement of ``reference`` layers that can
    reach ``target`` (see ``place_layers``), with the ratio in [0, max_ratio] whose predicted fraction is
    closest to ``target`` (ties: the smaller ratio). The fraction must not increase with the ratio.
    """
    def predict(layers: tuple[int, ...], ratio: float) -> tuple[float, list[int]]:
        kept = predict_kept_per_layer(build(layers, ratio), num_layers, grid, num_images)
        return _fraction(kept, grid[0] * grid[1] * num_images), kept

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


# ---------------------------------------------------------------------------------------------------------------
# the built-in methods

LIGHTKV_REFERENCE = ((12, 18, 24), (4, 2, 1), 32)  # layers, windows, depth (LLaVA-1.5-7B)
PDROP_REFERENCE = ((8, 16, 24), 32)


def _merge_matcher(cls: type) -> Matcher:
    def matcher(target: float, num_layers: int, grid: tuple[int, int], num_images: int, **kwargs: Any
                ) -> BudgetMatch:
        layers_ref, windows_ref, depth = LIGHTKV_REFERENCE
        # a stage is skipped for an image with fewer than min_tokens * W^2 tokens: shrink the windows of small
        # grids so that every stage still runs even at the largest ratio (stage s then holds n / 2^s tokens)
        min_tokens = kwargs.get("min_tokens_per_window", 8)
        windows = tuple(min(w, max(1, math.isqrt(grid[0] * grid[1] // (min_tokens * 2 ** s))))
                        for s, w in enumerate(windows_ref))

        def build(layers: tuple[int, ...], ratio: float) -> Method:
            # stages dropped by place_layers are the last ones: keep the first len(layers) windows
            return cls(layers=layers, windows=windows[:len(layers)], ratios=[ratio] * len(layers), **kwargs)

        # a window merges at most half its tokens, so ratios above 0.5 change nothing
        return search_schedule(build, layers_ref, depth, target, num_layers, grid, num_images, max_ratio=0.5)
    return matcher


def _single_stage_matcher(cls: type) -> Matcher:
    def matcher(target: float, num_layers: int, grid: tuple[int, int], num_images: int, **kwargs: Any
                ) -> BudgetMatch:
        layer = kwargs.pop("layer", 2)

        def build(layers: tuple[int, ...], ratio: float) -> Method:
            return cls(layer=layers[0], ratio=ratio, **kwargs)

        return search_schedule(build, (layer,), None, target, num_layers, grid, num_images)
    return matcher


def _pdrop_matcher(target: float, num_layers: int, grid: tuple[int, int], num_images: int, **kwargs: Any
                   ) -> BudgetMatch:
    layers_ref, depth = PDROP_REFERENCE

    def build(layers: tuple[int, ...], ratio: float) -> Method:
        return PDrop(layers=layers, ratio=ratio, **kwargs)

    return search_schedule(build, layers_ref, depth, target, num_layers, grid, num_images)


register_budget("lightkv", _merge_matcher(LightKV))
register_budget("tome", _merge_matcher(ToMe))
register_budget("random", _single_stage_matcher(Random))
register_budget("fastv", _single_stage_matcher(FastV))
register_budget("dart", _single_stage_matcher(DART))
register_budget("pdrop", _pdrop_matcher)


SPARSEVLM_REFERENCE = ((2, 6, 15), 32)  # layers, depth (LLaVA-1.5-7B)


def _sparsevlm_matcher(target: float, num_layers: int, grid: tuple[int, int], num_images: int, **kwargs: Any
                       ) -> BudgetMatch:
    """Published layers placed on the depth; the published 192-token keep profile (300, 200, 110 of 576)
    scaled by one factor: ratio 0 keeps every token at every stage, ratio 1 keeps only recycled clusters."""
    layers_ref, depth = SPARSEVLM_REFERENCE
    tokens = grid[0] * grid[1]
    full_scale = 576 / 110  # the smallest count of the profile reaches the whole image

    def build(layers: tuple[int, ...], ratio: float) -> Method:
        return SparseVLM.scaled(layers, tokens, (1.0 - ratio) * full_scale, **kwargs)

    return search_schedule(build, layers_ref, depth, target, num_layers, grid, num_images)


def _visionzip_matcher(target: float, num_layers: int, grid: tuple[int, int], num_images: int, **kwargs: Any
                       ) -> BudgetMatch:
    """Every layer sees the same round(target * tokens) tokens per image, split between dominant and
    contextual in the published 54:10 proportion."""
    tokens = grid[0] * grid[1]
    total = min(tokens, max(1, round(target * tokens)))
    contextual = round(total * 10 / 64)
    method = VisionZip(dominant=total - contextual, contextual=contextual, **kwargs)
    kept = predict_kept_per_layer(method, num_layers, grid, num_images)
    # not _fraction(kept): layer 0 already sees the reduced set, so the reference is the prompt's tokens
    return BudgetMatch(method, sum(kept) / (num_layers * tokens * num_images), kept, target)


register_budget("sparsevlm", _sparsevlm_matcher)
register_budget("visionzip", _visionzip_matcher)
