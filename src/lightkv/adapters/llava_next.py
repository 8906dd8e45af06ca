"""LLaVA-NeXT (``LlavaNext*``) and LLaVA-OneVision (``LlavaOnevision*``): any-resolution images, newline tokens.

Token layout of one image (all under the image token id), as transformers' ``pack_image_features`` builds it:
the base grid (the whole image resized to the encoder's size, ``image_size / patch_size`` per side, e.g. 24x24)
in raster order, then the high-resolution grid (the crops of the best ``image_grid_pinpoints`` resolution
stitched together and the padding cut off again, ``unpad_image``) row by row, each row followed by one
``image_newline`` token. OneVision additionally shrinks a high-resolution grid of more than ``anyres_max_N``
crops' worth of tokens (bilinear, ``vision_aspect_ratio``), and encodes the images of a multi-image sample
(``batch_num_images`` > 1) as the base grid only, followed by one newline. A OneVision video (video token id)
is each frame's 2x2-pooled base grid, frame after frame, then one newline.

Layout for lightkv: the base grid and the high-resolution grid of an image are two separate grids (separate
``image_index``, windows never span them), each video frame is its own grid; the newline tokens are vision
tokens (``vision_mask``) that are never merged or pruned (``image_index`` -1): they tell the LLM where rows end.

Grids come from ``image_sizes`` (and the config's pinpoints) when the call carries ``pixel_values``. Under
``generate`` the images are encoded before the prefill and the call carries the packed features
(``mm_encoder_outputs``) instead of ``pixel_values`` / ``image_sizes``: the grids are then read from where the
``image_newline`` vectors sit in those features (a high-res row is the run of tokens before each newline).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import VisionLayout
from .llava import LlavaAdapter

__all__ = ["LlavaNextAdapter", "LlavaOnevisionAdapter"]


def _best_resolution(image_size: tuple[int, int], pinpoints: list) -> tuple[int, int]:
    from transformers.image_processing_utils import select_best_resolution  # the rule the model itself uses

    return tuple(int(v) for v in select_best_resolution(tuple(image_size), pinpoints))


def unpadded_grid(image_size: tuple[int, int], crops_hw: tuple[int, int], side: int) -> tuple[int, int]:
    """(rows, cols) of the high-resolution grid of an image of ``image_size`` (H, W) pixels cut into
    ``crops_hw`` crops of ``side`` x ``side`` tokens, after the padding is cut off (transformers' ``unpad_image``,
    same arithmetic)."""
    height, width = image_size
    rows, cols = crops_hw[0] * side, crops_hw[1] * side
    if width / height > cols / rows:
        new_height = int(round(height * (cols / width), 7))
        return rows - 2 * ((rows - new_height) // 2), cols
    new_width = int(round(width * (rows / height), 7))
    return rows, cols - 2 * ((cols - new_width) // 2)


def _shrunk(grid: tuple[int, int], side: int, aspect: str) -> tuple[int, int]:
    """OneVision's ``anyres_max_N``: a grid of more than ~N crops' worth of tokens is resized down (bilinear)."""
    max_crops = int(aspect.strip("anyres_max_"))  # the model parses it this way
    rows, cols = grid
    ratio = math.sqrt(rows * cols / (max_crops * side ** 2))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


# an item (image or video) is a list of parts: ("grid", rows, cols, newline_after_each_row) or ("newline",)
def _item_tokens(parts: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Per token of one item: local grid index (-1: newline), row, col; and the item's grids."""
    index, rows, cols, grids = [], [], [], []
    for part in parts:
        if part[0] == "newline":
            index.append(torch.tensor([-1]))
            rows.append(torch.zeros(1, dtype=torch.long))
            cols.append(torch.zeros(1, dtype=torch.long))
            continue
        _, h, w, newlines = part
        width = w + int(newlines)
        r = torch.arange(h).repeat_interleave(width)
        c = torch.arange(width).repeat(h)
        is_patch = c < w
        index.append(torch.where(is_patch, torch.full_like(r, len(grids)), torch.full_like(r, -1)))
        rows.append(torch.where(is_patch, r, 0))
        cols.append(torch.where(is_patch, c, 0))
        grids.append((h, w))
    return torch.cat(index), torch.cat(rows), torch.cat(cols), grids


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT. ``image_grid`` is the base grid (``image_size / patch_size`` per side): budget matching and the
    analytic cost model plan for that grid only; the high-resolution grid depends on each image's size, so give
    ``kept_per_layer`` / ``retained_fraction`` the real grids of a prompt ([base, high-res] per image, e.g.
    [(24, 24), (48, 36)]; newline tokens are not in any grid and are always kept)."""

    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration", "LlavaNextModel")
    model_types = ("llava_next",)
    # LightKV(window_layout="regrid"): the authors' release re-lays the whole image span (base grid, high-res grid
    # and newline tokens, in sequence order) on one pseudo-square grid, newlines taking cells but never merged
    regrid_flattens_image_span = True

    def vision_feature_attention(self) -> nn.Module:
        raise ValueError(f"lightkv: {type(self.model).__name__} encodes each image as several crops (base + "
                         "high-resolution tiles, unpadded and packed); per-crop encoder attention is not mapped onto "
                         "the packed grids, so encoder-attention methods (VisionZip) are not supported")

    # -- grids ------------------------------------------------------------------------------------------------
    def _side(self) -> int:
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    def _check_strategy(self, call_kwargs: dict) -> None:
        config = self.model.config
        strategy = call_kwargs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        if strategy == "full" and self.has_cls_token():
            raise ValueError(f"lightkv: {type(self.model).__name__} with vision_feature_select_strategy='full' keeps "
                             "the encoder's CLS token, which does not fit the any-resolution packing; use 'default'")

    def _image_parts(self, image_size: tuple[int, int], patched: bool, call_kwargs: dict) -> list[tuple]:
        side = self._side()
        base = ("grid", side, side, False)
        config = self.model.config
        if not patched:
            return [base, ("newline",)]
        pinpoints = config.image_grid_pinpoints
        crop = config.vision_config.image_size
        best = _best_resolution(image_size, pinpoints)
        grid = unpadded_grid(image_size, (best[0] // crop, best[1] // crop), side)
        grid = self._adjust_high_res(grid, call_kwargs)
        return [base, ("grid", grid[0], grid[1], True)]

    def _adjust_high_res(self, grid: tuple[int, int], call_kwargs: dict) -> tuple[int, int]:
        return grid

    def _patched(self, num_images: int, call_kwargs: dict) -> list[bool]:
        return [True] * num_images

    def _items_from_sizes(self, image_sizes: torch.Tensor, call_kwargs: dict) -> list[list[tuple]]:
        sizes = [tuple(int(v) for v in size) for size in image_sizes.tolist()]
        patched = self._patched(len(sizes), call_kwargs)
        return [self._image_parts(size, p, call_kwargs) for size, p in zip(sizes, patched)]

    def _items_from_features(self, features: list[torch.Tensor]) -> list[list[tuple]]:
        """Read each image's grids from its packed features: the base grid, then rows ending in a newline."""
        side = self._side()
        newline = self.entry_module.image_newline
        items = []
        for feature in features:
            is_newline = (feature == newline.to(feature.device, feature.dtype)).all(-1)
            where = torch.nonzero(is_newline[side * side:]).flatten().tolist()
            length = int(feature.shape[0]) - side * side
            if where == [length - 1] and length == 1:
                items.append([("grid", side, side, False), ("newline",)])
                continue
            cols = where[0] if where else -1
            rows = len(where)
            if cols <= 0 or rows * (cols + 1) != length or where != [(i + 1) * (cols + 1) - 1 for i in range(rows)]:
                raise ValueError(f"lightkv: cannot read the image grids from encoded features of {feature.shape[0]} "
                                 f"tokens (base {side}x{side}, then rows each ending in image_newline); pass "
                                 "pixel_values and image_sizes")
            items.append([("grid", side, side, False), ("grid", rows, cols, True)])
        return items

    @classmethod
    def image_grid(cls, config, max_pixels: int | None = None) -> tuple[int, int] | None:
        """The base grid (``image_size / patch_size`` per side); the high-resolution grid of a prompt follows each
        image's size and is not included."""
        return super().image_grid(config, max_pixels)

    # -- layout -----------------------------------------------------------------------------------------------
    def _token_masks(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
                     ) -> dict[str, torch.Tensor]:
        config = self.model.config
        ids = {"image": config.image_token_id}
        if getattr(config, "video_token_id", None) is not None:
            ids["video"] = config.video_token_id
        return {name: self.token_mask(input_ids, inputs_embeds, token_id) for name, token_id in ids.items()}

    def _items(self, name: str, call_kwargs: dict) -> list[list[tuple]] | None:
        encoded = (call_kwargs.get("mm_encoder_outputs") or {}).get(name)
        if name == "image":
            if call_kwargs.get("pixel_values") is not None:
                sizes = call_kwargs.get("image_sizes")
                if sizes is None:
                    raise ValueError(f"lightkv: {type(self.model).__name__} needs image_sizes with pixel_values")
                return self._items_from_sizes(torch.as_tensor(sizes), call_kwargs)
            if encoded is not None:
                return self._items_from_features(list(encoded.pooler_output))
            return None
        return self._video_items(call_kwargs, encoded)

    def _video_items(self, call_kwargs: dict, encoded) -> list[list[tuple]] | None:
        return None

    def vision_layout(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                      call_kwargs: dict) -> VisionLayout | None:
        masks = self._token_masks(input_ids, inputs_embeds)
        ref = next(iter(masks.values()))
        B, N = ref.shape
        device = ref.device
        vision_mask = torch.zeros(B, N, dtype=torch.bool, device=device)
        image_index = torch.full((B, N), -1, dtype=torch.long, device=device)
        rows = torch.zeros(B, N, dtype=torch.long, device=device)
        cols = torch.zeros(B, N, dtype=torch.long, device=device)
        grids: list[tuple[int, int]] = []
        for name, tokens in masks.items():
            if not bool(tokens.any()):
                continue
            items = self._items(name, call_kwargs)
            if items is None:
                continue  # no features come with these ids: the model embeds them as text, so do we
            self._check_strategy(call_kwargs)
            parts = [_item_tokens(item) for item in items]
            lengths = torch.tensor([len(p[0]) for p in parts])
            counts = tokens.sum(1).cpu()
            if int(counts.sum()) != int(lengths.sum()):
                raise ValueError(f"lightkv: the prompt holds {int(counts.sum())} {name} tokens, the {name}s' grids "
                                 f"describe {int(lengths.sum())} (base grid + high-resolution rows + newlines)")
            if not bool(torch.isin(torch.cumsum(counts, 0)[counts > 0], torch.cumsum(lengths, 0)).all()):
                raise ValueError(f"lightkv: a batch row holds part of a {name}: every row must hold whole {name}s")
            local_index, local_rows, local_cols = [], [], []
            for index, r, c, item_grids in parts:
                local_index.append(torch.where(index >= 0, index + len(grids), -1))
                local_rows.append(r)
                local_cols.append(c)
                grids.extend(item_grids)
            vision_mask |= tokens
            image_index[tokens] = torch.cat(local_index).to(device)
            rows[tokens] = torch.cat(local_rows).to(device)
            cols[tokens] = torch.cat(local_cols).to(device)
        if not grids:
            return None
        grid_hw = torch.tensor(grids, dtype=torch.long, device=device)
        return VisionLayout(vision_mask, image_index, rows, cols, grid_hw)


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: LLaVA-NeXT's layout plus ``anyres_max_N`` shrinking, base-only images in multi-image
    samples (``batch_num_images``) and videos (each frame's pooled grid, then one newline). ``image_grid`` is the
    base grid, as for LLaVA-NeXT."""

    family = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
    model_types = ("llava_onevision",)

    def _adjust_high_res(self, grid: tuple[int, int], call_kwargs: dict) -> tuple[int, int]:
        aspect = call_kwargs.get("vision_aspect_ratio") or self.model.config.vision_aspect_ratio
        return _shrunk(grid, self._side(), aspect)

    def _patched(self, num_images: int, call_kwargs: dict) -> list[bool]:
        per_sample = call_kwargs.get("batch_num_images")
        if per_sample is None:
            return [True] * num_images
        patched = [int(n) == 1 for n in torch.as_tensor(per_sample).tolist() for _ in range(int(n))]
        if len(patched) != num_images:
            raise ValueError(f"lightkv: batch_num_images sums to {len(patched)} images, image_sizes holds "
                             f"{num_images}")
        return patched

    def _frame_side(self) -> int:
        return math.ceil(self._side() / 2)

    def _video_items(self, call_kwargs: dict, encoded) -> list[list[tuple]] | None:
        side = self._frame_side()
        pixels = call_kwargs.get("pixel_values_videos")
        if pixels is not None:
            videos, frames = int(pixels.shape[0]), int(pixels.shape[1])
        elif encoded is not None:
            features = encoded.pooler_output  # (videos, frames * side^2 + 1, D)
            videos, length = int(features.shape[0]), int(features.shape[1]) - 1
            if length % (side * side):
                raise ValueError(f"lightkv: encoded video features of {length + 1} tokens are not whole frames of "
                                 f"{side}x{side} tokens plus one newline")
            frames = length // (side * side)
        else:
            return None
        return [[("grid", side, side, False)] * frames + [("newline",)] for _ in range(videos)]
