"""LLaVA-1.5 (``LlavaForConditionalGeneration`` / ``LlavaModel``): one square patch grid per image.

Image tokens are image tokens only when features come with them: ``pixel_values``, or the features
``generate`` encodes before the prefill (``mm_encoder_outputs["image"]``, with ``pixel_values`` dropped). Without
either, the model embeds the image token id like any other token (a prompt that spells it as text, a decode step
that generated it), and so does the adapter: plain text.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core import read_ints
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
        if not self.has_features(call_kwargs):
            return None  # no features come with image ids: the model embeds them as text, so do we
        image_tokens = self.token_mask(input_ids, inputs_embeds, config.image_token_id)

        strategy = call_kwargs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        grid = self.default_grid()
        if grid is None:
            raise ValueError(f"lightkv: cannot tell the image token grid of {type(self.model).__name__} from its "
                             "vision config (image_size, patch_size)")
        grid_h, grid_w = grid
        has_cls = strategy == "full" and self.has_cls_token()  # "full" keeps every encoder token, a CLS if any
        per_image = grid_h * grid_w + int(has_cls)

        # k-th image token of a row -> (image of the row, patch in the image)
        k = torch.cumsum(image_tokens.long(), dim=1) - 1
        # Every run of consecutive image tokens must hold whole images: the length of each run, at its last token
        B, N = image_tokens.shape
        after = torch.nn.functional.pad(image_tokens[:, 1:], (0, 1), value=False)
        before = torch.nn.functional.pad(image_tokens[:, :-1], (1, 0), value=False)
        run_start_k = torch.cummax(torch.where(image_tokens & ~before, k, -1), dim=1).values
        run_length = k - run_start_k + 1
        bad = image_tokens & ~after & (run_length % per_image != 0)
        bad_lengths = torch.where(bad, run_length, 0).reshape(-1)
        first_bad = bad.reshape(-1).long().argmax(0, keepdim=True)  # row-major: the first bad run of the batch
        images_per_row = image_tokens.sum(dim=1) // per_image
        # the one device -> host read: image tokens, images, and the first bad run (length, or 0 when none)
        total, num_images, bad_length = read_ints(image_tokens.sum(), images_per_row.sum(),
                                                  bad_lengths.gather(0, first_bad))
        total, num_images, bad_length = total[0], num_images[0], bad_length[0]
        if total == 0:
            return None  # no image ids: plain text
        if bad_length:
            raise ValueError(
                f"lightkv: a run of {bad_length} image tokens is not a whole number of images of "
                f"{per_image} tokens ({grid_h}x{grid_w} grid, vision_feature_select_strategy={strategy!r})")

        local_image = torch.div(k, per_image, rounding_mode="floor")
        patch = k - local_image * per_image - int(has_cls)
        first_image = torch.cumsum(images_per_row, 0) - images_per_row
        is_patch = image_tokens & (patch >= 0)
        image_index = torch.where(is_patch, first_image[:, None] + local_image, torch.full_like(k, -1))
        patch = patch.clamp(min=0)
        rows = torch.where(is_patch, torch.div(patch, grid_w, rounding_mode="floor"), torch.zeros_like(k))
        cols = torch.where(is_patch, patch % grid_w, torch.zeros_like(k))
        grid_hw = torch.stack([torch.full((num_images,), grid_h, dtype=torch.long, device=image_tokens.device),
                               torch.full((num_images,), grid_w, dtype=torch.long, device=image_tokens.device)], 1)
        return VisionLayout(image_tokens, image_index, rows, cols, grid_hw)
