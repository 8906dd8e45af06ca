"""InternVL 2.5 / 3 / 3.5 in transformers' format (``InternVLForConditionalGeneration`` / ``InternVLModel``).

The processor cuts an image into 448-px tiles (dynamic tiling, then a thumbnail tile when there is more than
one) and writes ``<img>`` + ``image_seq_length`` ``<IMG_CONTEXT>`` tokens per tile + ``</img>``; a video frame
is one such tile of its own. The vision encoder sees each tile alone and a pixel shuffle folds its
(image_size / patch_size)^2 patches 2x2 into (image_size / patch_size * downsample_ratio)^2 tokens (16x16 = 256
for 448 px, patch 14, ratio 0.5), in raster order.

The model never receives the tile arrangement (the processor keeps ``num_patches`` to itself), so each tile,
the thumbnail included, is its own token grid with its own ``image_index``: windows never span two tiles, and
the tile count of an image follows from the length of its run of image tokens. The ``<img>`` / ``</img>``
markers are ordinary text tokens: never merged, counted as prompt.

Image tokens are image tokens only when features come with them (``pixel_values``, or the features
``generate`` encodes before the prefill, ``mm_encoder_outputs["image"]``); without either the model embeds the
id as text, and so does the adapter.

VisionZip is refused at apply: the CLS attention ranks the encoder's patches, but after the pixel shuffle a
decoder token is four of them, so the ranking does not map onto the tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core import read_ints
from .base import Adapter, VisionLayout

__all__ = ["InternVLAdapter", "tile_layout"]


def _pair(value) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    return None


class InternVLAdapter(Adapter):
    family = "internvl"
    model_classes = ("InternVLForConditionalGeneration", "InternVLModel")
    model_types = ("internvl",)

    @property
    def language_model(self) -> nn.Module:
        return self.entry_module.language_model

    @classmethod
    def image_grid(cls, config, max_pixels: int | None = None) -> tuple[int, int] | None:
        """The token grid of one tile: (image_size / patch_size) * downsample_ratio per side (16x16 for 448 px,
        patch 14, ratio 0.5), whatever ``max_pixels`` says (an image is a number of such tiles)."""
        vision = getattr(config, "vision_config", None)
        size, patch = _pair(getattr(vision, "image_size", None)), _pair(getattr(vision, "patch_size", None))
        ratio = getattr(config, "downsample_ratio", None)
        if size is None or patch is None or not isinstance(ratio, (int, float)) or ratio <= 0:
            return None
        rows, cols = (round(s // p * ratio) for s, p in zip(size, patch))
        return (rows, cols) if rows > 0 and cols > 0 else None

    def vision_tower(self) -> nn.Module | None:
        return getattr(self.entry_module, "vision_tower", None)

    def vision_feature_layer(self) -> int | list[int] | None:
        return self.model.config.vision_feature_layer

    def has_cls_token(self) -> bool:
        embeddings = getattr(self.vision_tower(), "embeddings", None)
        return getattr(embeddings, "cls_token", None) is not None

    def vision_encoder_layers(self) -> nn.ModuleList | None:
        layers = getattr(getattr(self.vision_tower(), "encoder", None), "layer", None)
        return layers if isinstance(layers, nn.ModuleList) else None

    def vision_feature_attention(self) -> nn.Module:
        raise ValueError("lightkv: InternVL pixel-shuffles the vision encoder's patches 2x2 into one token, so the "
                         "encoder's CLS attention over patches does not rank the decoder's image tokens")

    def vision_layout(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                      call_kwargs: dict) -> VisionLayout | None:
        config = self.model.config
        if not self.has_features(call_kwargs):
            return None  # no features come with image ids: the model embeds them as text, so do we
        image_tokens = self.token_mask(input_ids, inputs_embeds, config.image_token_id)
        grid = self.default_grid()
        if grid is None:
            if not bool(image_tokens.any()):
                return None  # plain text (a read only on this error path)
            raise ValueError(f"lightkv: cannot tell the tile token grid of {type(self.model).__name__} from its "
                             "config (vision_config.image_size, vision_config.patch_size, downsample_ratio)")
        return tile_layout(image_tokens, grid, empty_is_none=True)


def tile_layout(image_tokens: torch.Tensor, grid: tuple[int, int], empty_is_none: bool = False
                ) -> VisionLayout | None:
    """Layout of prompts whose image tokens are whole tiles of ``grid`` (rows, cols) tokens in raster order.

    image_tokens: (B, N) bool. Each run of consecutive image tokens must be a whole number of tiles; the
    k-th tile of the batch (row-major) gets image_index k. ValueError otherwise. empty_is_none: None when there
    is no image token. One device -> host read (the image tokens and the first bad run), whatever the batch.
    """
    rows_per_tile, cols_per_tile = grid
    per_tile = rows_per_tile * cols_per_tile
    k = (torch.cumsum(image_tokens.reshape(-1).long(), 0) - 1).view_as(image_tokens).clamp(min=0)
    # the length of each run of consecutive image tokens, at its last token (a run never spans rows)
    before = torch.nn.functional.pad(image_tokens[:, :-1], (1, 0), value=False)
    after = torch.nn.functional.pad(image_tokens[:, 1:], (0, 1), value=False)
    run_start_k = torch.cummax(torch.where(image_tokens & ~before, k, -1), dim=1).values
    run_length = k - run_start_k + 1
    bad = image_tokens & ~after & (run_length % per_tile != 0)
    first_bad = bad.reshape(-1).long().argmax(0, keepdim=True)  # row-major: the first bad run of the batch
    total, bad_length = read_ints(image_tokens.sum(), torch.where(bad, run_length, 0).reshape(-1)[first_bad])
    total, bad_length = total[0], bad_length[0]
    if empty_is_none and total == 0:
        return None
    if bad_length:
        raise ValueError(f"lightkv: a run of {bad_length} image tokens is not a whole number of tiles "
                         f"of {per_tile} tokens ({rows_per_tile}x{cols_per_tile} after the pixel shuffle)")
    tile = torch.div(k, per_tile, rounding_mode="floor")
    local = k - tile * per_tile
    zeros = torch.zeros_like(k)
    image_index = torch.where(image_tokens, tile, torch.full_like(k, -1))
    rows = torch.where(image_tokens, torch.div(local, cols_per_tile, rounding_mode="floor"), zeros)
    cols = torch.where(image_tokens, local % cols_per_tile, zeros)
    num_tiles = total // per_tile
    grid_hw = torch.tensor([[rows_per_tile, cols_per_tile]], device=image_tokens.device).expand(num_tiles, 2)
    return VisionLayout(image_tokens, image_index, rows, cols, grid_hw)
