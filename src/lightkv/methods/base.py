"""The method-author API: ``Method``, what a stage sees (``StageContext``) and returns (``StageResult``), and the
two bases that most methods need only one function of.

A method names the decoder layers after which it acts (``stage_layers``) and, at each of them, turns the
current sequence into a shorter one (``reduce``). The engine (``lightkv.engine``) does everything that is
about models: finding vision tokens, gathering positions and masks, keeping the cache consistent.

- ``ScorePruneMethod``: score the vision patches of each sample, keep the best; a subclass writes ``score``.
- ``WindowMergeMethod``: LightKV's windowed bipartite merge; a subclass writes ``merge_weights``.

Methods are frozen dataclasses: a field changed while a method is applied would silently disagree with the
handle, so ``dataclasses.replace(method, ratio=...)`` makes a new one instead.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol, Sequence

import torch

from ..core import (MergeResult, StageResult, bipartite_merge, group_order, merged_per_row,
                    read_ints, reference_merge_count, window_groups)
from ._common import (as_grid, check_int, check_ints, check_layer, check_layers, check_ratio, check_ratios,
                      _is_int, drop_count, keep_top_scored, kept_after_stages, normalize_grids, set_field)

if TYPE_CHECKING:
    from ..engine import Handle

__all__ = ["Method", "StageContext", "StageResult", "MergeResult", "ScorePruneMethod", "WindowMergeMethod",
           "POSITION_MODES", "retained_fraction", "predict_kept_per_layer", "predict_retained_fraction"]

POSITION_MODES = ("original", "compact")

logger = logging.getLogger("lightkv")


class _HandleLike(Protocol):  # what ``Method.install`` may use; the real type is ``lightkv.engine.Handle``
    adapter: Any

    def prefill_state(self) -> Any: ...


@dataclass(eq=False, repr=False)
class StageContext:
    """The current sequence at a stage layer, as a method sees it; the engine builds one per stage.

    hidden: (B, M, D). token_valid, vision_mask: (B, M) bool (False on padding). image_index: (B, M) long,
    index into ``grid_hw`` of each image patch, -1 elsewhere. grid_rows, grid_cols: (B, M) long, original grid
    coordinate of each patch. grid_hw: (I, 2) long, rows and cols of each image of the batch.
    input_positions: (B, M) long, position of each slot among its row's real input tokens (independent of
    padding and batch row). token_state: per-token (B, M, ...) tensors a method carries across stages (the
    engine gathers them with the hidden states). method_state: what the method's own hooks (``install``) left
    for this call. attention_fn: returns the stage layer's post-RoPE queries, keys and scaling.
    """

    layer_index: int
    hidden: torch.Tensor
    token_valid: torch.Tensor
    vision_mask: torch.Tensor
    image_index: torch.Tensor
    grid_rows: torch.Tensor
    grid_cols: torch.Tensor
    grid_hw: torch.Tensor
    input_positions: torch.Tensor
    token_state: dict
    method_state: dict
    attention_fn: Callable[[], tuple]

    def image_token_counts(self) -> torch.Tensor:
        """(I,) current number of mergeable patches of each image (no device -> host read)."""
        patches = self.image_index >= 0
        counts = torch.zeros(self.grid_hw.shape[0] + 1, dtype=torch.long, device=self.image_index.device)
        return counts.index_add_(0, torch.where(patches, self.image_index, self.grid_hw.shape[0]).reshape(-1),
                                 patches.reshape(-1).long())[:-1]

    def after_first_image(self) -> torch.Tensor:
        """(B, M) bool, slots after the first vision token of their row."""
        first = torch.where(self.vision_mask.any(1), self.vision_mask.float().argmax(1), self.vision_mask.shape[1])
        return torch.arange(self.vision_mask.shape[1], device=first.device)[None, :] > first[:, None]

    def attention(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Post-RoPE queries (B, H, M, Dh), keys (B, Hkv, M, Dh) and the scaling of the stage layer."""
        return self.attention_fn()

    def __repr__(self) -> str:
        B, M, D = self.hidden.shape
        return f"StageContext(layer_index={self.layer_index}, batch={B}, tokens={M}, hidden={D})"


@dataclass(frozen=True)
class Method:
    """Base class of every compression method (a frozen dataclass; subclasses use ``@dataclass(frozen=True)``).

    positions: "original" keeps each kept token's original position id (ours, default); "compact" renumbers
    positions 0..N'-1 after each stage, as the reference code does.
    """

    positions: str = field(default="original", kw_only=True)

    def __post_init__(self) -> None:
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {self.positions!r}")

    @property
    def stage_layers(self) -> tuple[int, ...]:
        """Decoder layers after whose output the method shortens the sequence, ascending.

        -1 means before decoder layer 0: the stage runs on the input embeddings, so every decoder layer sees
        (and caches) the shortened sequence.
        """
        raise NotImplementedError

    @property
    def needs_attention(self) -> bool:
        """Whether ``reduce`` reads queries/keys of the stage layer (the engine then captures them)."""
        return False

    def validate_for(self, num_layers: int) -> None:
        """Raise ValueError when the method does not fit a decoder of ``num_layers`` layers."""
        for layer in self.stage_layers:
            if layer < -1:
                raise ValueError(f"stage layer {layer} does not exist: valid stage layers are -1 (before the "
                                 f"decoder) and 0..{num_layers - 1}")
            if layer >= num_layers:
                raise ValueError(
                    f"stage layer {layer} does not exist: the model has {num_layers} decoder layers "
                    f"(valid layers are 0..{num_layers - 1})")

    def install(self, handle: "Handle | _HandleLike") -> list[Any]:
        """Register extra hooks the method needs (e.g. on the vision encoder); called once by ``apply``.

        Called after the engine registered its own hooks, so a method hook on the same module (e.g. the entry
        module) runs after the engine's. Returns the hook handles; ``Handle.remove()`` removes them with the
        engine's own. A hook finds the state of the prefill in progress with ``handle.prefill_state()`` and may
        leave data for ``reduce`` in its ``method_state`` dict (visible as ``ctx.method_state``). Raise
        ValueError, before registering anything, when the model cannot support the method; ``apply`` then
        removes the engine's hooks and re-raises.
        """
        return []

    def reduce(self, ctx: StageContext, stage: int) -> StageResult:
        """Decide which tokens of the current sequence survive stage ``stage`` and their new hidden states.

        ``StageResult.destination`` of a token that is not kept names the kept slot it was merged into; a
        pruned token (merged nowhere) points at itself, and the engine then sends its position in the
        full-length output to the last kept slot before it (or the row's first kept slot).
        """
        raise NotImplementedError

    # -- prediction -------------------------------------------------------------------------------------------
    def kept_after_each_stage(self, grids: tuple[tuple[int, int], ...]) -> list[int]:
        """Vision tokens of one sample whose images have these (rows, cols) ``grids``, after each stage."""
        raise NotImplementedError(f"{type(self).__name__} does not predict its kept counts: give it "
                                  "kept_after_each_stage(grids) (or kept_per_layer(num_layers, grids))")

    def kept_per_layer(self, num_layers: int, grids: Sequence[tuple[int, int]]) -> list[int]:
        """Vision tokens each of ``num_layers`` decoder layers sees (and caches) for ONE sample whose images
        have these (rows, cols) token ``grids``, e.g. [(24, 24), (12, 18)]; without running a model.

        A layer holds what is left after every stage that ran before it (stage layer < layer).
        """
        num_layers = check_int("num_layers", num_layers, 1)
        grids = normalize_grids(grids)
        self.validate_for(num_layers)
        stages = tuple(self.stage_layers)
        after = list(self.kept_after_each_stage(grids))
        if len(after) != len(stages):
            raise RuntimeError(f"{type(self).__name__}.kept_after_each_stage gave {len(after)} counts for "
                               f"{len(stages)} stages")
        counts = [sum(h * w for h, w in grids), *after]
        return [counts[sum(1 for s in stages if s < layer)] for layer in range(num_layers)]


# ---------------------------------------------------------------------------------------------------------------
# prediction, module level


def retained_fraction(method: Method, num_layers: int, grids: Sequence[tuple[int, int]]) -> float:
    """Mean over ``num_layers`` decoder layers of (vision tokens the layer caches) / (vision tokens of the
    prompt), for one sample whose images have these (rows, cols) ``grids``."""
    grids = normalize_grids(grids)
    kept = method.kept_per_layer(num_layers, grids)
    return sum(kept) / (len(kept) * sum(h * w for h, w in grids))


def predict_kept_per_layer(method: Method, num_layers: int, grid: Any, num_images: int = 1) -> list[int]:
    """Deprecated: ``method.kept_per_layer(num_layers, [grid] * num_images)``."""
    warnings.warn("predict_kept_per_layer(method, num_layers, grid, num_images) is deprecated; use "
                  "method.kept_per_layer(num_layers, grids)", DeprecationWarning, stacklevel=2)
    num_images = check_int("num_images", num_images, 1)
    return method.kept_per_layer(num_layers, [as_grid(grid)] * num_images)


def predict_retained_fraction(method: Method, num_layers: int, grid: Any, num_images: int = 1) -> dict:
    """Deprecated: {"kept_per_layer": method.kept_per_layer(...), "retained_fraction": retained_fraction(...)}
    for one sample with ``num_images`` images of ``grid`` (rows, cols) or a square token count."""
    warnings.warn("predict_retained_fraction(method, num_layers, grid, num_images) is deprecated; use "
                  "method.kept_per_layer(num_layers, grids) and lightkv.retained_fraction(method, num_layers, "
                  "grids)", DeprecationWarning, stacklevel=2)
    num_images = check_int("num_images", num_images, 1)
    grids = [as_grid(grid)] * num_images
    kept = method.kept_per_layer(num_layers, grids)
    return {"kept_per_layer": kept, "retained_fraction": sum(kept) / (len(kept) * sum(h * w for h, w in grids))}


# ---------------------------------------------------------------------------------------------------------------
# score, then prune


@dataclass(frozen=True)
class ScorePruneMethod(Method):
    """Per sample, score the vision patches (all images together) and keep the best at each stage.

    A subclass declares its fields (``layer`` or ``layers``, ``ratio``, its own) and writes ``score``. At
    stage s, a sample of n patches keeps n - floor(ratio * n), the highest-scored (ties: earlier slot); tokens
    that are not patches are never removed. ``always_keep`` may name patches kept first (they count).
    """

    needs_attention: ClassVar[bool] = True  # most scores read the stage layer's queries/keys

    def __post_init__(self) -> None:
        super().__post_init__()
        if hasattr(self, "layer"):
            set_field(self, "layer", check_layer("layer", self.layer))
        if hasattr(self, "layers"):
            set_field(self, "layers", check_layers("layers", self.layers))
        if not hasattr(self, "layer") and not hasattr(self, "layers"):
            raise TypeError(f"{type(self).__name__} needs a field 'layer' or 'layers'")
        if hasattr(self, "ratio"):
            set_field(self, "ratio", check_ratio("ratio", self.ratio))

    @property
    def stage_layers(self) -> tuple[int, ...]:
        return tuple(self.layers) if hasattr(self, "layers") else (self.layer,)

    def stage_ratio(self, stage: int) -> float:
        """Fraction of the current patches dropped at ``stage`` (the ``ratio`` field by default)."""
        return self.ratio

    def score(self, ctx: StageContext, stage: int) -> torch.Tensor:
        """(B, M) scores; only read on the patches, higher is kept first."""
        raise NotImplementedError

    def always_keep(self, ctx: StageContext, stage: int, keep_counts: torch.Tensor) -> torch.Tensor | None:
        """(B, M) bool patches kept before any other (at most ``keep_counts`` (B,) per row), or None.
        Called before ``score``."""
        return None

    def reduce(self, ctx: StageContext, stage: int) -> StageResult:
        candidates = ctx.image_index >= 0  # (B, M)
        counts = candidates.sum(1)
        keep_counts = counts - drop_count(self.stage_ratio(stage), counts)
        always = self.always_keep(ctx, stage, keep_counts)
        scores = self.score(ctx, stage)
        return keep_top_scored(ctx.hidden, scores, candidates, keep_counts, always_keep=always)

    def kept_after_each_stage(self, grids: tuple[tuple[int, int], ...]) -> list[int]:
        n = sum(h * w for h, w in grids)
        return kept_after_stages(n, [self.stage_ratio(s) for s in range(len(self.stage_layers))])


# ---------------------------------------------------------------------------------------------------------------
# windowed merge


@dataclass(frozen=True)
class WindowMergeMethod(Method):
    """LightKV's stage (METHOD.md): per image window, bipartite matching on cosine similarity and a weighted
    many-to-one merge. A subclass writes ``merge_weights`` (and declares ``min_tokens_per_window``).

    layers: decoder layers after which a stage runs (strictly increasing, >= 0).
    windows: windows per side W_s of each stage (>= 1).
    ratios: fraction P_s of the current tokens of each window that is merged away, in [0, 1]
        (capped at half a window).
    A stage is skipped for an image with fewer than ``min_tokens_per_window`` x W_s^2 tokens (reference rule);
    a warning names the image grid the first time, per method instance, stage and grid.
    rounds (keyword): bipartite merges per stage, one value for all stages or one per stage (default 1, the
        paper). A stage of k rounds merges each window k times at the same layer, each round on the tokens the
        one before left and with the stage's ratio, so a window keeps about (1 - ratio)^k of its tokens (at most
        half merged per round, as the paper caps one stage). Merge weights add up over rounds (a token merged
        twice is the weighted mean of all its members; with equal weights, the plain mean). Rounds > 1 go beyond
        the paper: they let a short decoder reach budgets below what half a window per stage allows.
    window_layout (keyword): "original" (default) cuts the windows of every stage on each token's original grid
        coordinate; "regrid" re-lays the current tokens of each image by rank on a pseudo-square grid at every
        stage, as the authors' release does (``lightkv.methods._layout``); an adapter with
        ``regrid_flattens_image_span`` (LLaVA-NeXT / OneVision) makes the unit the whole image span (every run of
        consecutive vision tokens, newlines included), as that release does for LLaVA-NeXT.
    """

    layers: Sequence[int] = (12, 18, 24)
    windows: Sequence[int] = (4, 2, 1)
    ratios: Sequence[float] = (0.5, 0.5, 0.5)
    window_layout: str = field(default="original", kw_only=True)
    rounds: int | Sequence[int] = field(default=1, kw_only=True)

    _FLATTEN_SPANS: ClassVar[str] = "window_merge_flatten_spans"  # method_state key set by install's hook

    def __post_init__(self) -> None:
        super().__post_init__()
        set_field(self, "layers", check_ints("layers", self.layers))
        set_field(self, "windows", check_ints("windows", self.windows))
        set_field(self, "ratios", check_ratios("ratios", self.ratios))
        if not self.layers:
            raise ValueError(f"a {type(self).__name__} schedule needs at least one stage (layers is empty)")
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
        rounds = (self.rounds,) * len(self.layers) if _is_int(self.rounds) else self.rounds
        set_field(self, "rounds", check_ints("rounds", rounds, 1))
        if len(self.rounds) != len(self.layers):
            raise ValueError(f"rounds must be one integer or one per stage ({len(self.layers)}), got "
                             f"{list(self.rounds)}")
        try:
            set_field(self, "min_tokens_per_window", check_int("min_tokens_per_window", self.min_tokens_per_window, 1))
        except (TypeError, ValueError):
            raise ValueError("min_tokens_per_window must be an integer >= 1, got "
                             f"{self.min_tokens_per_window!r}") from None
        set_field(self, "_warned_skips", set())  # (stage, rows, cols) already warned about
        from ._layout import WINDOW_LAYOUTS
        if self.window_layout not in WINDOW_LAYOUTS:
            raise ValueError(f"window_layout must be one of {WINDOW_LAYOUTS}, got {self.window_layout!r}")

    @property
    def stage_layers(self) -> tuple[int, ...]:
        return tuple(self.layers)

    def merge_weights(self, ctx: StageContext, stage: int, groups: torch.Tensor) -> torch.Tensor | None:
        """(B, M) non-negative merge weights g_t, or None for equal weights. groups: (B, M) window ids
        (-1: not merged)."""
        raise NotImplementedError

    def merged(self, ctx: StageContext, stage: int, result: StageResult, weights: torch.Tensor | None) -> None:
        """Called after the merge (e.g. to carry token sizes in ``ctx.token_state``)."""

    def stage_reads(self, ctx: StageContext, stage: int) -> dict[str, torch.Tensor]:
        """Integer tensors (e.g. a width that sizes a buffer) that ``merge_weights`` needs on the host: they are
        read back with the stage's own sizing read, in one device -> host sync, and left in ``ctx.method_state``
        under their keys (a one-element tensor as an int, a longer one as a list). None by default."""
        return {}

    def _warn_skipped(self, stage: int, skipped: list[int], counts: list[int], grid_hw: list[int]) -> None:
        """Warn once per stage and grid about the images with too few tokens for this stage's windows."""
        windows = self.windows[stage]
        threshold = self.min_tokens_per_window * windows * windows
        for image in (i for i, flag in enumerate(skipped) if flag):
            rows, cols = grid_hw[2 * image], grid_hw[2 * image + 1]
            args = (type(self).__name__, stage, self.layers[stage], rows, cols, counts[image],
                    self.min_tokens_per_window, windows, threshold)
            message = ("lightkv: %s stage %d (after decoder layer %d) is skipped for a %d x %d image grid: it "
                       "holds %d vision tokens, fewer than min_tokens_per_window x windows^2 = %d x %d^2 = %d, "
                       "so nothing of it is merged; use fewer windows for images this small")
            key = (stage, rows, cols)
            if key in self._warned_skips:
                logger.debug(message, *args)
            else:
                self._warned_skips.add(key)
                logger.warning(message, *args)

    def install(self, handle: "Handle | _HandleLike") -> list[Any]:
        if self.window_layout != "regrid" or not getattr(handle.adapter, "regrid_flattens_image_span", False):
            return []

        def flatten_spans(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            state = handle.prefill_state()
            if state is not None:
                state.method_state[self._FLATTEN_SPANS] = True

        return [handle.adapter.entry_module.register_forward_pre_hook(flatten_spans, with_kwargs=True)]

    def _regrid_groups(self, ctx: StageContext, stage: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Window ids under ``window_layout="regrid"`` (see ``lightkv.methods._layout``), the active units and
        the current tokens of each image (empty for flattened image spans, which get no skip warning)."""
        from ._layout import regrid_coordinates, vision_runs
        windows = self.windows[stage]
        if ctx.method_state.get(self._FLATTEN_SPANS):
            units, num_units = vision_runs(ctx.vision_mask), ctx.vision_mask.numel()
        else:
            units, num_units = ctx.image_index, int(ctx.grid_hw.shape[0])
        rows, cols, unit_hw, counts = regrid_coordinates(units, num_units)
        active = counts >= self.min_tokens_per_window * windows * windows
        mergeable = torch.where(ctx.image_index >= 0, units, -1)
        groups = window_groups(mergeable, rows, cols, unit_hw, windows, active)
        if ctx.method_state.get(self._FLATTEN_SPANS):
            return groups, active[:0], counts[:0]
        return groups, active, counts

    def reduce(self, ctx: StageContext, stage: int) -> StageResult:
        windows, ratio = self.windows[stage], self.ratios[stage]
        if self.window_layout == "regrid":
            groups, active, counts = self._regrid_groups(ctx, stage)
        else:
            counts = ctx.image_token_counts()  # (I,) current patches per image
            active = counts >= self.min_tokens_per_window * windows * windows
            groups = window_groups(ctx.image_index, ctx.grid_rows, ctx.grid_cols, ctx.grid_hw, windows, active)
        order = group_order(groups)
        extra = self.stage_reads(ctx, stage)
        skipped = ~active & (counts > 0)
        B, M = groups.shape
        kept = ctx.token_valid.sum(1) - merged_per_row(order, ratio, B, M)
        # the one device -> host read of the stage: merge table sizes, kept tokens per row (the engine's new
        # length), images skipped (for the warning) and the subclass's own reads
        sizes, kept, skipped, counts, grid_hw, *values = read_ints(
            order.sizes, kept, skipped, counts, ctx.grid_hw[:skipped.shape[0]], *extra.values())
        for (key, tensor), value in zip(extra.items(), values):
            ctx.method_state[key] = value[0] if tensor.numel() == 1 else value
        self._warn_skipped(stage, skipped, counts, grid_hw)
        weights = self.merge_weights(ctx, stage, groups)
        result = bipartite_merge(ctx.hidden, groups, weights, ratio, order=order, sizes=(sizes[0], sizes[1]))
        if self.rounds[stage] > 1:
            result = self._more_rounds(result, groups, weights, ratio, self.rounds[stage] - 1, sizes, kept)
        else:
            result.kept_counts = kept
        self.merged(ctx, stage, result, weights)
        return result

    @staticmethod
    def _more_rounds(result: StageResult, groups: torch.Tensor, weights: torch.Tensor | None, ratio: float,
                     rounds: int, sizes: list[int], kept: list[int]) -> StageResult:
        """Further bipartite rounds in the same windows on the tokens ``result`` kept; a kept token's weight is
        the sum of its members' weights. Returns one result for the whole stage (destinations composed).

        Every window keeps a token per round, so the first round's table sizes (number of windows, largest
        window) still bound the tables; the tokens merged per row are summed on the device and read once, after
        the last round (``kept``: the first round's kept tokens per row)."""
        keep, hidden, destination = result.keep, result.hidden, result.destination
        B, M = keep.shape
        weights = torch.ones(keep.shape, dtype=torch.float32, device=keep.device) if weights is None else \
            weights.float().clamp(min=0)
        merged = torch.zeros(B, dtype=torch.long, device=keep.device)
        for _ in range(rounds):
            weights = weights.scatter_add(1, destination, torch.where(keep, torch.zeros_like(weights), weights))
            weights = torch.where(keep, weights, torch.zeros_like(weights))
            round_groups = torch.where(keep, groups, -1)
            order = group_order(round_groups)
            merged = merged + merged_per_row(order, ratio, B, M)
            step = bipartite_merge(hidden, round_groups, weights, ratio, order=order, sizes=(sizes[0], sizes[1]))
            keep, hidden = keep & step.keep, step.hidden
            destination = step.destination.gather(1, destination)
        (merged,) = read_ints(merged)
        return StageResult(keep, hidden, destination, kept_counts=[k - m for k, m in zip(kept, merged)])

    def kept_after_each_stage(self, grids: tuple[tuple[int, int], ...]) -> list[int]:
        """Exact when each stage's windows are unions of the previous stage's windows (e.g. 4, 2, 1 on
        24 x 24), since r depends only on window sizes; otherwise survivors are spread over the next stage's
        windows in proportion to overlap, an estimate. Each image is predicted on its own. Under
        ``window_layout="regrid"`` exact (each grid re-laid by rank); a flattened image span (LLaVA-NeXT) is not
        predicted: its windows depend on where the newline tokens rank."""
        if self.window_layout == "regrid":
            from ._layout import regrid_kept_counts
            per_image = [regrid_kept_counts(h * w, self.windows, self.ratios, self.min_tokens_per_window,
                                            self.rounds) for h, w in grids]
            return [sum(counts[s] for counts in per_image) for s in range(len(self.layers))]
        per_image = [_window_merge_counts(grid, self.windows, self.ratios, self.min_tokens_per_window, self.rounds)
                     for grid in grids]
        return [sum(counts[s] for counts in per_image) for s in range(len(self.layers))]


def _window_merge_counts(grid: tuple[int, int], windows: Sequence[int], ratios: Sequence[float],
                         min_tokens_per_window: int, rounds: Sequence[int] | None = None) -> list[int]:
    """Tokens of one image of ``grid`` = (H, W) left after each windowed-merge stage (of ``rounds`` rounds)."""
    rounds = rounds or (1,) * len(windows)
    H, W = grid
    # per-cell survivor density (fraction of the cell still present), refined stage by stage
    density = torch.ones(H, W, dtype=torch.float64)
    rows = torch.arange(H)[:, None].expand(H, W)
    cols = torch.arange(W)[None, :].expand(H, W)
    hw = torch.tensor([[H, W]])
    counts_after = []
    for w_side, ratio, stage_rounds in zip(windows, ratios, rounds):
        total = float(density.sum())
        if round(total) < min_tokens_per_window * w_side * w_side:
            counts_after.append(round(total))
            continue
        win = window_groups(torch.zeros(H, W, dtype=torch.long), rows, cols, hw, w_side)
        new_density = density.clone()
        for w in range(w_side * w_side):
            cell = win == w
            n = float(density[cell].sum())
            left = round(n)
            for _ in range(stage_rounds):
                left -= reference_merge_count(ratio, left)
            if n > 0:
                new_density[cell] = density[cell] * left / n
        density = new_density
        counts_after.append(round(float(density.sum())))
    return counts_after

