"""LLaVA-1.5 (``LlavaForConditionalGeneration`` / ``LlavaModel``): one square patch grid per image.

Image tokens are image tokens only when features come with them: ``pixel_values``, or the features
``generate`` encodes before the prefill (``mm_encoder_outputs["image"]``, with ``pixel_values`` dropped). Without
either, the model embeds the image token id like any other token (a prompt that spells it as text, a decode step
that generated it), and so does the adapter: plain text.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, VisionLayout
from .mistral3 import has_pixtral_tower

__all__ = ["LlavaAdapter"]


class LlavaAdapter(Adapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration", "LlavaModel")
    model_types = ("llava",)

    # Pixtral-12B is a LLaVA model with a Pixtral vision tower and another token layout (rows of [IMG] tokens
    # with break / end tokens): the Pixtral adapter (mistral3.py) takes it
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return super().matches(model) and not has_pixtral_tower(getattr(model, "config", None))

    @classmethod
    def matches_config(cls, config) -> bool:
        return super().matches_config(config) and not has_pixtral_tower(config)

    @property
    def language_model(self) -> nn.Module:
        return self.entry_module.language_model

    def vision_tower(self) -> nn.Module | None:
        return getattr(self.entry_module, "vision_tower", None)

    def vision_feature_layer(self) -> int | list[int] | None:
        return self.model.config.vision_feature_layer

    @classmethod
    def image_grid(cls, config, max_pixels: int | None = None) -> tuple[int, int] | None:
        """Fixed resolution: (image_size / patch_size) per side, whatever ``max_pixels`` says."""
        vision = getattr(config, "vision_config", None)
        size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
        if not (isinstance(size, int) and isinstance(patch, int)):
            return None
        return size // patch, size // patch

    def vision_layout(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                      call_kwargs: dict) -> VisionLayout | None:
        config = self.model.config
        image_tokens = self.token_mask(input_ids, inputs_embeds, config.image_token_id)
        if not bool(image_tokens.any()) or not self.has_features(call_kwargs):
            return None  # no image ids, or no features come with them: the model embeds them as text, so do we

        strategy = call_kwargs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        grid = self.default_grid()
        if grid is None:
            raise ValueError(f"lightkv: cannot tell the image token grid of {type(self.model).__name__} from its "
                             "vision config (image_size, patch_size)")
        grid_h, grid_w = grid
        has_cls = strategy == "full" and self.has_cls_token()  # "full" keeps every encoder token, a CLS if any
        per_image = grid_h * grid_w + int(has_cls)

        # Every run of consecutive image tokens must hold whole images.
        B, N = image_tokens.shape
        padded = torch.nn.functional.pad(image_tokens.long(), (1, 1))
        edges = padded[:, 1:] - padded[:, :-1]
        run_starts = torch.nonzero(edges == 1)
        run_ends = torch.nonzero(edges == -1)
        run_lengths = run_ends[:, 1] - run_starts[:, 1]
        bad = run_lengths % per_image != 0
        if bool(bad.any()):
            raise ValueError(
                f"lightkv: a run of {int(run_lengths[bad][0])} image tokens is not a whole number of images of "
                f"{per_image} tokens ({grid_h}x{grid_w} grid, vision_feature_select_strategy={strategy!r})")

        # k-th image token of a row -> (image of the row, patch in the image)
        k = torch.cumsum(image_tokens.long(), dim=1) - 1
        local_image = torch.div(k, per_image, rounding_mode="floor")
        patch = k - local_image * per_image - int(has_cls)
        images_per_row = image_tokens.sum(dim=1) // per_image
        first_image = torch.cumsum(images_per_row, 0) - images_per_row
        is_patch = image_tokens & (patch >= 0)
        image_index = torch.where(is_patch, first_image[:, None] + local_image, torch.full_like(k, -1))
        patch = patch.clamp(min=0)
        rows = torch.where(is_patch, torch.div(patch, grid_w, rounding_mode="floor"), torch.zeros_like(k))
        cols = torch.where(is_patch, patch % grid_w, torch.zeros_like(k))
        num_images = int(images_per_row.sum())
        grid_hw = torch.tensor([[grid_h, grid_w]], device=image_tokens.device).expand(num_images, 2)
        return VisionLayout(image_tokens, image_index, rows, cols, grid_hw)
