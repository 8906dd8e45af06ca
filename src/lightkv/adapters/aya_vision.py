"""Aya Vision (``AyaVisionForConditionalGeneration`` / ``AyaVisionModel``: Aya-Vision-8B/32B).

Token layout (the AyaVision processor): per image ``<|START_OF_IMG|>``, then for each tile a ``TILE_i`` text marker
and its patch tokens, then ``TILE_GLOBAL`` and the thumbnail's patch tokens, then ``<|END_OF_IMG|>``. A SigLIP tower
without class token and a 2 x 2 pixel shuffle (``downsample_factor``) give every tile one square grid of
(image_size / patch_size / downsample_factor)^2 tokens (13 x 13 = 169 for the released models) in raster order;
each tile is a grid of its own.

The Cohere2 decoder is hybrid: three sliding-window layers with RoPE, then one global layer without positions
(``text_config.layer_types``). The engine gives each layer type its own mask (see ``lightkv.engine``); the rotary
the model passes to a global layer is unused there, and ``queries_keys`` leaves a global layer's queries and keys
unrotated as the model does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .llava import LlavaAdapter

__all__ = ["AyaVisionAdapter"]


class AyaVisionAdapter(LlavaAdapter):
    family = "aya_vision"
    model_classes = ("AyaVisionForConditionalGeneration", "AyaVisionModel")
    model_types = ("aya_vision",)

    @classmethod
    def image_grid(cls, config: Any, max_pixels: int | None = None) -> tuple[int, int] | None:
        """Fixed per tile: image_size / patch_size / downsample_factor per side, whatever ``max_pixels`` says."""
        grid = super().image_grid(config, max_pixels)
        factor = getattr(config, "downsample_factor", 1) or 1
        if grid is None or grid[0] % factor:
            return None
        return grid[0] // factor, grid[1] // factor

    def has_cls_token(self) -> bool:
        return False  # SigLIP

    def queries_keys(self, layer: nn.Module, q_raw: torch.Tensor, k_raw: torch.Tensor,
                     position_embeddings: tuple[torch.Tensor, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor, float]:
        attn = self.attention(layer)
        if getattr(attn, "sliding_window", None) is not None:
            return super().queries_keys(layer, q_raw, k_raw, position_embeddings)
        # a global layer: no rotary (NoPE)
        B, N, _ = q_raw.shape
        q = q_raw.view(B, N, -1, attn.head_dim).transpose(1, 2)
        k = k_raw.view(B, N, -1, attn.head_dim).transpose(1, 2)
        return q, k, float(getattr(attn, "scaling", attn.head_dim ** -0.5))
