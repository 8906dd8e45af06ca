"""LLaVA-1.5 (``LlavaForConditionalGeneration`` / ``LlavaModel``): one square patch grid per image."""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, VisionLayout

__all__ = ["LlavaAdapter"]


class LlavaAdapter(Adapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration", "LlavaModel")

    @property
    def entry_module(self) -> nn.Module:
        return self.model.model if type(self.model).__name__ == "LlavaForConditionalGeneration" else self.model

    @property
    def language_model(self) -> nn.Module:
        return self.entry_module.language_model

    def vision_tower(self) -> nn.Module | None:
        return getattr(self.entry_module, "vision_tower", None)

    def vision_feature_layer(self) -> int | list[int] | None:
        return self.model.config.vision_feature_layer

    def grid_size(self) -> tuple[int, int]:
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side

    def vision_layout(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                      call_kwargs: dict) -> VisionLayout | None:
        config = self.model.config
        if input_ids is not None:
            image_tokens = input_ids == config.image_token_id
        else:
            # Same test as transformers: the placeholder embedding before image features are scattered in.
            embed = self.entry_module.get_input_embeddings()
            token = embed(torch.tensor(config.image_token_id, device=inputs_embeds.device))
            image_tokens = (inputs_embeds == token.to(inputs_embeds.dtype)).all(-1)
        if not bool(image_tokens.any()):
            return None

        strategy = call_kwargs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        grid_h, grid_w = self.grid_size()
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
