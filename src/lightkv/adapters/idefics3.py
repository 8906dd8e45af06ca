"""Idefics3 and SmolVLM (``Idefics3ForConditionalGeneration`` / ``Idefics3Model``, ``SmolVLMForConditionalGeneration``
/ ``SmolVLMModel``): the decoder is ``.text_model``.

Token layout (the Idefics3 / SmolVLM processors): an image split into R x C tiles is, tile by tile in row-major
order, ``<fake_token_around_image>`` ``<row_r_col_c>`` and one run of S x S ``<image>`` tokens (S = image_size /
patch_size / scale_factor: 8 for SmolVLM, 13 for Idefics3-8B), a newline after every row of tiles, then the
downscaled global image: ``<fake_token_around_image>`` ``<global-img>``, S x S ``<image>`` tokens,
``<fake_token_around_image>``. An image that is not split (and every video frame) is the global part alone.
Each run is raster order within its tile (the connector's pixel shuffle keeps row-major order).

Grids: the tiles of one image are stitched into one (R * S) x (C * S) grid, so windows may span tile borders
(a tile alone has 64-169 tokens, too few for merge windows); the global image is its own S x S grid. Markers,
``<fake_token_around_image>`` and newlines are text: never merged, never counted as vision tokens.

How the adapter learns the arrangement, from the prompt alone (the model never receives it; ``generate``
drops the pixels at prefill): the token right before each run is its marker. A run behind ``<global-img>``
closes an image, and the runs since the previous one are its tiles. The ``<global-img>`` id lives in the
tokenizer, not the config: it is the ``global_image_token_id`` constructor argument, else the same attribute on
``model.config`` (copy ``processor.global_image_token_id`` there to pin it), else detected per call as the
marker before the last run of every prompt (the processor always ends an image with its global part). Tiles of
one row of tiles are two tokens apart (``<fake_token_around_image>`` and the next ``<row_r_col_c>``, both
special tokens); a newline makes the gap longer, which starts the next row of tiles: C = tiles before the first
longer gap, R = tiles / C. Runs of another length than S x S, rows of tiles of different lengths, or tiles not
closed by a global image raise ValueError.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..core import read_ints
from .base import Adapter, VisionLayout, run_table, token_runs

__all__ = ["Idefics3Adapter", "SmolVLMAdapter"]

_TILE_GAP = 2  # <fake_token_around_image> <row_r_col_c> between two tiles of one row of tiles


class Idefics3Adapter(Adapter):
    family = "idefics3"
    model_classes = ("Idefics3ForConditionalGeneration", "Idefics3Model")
    model_types = ("idefics3",)

    def __init__(self, model: nn.Module, global_image_token_id: int | None = None):
        super().__init__(model)
        if global_image_token_id is None:
            global_image_token_id = getattr(model.config, "global_image_token_id", None)
        if global_image_token_id is not None and (isinstance(global_image_token_id, bool)
                                                  or not isinstance(global_image_token_id, int)):
            raise ValueError(f"lightkv: global_image_token_id must be a token id or None, got {global_image_token_id!r}")
        self.global_image_token_id = global_image_token_id

    # -- structure -------------------------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        return self.entry_module.text_model

    def vision_tower(self) -> nn.Module | None:
        return getattr(self.entry_module, "vision_model", None)

    def has_cls_token(self) -> bool:
        return False  # SigLIP-style encoder, no class token

    @classmethod
    def tile_side(cls, config: Any) -> int | None:
        """S: tokens per side of one tile (and of the global image)."""
        vision = getattr(config, "vision_config", None)
        size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
        scale = getattr(config, "scale_factor", None)
        if not (isinstance(size, int) and isinstance(patch, int) and isinstance(scale, int)):
            return None
        return size // patch // scale

    @classmethod
    def image_grid(cls, config: Any, max_pixels: int | None = None) -> tuple[int, int] | None:
        """The stitched tile grid of a square image of ``max_pixels`` pixels (tiles of ``image_size`` px, at least
        one); one tile (S x S) without ``max_pixels``. The global image adds another S x S grid."""
        side = cls.tile_side(config)
        if not side:
            return None
        tiles = 1
        if max_pixels:
            size = config.vision_config.image_size
            tiles = max(1, math.ceil(math.isqrt(int(max_pixels)) / size))
        return side * tiles, side * tiles

    # -- image tokens ----------------------------------------------------------------------------------------
    def vision_layout(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                      call_kwargs: dict) -> VisionLayout | None:
        config = self.model.config
        if input_ids is not None:
            image_tokens = input_ids == config.image_token_id
        else:
            image_tokens = self.token_mask(None, inputs_embeds, config.image_token_id)
        encoded = (call_kwargs.get("mm_encoder_outputs") or {}).get("image")
        if call_kwargs.get("pixel_values") is None and encoded is None:
            return None  # no features come with these ids: the model embeds them as text, so do we
        B, N = image_tokens.shape
        device = image_tokens.device
        edges, num_runs = token_runs(image_tokens)
        (R,), = read_ints(num_runs)  # read 1: the runs of image tokens
        if R == 0:
            return None
        side = self.tile_side(config)
        if not side:
            raise ValueError(f"lightkv: cannot tell the tile size of {type(self.model).__name__} from its config "
                             "(vision image_size, patch_size, scale_factor)")

        # read 2: each run's batch row, first token and end (batch row-major order) and the marker before it
        run_row, run_start, run_end = run_table(edges, R)
        from_ids, marker = self._markers(input_ids, inputs_embeds, run_row, (run_start - 1).clamp(min=0))
        rows_of, starts, ends, marker = read_ints(run_row, run_start, run_end, marker)
        lengths = [end - start for start, end in zip(starts, ends)]
        wrong = [length for length in lengths if length != side * side]
        if wrong:
            raise ValueError(f"lightkv: a run of {wrong[0]} image tokens; every tile and global image is "
                             f"{side}x{side} = {side * side} tokens (pass the processor's output unchanged)")
        if 0 in starts:
            raise ValueError("lightkv: a prompt starts with image tokens: every tile or global image follows its "
                             "marker token")
        last_in_row = [k == R - 1 or rows_of[k + 1] != rows_of[k] for k in range(R)]
        is_global = self._behind_global_marker(from_ids, marker, last_in_row)

        run_list = list(zip(rows_of, starts, ends, is_global))
        image_of_run, tile_row, tile_col = [0] * R, [0] * R, [0] * R
        grids: list[tuple[int, int]] = []
        tiles: list[int] = []  # runs of the image in progress (its tiles)

        def close_tiles() -> None:
            longer_gaps = [i for i in range(1, len(tiles))
                           if run_list[tiles[i]][1] - run_list[tiles[i - 1]][2] != _TILE_GAP]
            cols = longer_gaps[0] if longer_gaps else len(tiles)
            rows = len(tiles) // cols
            if rows * cols != len(tiles) or longer_gaps != list(range(cols, len(tiles), cols)):
                raise ValueError(f"lightkv: an image's {len(tiles)} tiles do not form rows of equal length (tiles of "
                                 "one row are two tokens apart, <fake_token_around_image><row_r_col_c>)")
            for t, k in enumerate(tiles):
                tile_row[k], tile_col[k], image_of_run[k] = t // cols, t % cols, len(grids)
            grids.append((rows * side, cols * side))

        for k, (row, _, _, glob) in enumerate(run_list):
            if tiles and run_list[tiles[0]][0] != row:
                raise ValueError("lightkv: tiles of an image are not followed by its global image (<global-img>)")
            if not glob:
                tiles.append(k)
                continue
            if tiles:
                close_tiles()
            tiles = []
            image_of_run[k] = len(grids)
            grids.append((side, side))
        if tiles:
            raise ValueError("lightkv: tiles of an image are not followed by its global image (<global-img>)")
        image_of_run_t, tile_row_t, tile_col_t = (torch.tensor(v, dtype=torch.long, device=device)
                                                  for v in (image_of_run, tile_row, tile_col))

        run_of_token = (torch.cumsum((edges[:, :N] == 1).reshape(-1).long(), 0) - 1).view(B, N).clamp(min=0)
        local = torch.arange(N, device=device).expand(B, N) - run_start[run_of_token]
        zeros = torch.zeros(B, N, dtype=torch.long, device=device)
        image_index = torch.where(image_tokens, image_of_run_t[run_of_token], torch.full_like(zeros, -1))
        rows = torch.where(image_tokens, tile_row_t[run_of_token] * side + torch.div(local, side, rounding_mode="floor"),
                           zeros)
        cols = torch.where(image_tokens, tile_col_t[run_of_token] * side + local % side, zeros)
        grid_hw = torch.tensor(grids, dtype=torch.long, device=device).view(-1, 2)
        return VisionLayout(image_tokens, image_index, rows, cols, grid_hw)

    def _markers(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                 run_row: torch.Tensor, before: torch.Tensor) -> tuple[bool, torch.Tensor]:
        """(R,) long, what the host needs about the token before each run (at ``before``): its id, or from
        embeddings whether it is ``<global-img>`` (when that id is not set: the same token as before the first
        run that is the last of its batch row). Returns (from ids, the tensor). No host read."""
        if input_ids is not None:
            return True, input_ids[run_row, before]
        marker = inputs_embeds[run_row, before]  # (R, D)
        if self.global_image_token_id is not None:
            return False, self.token_mask(None, marker[None], self.global_image_token_id)[0]
        last_in_row = torch.ones_like(run_row, dtype=torch.bool)
        last_in_row[:-1] = run_row[1:] != run_row[:-1]
        reference = marker[last_in_row.long().argmax()]
        return False, (marker == reference).all(-1)

    def _behind_global_marker(self, from_ids: bool, marker: list[int], last_in_row: list[bool]) -> list[bool]:
        """Whether the token before each run is ``<global-img>``, from ``_markers``' values read back."""
        global_id = self.global_image_token_id
        if from_ids:
            if global_id is None:
                found = sorted({token for token, last in zip(marker, last_in_row) if last})
                if len(found) != 1:
                    raise ValueError(f"lightkv: cannot tell the <global-img> id: the last images of the batch rows "
                                     f"follow ids {found}; set model.config.global_image_token_id from the processor")
                global_id = found[0]
            return [token == global_id for token in marker]
        if global_id is None and not all(same for same, last in zip(marker, last_in_row) if last):
            raise ValueError("lightkv: cannot tell the <global-img> token: the last images of the batch rows follow "
                             "different tokens; set model.config.global_image_token_id from the processor")
        return [bool(flag) for flag in marker]


class SmolVLMAdapter(Idefics3Adapter):
    family = "smolvlm"
    model_classes = ("SmolVLMForConditionalGeneration", "SmolVLMModel")
    model_types = ("smolvlm",)
