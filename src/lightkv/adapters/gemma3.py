"""Gemma 3 (``Gemma3ForConditionalGeneration`` / ``Gemma3Model``: Gemma-3-4B/12B/27B-it).

Token layout (the Gemma3 processor): every image, and every Pan & Scan crop of one, is ``<start_of_image>``, then
``mm_tokens_per_image`` (256 = 16 x 16) image tokens (``config.image_token_id``), then ``<end_of_image>``. The
SigLIP features are average-pooled to that square grid before the projector, so each image or crop is one square
grid in raster order, without a class token; a crop is a grid of its own.

The decoder is hybrid: five sliding-window layers, then one full-attention layer (``text_config.layer_types``),
each type with its own RoPE base, and ``token_type_ids`` let the tokens of one image attend to each other in both
directions at prefill. The engine gathers each layer type's own mask and rotary by the kept original positions,
so the bidirectional block and the sliding windows stay defined in original positions; see ``lightkv.engine``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from .base import VisionLayout
from .llava import LlavaAdapter

__all__ = ["Gemma3Adapter"]


class Gemma3Adapter(LlavaAdapter):
    family = "gemma3"
    model_classes = ("Gemma3ForConditionalGeneration", "Gemma3Model")
    model_types = ("gemma3",)

    @classmethod
    def image_grid(cls, config: Any, max_pixels: int | None = None) -> tuple[int, int] | None:
        """Fixed: sqrt(mm_tokens_per_image) per side (16 x 16 for the released models), whatever the image size."""
        tokens = getattr(config, "mm_tokens_per_image", None)
        if not isinstance(tokens, int) or tokens <= 0:
            return None
        side = math.isqrt(tokens)
        return (side, side) if side * side == tokens else None

    def vision_feature_layer(self) -> int | list[int] | None:
        return -1  # the tower's last hidden state, pooled

    def has_cls_token(self) -> bool:
        return False  # SigLIP

    def vision_layout(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                      call_kwargs: dict) -> VisionLayout | None:
        # LLaVA's layout with whole square grids and no class token ("default" keeps patches only)
        return super().vision_layout(input_ids, inputs_embeds,
                                     {**call_kwargs, "vision_feature_select_strategy": "default"})

    def rotary_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor,
                          layer_type: str = "full_attention") -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of one layer type (each has its own RoPE base)."""
        return self.language_model.rotary_emb(hidden, position_ids, layer_type)
