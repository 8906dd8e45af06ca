"""Temporary home of StageContext until it moves next to Method in lightkv.methods.base."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["StageContext"]


@dataclass
class StageContext:
    """The current sequence at a stage layer, as a method sees it. Tensors are (B, M) unless noted."""

    layer_index: int
    hidden: torch.Tensor  # (B, M, D)
    token_valid: torch.Tensor
    vision_mask: torch.Tensor
    image_index: torch.Tensor
    grid_rows: torch.Tensor
    grid_cols: torch.Tensor
    grid_hw: torch.Tensor  # (I, 2)
    input_positions: torch.Tensor
    token_state: dict
    method_state: dict
    attention_fn: Callable[[], tuple[torch.Tensor, torch.Tensor, float]]

    def image_token_counts(self) -> torch.Tensor:
        patches = self.image_index[self.image_index >= 0]
        return torch.bincount(patches, minlength=int(self.grid_hw.shape[0]))

    def after_first_image(self) -> torch.Tensor:
        first = torch.where(self.vision_mask.any(1), self.vision_mask.float().argmax(1), self.vision_mask.shape[1])
        return torch.arange(self.vision_mask.shape[1], device=first.device)[None, :] > first[:, None]

    def attention(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.attention_fn()

