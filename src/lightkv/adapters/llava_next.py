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

import itertools
import math
from typing import Callable

import torch
from torch import nn

from ..core import read_ints
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

    def _patched(self, num_images: int, call_kwargs: dict, per_sample: list[int] | None = None) -> list[bool]:
        """Whether each image has a high-resolution grid; ``per_sample``: the ``batch_num_images`` values when
        the caller read them back already (see ``_per_sample_images``)."""
        return [True] * num_images

    def _per_sample_images(self, call_kwargs: dict) -> torch.Tensor | None:
        """Images per sample the layout needs on the host (OneVision's ``batch_num_images``), or None."""
        return None

    def _items_from_sizes(self, image_sizes: torch.Tensor, call_kwargs: dict) -> list[list[tuple]]:
        sizes = [tuple(int(v) for v in size) for size in image_sizes.tolist()]
        patched = self._patched(len(sizes), call_kwargs)
        return [self._image_parts(size, p, call_kwargs) for size, p in zip(sizes, patched)]

    def _feature_stats(self, features: list[torch.Tensor]) -> torch.Tensor:
        """(len(features), 3) long, on the device, per image's packed features (base grid, then high-resolution
        rows each ending in a newline): in the part after the base grid, the newline tokens, the index of the first
        one (0 when none), and the tokens that disagree with rows as long as that index (a newline where none
        belongs or none where one does). No host read: ``_items_from_feature_stats`` reads the grids off them."""
        side2 = self._side() ** 2
        newline = self.entry_module.image_newline
        stats = []
        for feature in features:
            length = int(feature.shape[0]) - side2
            if length <= 0:
                stats.append(torch.zeros(3, dtype=torch.long, device=feature.device))
                continue
            is_newline = (feature[side2:] == newline.to(feature.device, feature.dtype)).all(-1)
            first = is_newline.long().argmax()
            j = torch.arange(length, device=feature.device)
            expected = (j + 1) % (first + 1) == 0  # a newline closes every row of (first + 1) tokens
            stats.append(torch.stack([is_newline.sum(), first, (expected != is_newline).sum()]))
        return torch.stack(stats).long()

    def _items_from_feature_stats(self, lengths: list[int], stats: list[int]) -> list[list[tuple]]:
        """Each image's grids from its packed features' length and ``_feature_stats`` (read back, flat)."""
        side = self._side()
        items = []
        for i, size in enumerate(lengths):
            newlines, first, wrong = stats[3 * i:3 * i + 3]
            length = size - side * side
            if length == 1 and newlines == 1:
                items.append([("grid", side, side, False), ("newline",)])
                continue
            cols = first if newlines else -1
            rows = newlines
            if cols <= 0 or rows * (cols + 1) != length or wrong:
                raise ValueError(f"lightkv: cannot read the image grids from encoded features of {size} "
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

    def _item_source(self, name: str, call_kwargs: dict, device: torch.device
                     ) -> tuple[list[torch.Tensor], Callable[[list[list[int]]], list[list[tuple]] | None]]:
        """How the items of ``name`` are found: the tensors the host needs (read with the layout's one read)
        and a function of their values read back that gives the items (None: no features come with the ids).
        Errors are raised by that function, so only for a prompt that holds the ids."""
        if name != "image":
            encoded = (call_kwargs.get("mm_encoder_outputs") or {}).get(name)
            return [], lambda values: self._video_items(call_kwargs, encoded)  # from shapes: nothing to read
        if call_kwargs.get("pixel_values") is not None:
            sizes = call_kwargs.get("image_sizes")
            if sizes is None:
                def missing(values):
                    raise ValueError(f"lightkv: {type(self.model).__name__} needs image_sizes with pixel_values")
                return [], missing
            per_sample = self._per_sample_images(call_kwargs)
            reads = [torch.as_tensor(sizes).to(device)] + ([] if per_sample is None else [per_sample.to(device)])

            def from_sizes(values):
                flat = values[0]
                sizes = [tuple(flat[i:i + 2]) for i in range(0, len(flat), 2)]
                patched = self._patched(len(sizes), call_kwargs, values[1] if per_sample is not None else None)
                return [self._image_parts(size, p, call_kwargs) for size, p in zip(sizes, patched)]
            return reads, from_sizes
        encoded = (call_kwargs.get("mm_encoder_outputs") or {}).get(name)
        if encoded is None:
            return [], lambda values: None
        features = list(encoded.pooler_output)
        lengths = [int(feature.shape[0]) for feature in features]
        reads = [self._feature_stats(features).to(device)] if features else []
        return reads, lambda values: self._items_from_feature_stats(lengths, values[0] if values else [])

    def _video_items(self, call_kwargs: dict, encoded) -> list[list[tuple]] | None:
        return None

    def vision_layout(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                      call_kwargs: dict) -> VisionLayout | None:
        """One device -> host read: the tokens of each modality per row, and what the grids follow from
        (``image_sizes``, or statistics of the encoded features under ``generate``); every per-token value is
        then computed on the device from a small table of the items' parts."""
        masks = self._token_masks(input_ids, inputs_embeds)
        ref = next(iter(masks.values()))
        B, N = ref.shape
        device = ref.device
        sources = {name: self._item_source(name, call_kwargs, device) for name in masks}
        values = read_ints(*(tokens.sum(1) for tokens in masks.values()),
                           *(t for reads, _ in sources.values() for t in reads))
        row_counts = dict(zip(masks, values))
        at = len(masks)
        vision_mask = torch.zeros(B, N, dtype=torch.bool, device=device)
        image_index = torch.full((B, N), -1, dtype=torch.long, device=device)
        rows = torch.zeros(B, N, dtype=torch.long, device=device)
        cols = torch.zeros(B, N, dtype=torch.long, device=device)
        grids: list[tuple[int, int]] = []
        for name, tokens in masks.items():
            reads, finish = sources[name]
            source_values, at = values[at:at + len(reads)], at + len(reads)
            counts = row_counts[name]
            if not sum(counts):
                continue
            items = finish(source_values)
            if items is None:
                continue  # no features come with these ids: the model embeds them as text, so do we
            self._check_strategy(call_kwargs)
            # the items' parts, in token order: (first token, tokens, tokens per row, patches per row, grid)
            table, start = [], 0
            item_ends = set()
            for item in items:
                for part in item:
                    if part[0] == "newline":
                        table.append((start, 1, 1, 0, -1))
                        start += 1
                        continue
                    _, h, w, newlines = part
                    width = w + int(newlines)
                    table.append((start, h * width, width, w, len(grids)))
                    start += h * width
                    grids.append((h, w))
                item_ends.add(start)
            total = sum(counts)
            if total != start:
                raise ValueError(f"lightkv: the prompt holds {total} {name} tokens, the {name}s' grids "
                                 f"describe {start} (base grid + high-resolution rows + newlines)")
            if not {end for end, count in zip(itertools.accumulate(counts), counts) if count} <= item_ends:
                raise ValueError(f"lightkv: a batch row holds part of a {name}: every row must hold whole {name}s")
            if not table:
                continue
            part = torch.tensor(table, dtype=torch.long, device=device)  # (P, 5)
            part_start, part_width, part_w, part_grid = part[:, 0], part[:, 2], part[:, 3], part[:, 4]
            k = (torch.cumsum(tokens.reshape(-1).long(), 0) - 1).view(B, N).clamp(min=0)  # k-th token of the batch
            p = torch.searchsorted(part_start + part[:, 1], k, right=True).clamp(max=part.shape[0] - 1)
            local = k - part_start[p]
            width = part_width[p]
            r, c = torch.div(local, width, rounding_mode="floor"), local % width
            is_patch = tokens & (part_grid[p] >= 0) & (c < part_w[p])
            vision_mask |= tokens
            image_index = torch.where(is_patch, part_grid[p], image_index)
            rows = torch.where(is_patch, r, rows)
            cols = torch.where(is_patch, c, cols)
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

    def _per_sample_images(self, call_kwargs: dict) -> torch.Tensor | None:
        per_sample = call_kwargs.get("batch_num_images")
        return None if per_sample is None else torch.as_tensor(per_sample)

    def _patched(self, num_images: int, call_kwargs: dict, per_sample: list[int] | None = None) -> list[bool]:
        if per_sample is None:
            per_sample = call_kwargs.get("batch_num_images")
            if per_sample is None:
                return [True] * num_images
            per_sample = torch.as_tensor(per_sample).tolist()
        patched = [int(n) == 1 for n in per_sample for _ in range(int(n))]
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
