"""Per-layer token counts, KV bytes and FLOPs of a prefill, predicted from a schedule or read from a run.

    workload = Workload(images=1, text_before=40, text_after=20)
    base = predict_profile(spec, None, workload)
    ours = predict_profile(spec, LightKV(layers=[12, 18, 24], windows=[4, 2, 1], ratios=[0.5] * 3), workload)
    ours.flops.total / base.flops.total, sum(ours.vision_kv_bytes) / sum(base.vision_kv_bytes)

Predictions need only the config (no weights); ``profile_from_stats`` uses the counts a real run reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from ..methods import Method, WindowMergeMethod
from .flops import FlopsReport, prefill_flops, window_sizes
from .specs import ModelSpec, TextDims, VisionDims

__all__ = ["Workload", "Profile", "kv_bytes_per_token", "predict_profile", "profile_from_stats",
           "predicted_vision_counts", "lightkv_stages"]


@dataclass(frozen=True)
class Workload:
    """A prompt shape: ``images`` images in a row (one separator token between two images), with
    ``text_before`` and ``text_after`` text tokens around them; ``batch`` identical samples."""

    images: int = 1
    text_before: int = 40
    text_after: int = 20
    batch: int = 1

    def text_tokens(self) -> int:
        return self.text_before + self.text_after + max(0, self.images - 1)

    def text_after_first_image(self) -> int:
        """Non-vision tokens after the first image (separators and the question): text_to_vision's queries."""
        return self.text_after + max(0, self.images - 1)

    def prompt_length(self, patches_per_image: int) -> int:
        return self.text_tokens() + self.images * patches_per_image


@dataclass
class Profile:
    """Token counts per layer (per sample), KV bytes per layer (whole batch) and FLOPs of one prefill."""

    tokens: list[list[int]]  # [sample][layer]
    vision_tokens: list[list[int]]  # [sample][layer]
    kv_bytes: list[int]  # [layer], keys + values, whole batch
    vision_kv_bytes: list[int]
    flops: FlopsReport
    prompt_vision: list[int] = field(default_factory=list)  # [sample] vision tokens of the prompt
    extras_modelled: bool = True  # False when the method's own work (scoring, merging) is not in ``flops``
    notes: list[str] = field(default_factory=list)

    @property
    def retained_fraction(self) -> float | None:
        """Mean over samples with images of (mean over layers of vision tokens) / prompt vision tokens."""
        rows = [sum(r) / (n * len(r)) for r, n in zip(self.vision_tokens, self.prompt_vision) if r and n]
        return sum(rows) / len(rows) if rows else None

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "vision_tokens": self.vision_tokens, "kv_bytes": self.kv_bytes,
                "vision_kv_bytes": self.vision_kv_bytes, "kv_bytes_total": sum(self.kv_bytes),
                "vision_kv_bytes_total": sum(self.vision_kv_bytes), "retained_fraction": self.retained_fraction,
                "flops": self.flops.as_dict(), "extras_modelled": self.extras_modelled, "notes": self.notes}


def kv_bytes_per_token(t: TextDims, dtype_bytes: int) -> int:
    """Bytes one token occupies in one layer's cache: keys and values, 2 x Hkv x dh x bytes."""
    return 2 * t.kv_heads * t.head_dim * dtype_bytes


def predicted_vision_counts(method: Method | None, depth: int, grid: tuple[int, int], images: int) -> list[int] | None:
    """Vision tokens per layer of one sample, predicted from the schedule; None when the method gives no
    prediction (then measure it)."""
    if method is None or images == 0:
        return [grid[0] * grid[1] * images] * depth
    try:
        return method.kept_per_layer(depth, [grid] * images)
    except NotImplementedError:  # a method that predicts nothing: measure it
        return None


def lightkv_stages(method: Method | None, t: TextDims, grid: tuple[int, int], tokens: Sequence[int],
                   vision: Sequence[int], images: int, text_after: int) -> list[dict] | None:
    """``stage_flops`` keyword dicts of one sample; [] for no method, None when the method is not a windowed
    merge (LightKV, ToMe: ``WindowMergeMethod``).

    tokens / vision: that sample's real / vision tokens per layer. Images of a sample share the vision tokens
    equally (same-size images keep the same counts under nested windows). text_after: non-vision tokens after
    the sample's first image.
    """
    if method is None:
        return []
    if not isinstance(method, WindowMergeMethod):
        return None
    schedule = method
    guidance = getattr(method, "guidance", "uniform")  # ToMe merges with equal weights or sizes: no attention
    out = []
    for layer, windows in zip(schedule.layers, schedule.windows):
        if layer >= len(tokens) or images == 0:
            continue
        per_image = vision[layer] // images
        if per_image < schedule.min_tokens_per_window * windows * windows:
            continue  # the stage is skipped for these images (reference rule)
        counts = window_sizes(grid, windows, per_image) * images
        out.append(dict(tokens=tokens[layer], prompt_tokens=tokens[layer] - vision[layer], window_counts=counts,
                        guidance=guidance, text_queries=text_after))
    return out


def _profile(t: TextDims, v: VisionDims | None, method: Method | None, grid: tuple[int, int],
             tokens: list[list[int]], vision: list[list[int]], images: list[int], text_after: list[int],
             dtype_bytes: int, causal: bool) -> Profile:
    per_token = kv_bytes_per_token(t, dtype_bytes)
    L = len(tokens[0])
    kv = [per_token * sum(row[l] for row in tokens) for l in range(L)]
    vkv = [per_token * sum(row[l] for row in vision) for l in range(L)]
    stages = [lightkv_stages(method, t, grid, tokens[b], vision[b], images[b], text_after[b])
              for b in range(len(tokens))]
    modelled = all(s is not None for s in stages)
    flops = prefill_flops(t, v, tokens, images, [s or [] for s in stages], causal=causal)
    notes = [] if modelled else [f"{type(method).__name__}'s own scoring cost is not in the FLOPs model"]
    prompt_vision = [grid[0] * grid[1] * n for n in images]
    return Profile(tokens, vision, kv, vkv, flops, prompt_vision, modelled, notes)


def predict_profile(spec: ModelSpec, method: Method | None, workload: Workload, depth: int | None = None,
                    dtype_bytes: int = 2, causal: bool = False) -> Profile | None:
    """The profile of ``workload`` on ``spec`` (at ``depth`` decoder layers), from the config alone.

    None when the method's kept-token counts cannot be predicted (measure them instead).
    """
    t, v = spec.dims(depth)
    grid = spec.grid()
    vision_row = predicted_vision_counts(method, t.layers, grid, workload.images)
    if vision_row is None:
        return None
    text = workload.text_tokens()
    tokens_row = [text + n for n in vision_row]
    B = workload.batch
    return _profile(t, v, method, grid, [tokens_row] * B, [vision_row] * B, [workload.images] * B,
                    [workload.text_after_first_image()] * B, dtype_bytes, causal)


def profile_from_stats(spec: ModelSpec, method: Method | None, stats: Any, images: Sequence[int],
                       text_after: Sequence[int], depth: int | None = None, dtype_bytes: int = 2,
                       causal: bool = False) -> Profile:
    """The profile of a real prefill from its ``PrefillStats`` (token counts) and the config.

    images: images per sample; text_after: non-vision tokens after each sample's first image.

    KV bytes here are the analytic ones for the reported counts; the real cache's bytes are in
    ``stats.kv_bytes`` (they also count padding slots).
    """
    t, v = spec.dims(depth)
    return _profile(t, v, method, spec.grid(), [list(r) for r in stats.tokens], [list(r) for r in stats.vision_tokens],
                    list(images), list(text_after), dtype_bytes, causal)
