"""LightKV: prompt-guided, windowed merging of vision tokens (METHOD.md)."""

from __future__ import annotations

from dataclasses import dataclass
import torch

from ..guidance import GUIDANCE_MODES, faithful_guidance, text_to_vision_guidance
from ._matchers import window_merge_matcher
from .base import StageContext, WindowMergeMethod, predict_retained_fraction
from .registry import register_method

__all__ = ["LightKV", "predict_retained_fraction"]


@dataclass(frozen=True)
class LightKV(WindowMergeMethod):
    """LightKV: prompt-guided, windowed merging of vision tokens during prefill.

    layers: decoder layers after which a stage runs (strictly increasing, >= 0).
    windows: windows per side W_s of each stage (>= 1).
    ratios: fraction P_s of the current tokens of each window that is merged away, in [0, 1]
        (capped at half a window).
    guidance: "faithful" (paper), "uniform" (g = 1, vision-only merge) or "text_to_vision".
    min_tokens_per_window: a stage is skipped for an image with fewer than this many tokens per window
        (8 in the reference code).
    """

    guidance: str = "faithful"
    min_tokens_per_window: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.guidance not in GUIDANCE_MODES:
            raise ValueError(f"guidance must be one of {GUIDANCE_MODES}, got {self.guidance!r}")

    @property
    def needs_attention(self) -> bool:
        return self.guidance != "uniform"

    def merge_weights(self, ctx: StageContext, stage: int, groups: torch.Tensor) -> torch.Tensor | None:
        if self.guidance == "uniform" or not bool((groups >= 0).any()):
            return None
        q, k, scaling = ctx.attention()
        prompt = ctx.token_valid & ~ctx.vision_mask
        if self.guidance == "faithful":
            return faithful_guidance(q, k, prompt, ctx.token_valid, scaling)
        return text_to_vision_guidance(q, k, prompt & ctx.after_first_image(), ctx.token_valid, scaling)


register_method("lightkv", LightKV, matcher=window_merge_matcher(LightKV))
