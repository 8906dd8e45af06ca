"""LightKV: prompt-guided, windowed merging of vision tokens (METHOD.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..guidance import GUIDANCE_MODES, faithful_guidance, text_to_vision_guidance
from ._matchers import window_merge_matcher
from .base import StageContext, WindowMergeMethod, predict_retained_fraction
from .registry import register_method

__all__ = ["LightKV", "predict_retained_fraction"]

_WIDTH_KEY = "lightkv_prompt_width"  # in StageContext.method_state: the most prompt tokens of a row this call


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
    window_layout (keyword): "original" (default, windows on original grid coordinates) or "regrid" (the
        authors' release: survivors re-laid by rank on a pseudo-square grid at every stage); see README.
    ``LightKV.reference(model)``: the paper's schedule for the model's family and depth.
    """

    guidance: str = "faithful"
    min_tokens_per_window: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.guidance not in GUIDANCE_MODES:
            raise ValueError(f"guidance must be one of {GUIDANCE_MODES}, got {self.guidance!r}")

    @classmethod
    def reference(cls, model: Any, exact: bool = False) -> "LightKV":
        """The paper's settings for ``model`` (a model, or its config): LLaVA-1.5 / LLaVA-NeXT-7B stages after
        layers 12, 18, 24 of 32 with 4, 2, 1 windows per side; Qwen2.5-VL-7B after 12, 17, 22 of 28 with 6, 4, 2;
        ratios 0.5, faithful guidance. Other depths scale the layers as the benchmark specs do
        (``lightkv.perf.specs.scale_layers``: same share of layers before, between and after the stages; a stage
        that would land on the last layer is dropped, with its windows). LLaVA-OneVision takes LLaVA's schedule, Qwen2-VL / Qwen3-VL Qwen2.5-VL's;
        other families raise ValueError. exact=True reproduces the authors' release: positions="compact" and
        window_layout="regrid"; False keeps lightkv's defaults (original positions and windows).
        """
        from ..adapters import adapter_class_for_config, get_adapter
        from ._common import scale_layers

        if not isinstance(exact, bool):
            raise TypeError(f"exact must be True or False, got {exact!r}")
        if hasattr(model, "config") and callable(getattr(model, "forward", None)):
            adapter = get_adapter(model)
            family, depth = adapter.family, len(adapter.decoder_layers)
        else:
            adapter_cls = adapter_class_for_config(model)
            if adapter_cls is None:
                raise ValueError(f"LightKV.reference: no lightkv adapter knows a config of model_type "
                                 f"{getattr(model, 'model_type', None)!r}")
            text = getattr(model, "text_config", None) or model
            family, depth = adapter_cls.family, getattr(text, "num_hidden_layers", None)
            if not isinstance(depth, int):
                raise ValueError("LightKV.reference: the config does not give the decoder depth (num_hidden_layers)")
        schedule = _PAPER_SCHEDULES.get(family)
        if schedule is None:
            raise ValueError(f"LightKV.reference: the paper gives settings for LLaVA-1.5 / LLaVA-NeXT and "
                             f"Qwen2.5-VL (and their kin {sorted(_PAPER_SCHEDULES)}), not for the {family!r} family; "
                             "build LightKV(layers=..., windows=..., ratios=...) yourself")
        reference_depth, reference_layers, windows = schedule
        layers = scale_layers(reference_layers, reference_depth, depth)
        if not layers:
            raise ValueError(f"LightKV.reference: a decoder of {depth} layers is too shallow for the paper's "
                             f"stages {list(reference_layers)} of {reference_depth}")
        extra = dict(positions="compact", window_layout="regrid") if exact else {}
        return cls(layers=layers, windows=windows[:len(layers)], ratios=(0.5,) * len(layers), **extra)

    @property
    def needs_attention(self) -> bool:
        return self.guidance != "uniform"

    def _prompt(self, ctx: StageContext) -> torch.Tensor:
        """(B, M) bool, the prompt tokens whose attention guides the merge."""
        prompt = ctx.token_valid & ~ctx.vision_mask
        return prompt if self.guidance == "faithful" else prompt & ctx.after_first_image()

    def stage_reads(self, ctx: StageContext, stage: int) -> dict[str, torch.Tensor]:
        # merges never remove prompt tokens: the most prompt tokens of a row is read once per call, with the
        # first stage's sizing read
        if self.guidance == "uniform" or _WIDTH_KEY in ctx.method_state or not ctx.hidden.shape[0]:
            return {}
        return {_WIDTH_KEY: self._prompt(ctx).sum(1).max()}

    def merge_weights(self, ctx: StageContext, stage: int, groups: torch.Tensor) -> torch.Tensor | None:
        if self.guidance == "uniform":  # no host read of the groups: the weights are ignored when none merges
            return None
        q, k, scaling = ctx.attention()
        prompt = self._prompt(ctx)
        width = ctx.method_state.get(_WIDTH_KEY)
        if width is None:  # not read with the stage's sizes (a caller of merge_weights outside reduce)
            width = ctx.method_state[_WIDTH_KEY] = int(prompt.sum(1).max()) if prompt.shape[0] else 0
        if self.guidance == "faithful":
            return faithful_guidance(q, k, prompt, ctx.token_valid, scaling, width=width)
        return text_to_vision_guidance(q, k, prompt, ctx.token_valid, scaling, width=width)


# family -> (reference depth, stage layers at that depth, windows per side): the paper's settings
_LLAVA_SCHEDULE = (32, (12, 18, 24), (4, 2, 1))
_QWEN_SCHEDULE = (28, (12, 17, 22), (6, 4, 2))
_PAPER_SCHEDULES = {"llava": _LLAVA_SCHEDULE, "llava_next": _LLAVA_SCHEDULE, "llava_onevision": _LLAVA_SCHEDULE,
                    "qwen2_vl": _QWEN_SCHEDULE, "qwen2_5_vl": _QWEN_SCHEDULE, "qwen3_vl": _QWEN_SCHEDULE}


register_method("lightkv", LightKV, matcher=window_merge_matcher(LightKV))
