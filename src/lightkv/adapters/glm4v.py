"""GLM-4.1V, GLM-4.5V and GLM-4.6V (``Glm4v*``, ``Glm4vMoe*``, ``Glm46V*``): Qwen2-VL's layout, one token id.

As in Qwen2-VL (``adapters/qwen.py``, whose logic this reuses): ``image_grid_thw`` / ``video_grid_thw`` rows
(t, h, w) in patches, ``spatial_merge_size`` x ``spatial_merge_size`` patches (2 x 2) merged into a token, each
temporal slice its own (h / merge) x (w / merge) grid, 3-D M-RoPE positions the model computes from
``mm_token_type_ids`` and the grids (``generate`` passes the positions instead of the grids: the grids are read
back from them). ``<|begin_of_image|>`` / ``<|end_of_image|>`` markers are text, never merged.

What differs:
- Video frames reuse the image token id (the model fills image and video features by the same id): images and
  videos are told apart by ``mm_token_type_ids`` (1 image, 2 video). The processor writes each video frame
  between its own begin / end image markers, followed by a timestamp, so a frame is one run of tokens and one
  grid. Without ``mm_token_type_ids`` every image id counts as an image.
- Partial rotary: RoPE turns only the first ``partial_rotary_factor`` of each head's dims (GLM-4.1V / 4.6V
  interleave them, GLM-4.5V's MoE text model rotates halves); guidance computes the post-RoPE queries and keys
  with the modeling file's own ``apply_rotary_pos_emb`` (``Adapter.queries_keys``), so it sees the model's q / k.
- The vision tower has no CLS token: VisionZip raises ValueError at apply.
"""

from __future__ import annotations

import torch

from .qwen import _QwenVLAdapter

__all__ = ["Glm4vAdapter", "Glm4vMoeAdapter", "Glm46VAdapter"]


class _Glm4vFamilyAdapter(_QwenVLAdapter):
    def _token_masks(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                     call_kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) bool masks of the image and the video tokens: one placeholder id for both, split by
        ``mm_token_type_ids``."""
        config = self.model.config
        placeholders = self.token_mask(input_ids, inputs_embeds, config.image_token_id)
        types = call_kwargs.get("mm_token_type_ids")
        if types is None:
            return placeholders, torch.zeros_like(placeholders)
        types = types.to(placeholders.device)
        return placeholders & (types == 1), placeholders & (types == 2)


class Glm4vAdapter(_Glm4vFamilyAdapter):
    """GLM-4.1V (dense GLM-4 text model, interleaved partial rotary)."""

    family = "glm4v"
    model_classes = ("Glm4vForConditionalGeneration", "Glm4vModel")
    model_types = ("glm4v",)


class Glm4vMoeAdapter(_Glm4vFamilyAdapter):
    """GLM-4.5V (MoE text model)."""

    family = "glm4v_moe"
    model_classes = ("Glm4vMoeForConditionalGeneration", "Glm4vMoeModel")
    model_types = ("glm4v_moe",)


class Glm46VAdapter(_Glm4vFamilyAdapter):
    """GLM-4.6V (GLM-4.1V's text and vision models under another wrapper)."""

    family = "glm46v"
    model_classes = ("Glm46VForConditionalGeneration", "Glm46VModel")
    model_types = ("glm46v",)
