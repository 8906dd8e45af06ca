"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: dynamic-resolution images and videos, 3-D M-RoPE positions.

An image of ``image_grid_thw`` row (t, h, w) patches becomes t * (h / merge) * (w / merge) image tokens in the
prompt (``merge`` = the vision config's ``spatial_merge_size``), in (temporal, row, column) raster order; a
video the same with ``video_grid_thw``. Each temporal slice is one token grid of (h / merge) x (w / merge), any
aspect ratio, with its own ``image_index``: windows never span two frames. The vision start / end marker tokens
around each image are ordinary text tokens (``mm_token_type_ids`` 0): they are never merged and count as prompt.

Positions: the model computes the 3-D M-RoPE position of every token (``get_rope_index``, from input_ids,
``mm_token_type_ids`` and the grids) and its cos / sin before the decoder; the engine gathers those by the kept
indices, so a kept token keeps its original (temporal, row, column) position. Decoding is unchanged: layer 0
keeps the full prefill, so ``cache.get_seq_length()`` and the cached ``rope_deltas`` give new tokens the same
positions as in the uncompressed model (``generate`` passes them explicitly anyway; after a stage -1 the engine
supplies them, see ``decode_position_ids``). ``positions="compact"`` renumbers the kept tokens 0..N'-1 in
sequence order, the same value on all three M-RoPE axes (METHOD.md's reference renumbering read literally; the
kept vision tokens lose their 2-D layout); decoding then still continues at the uncompressed positions, as it
does for LLaVA.

``generate`` encodes the images before the prefill and calls the model with the features and the 3-D
positions instead of ``image_grid_thw`` / ``video_grid_thw``: the grids are then read back from the positions.

Qwen3-VL "deepstack": the outputs of decoder layers 0..K-1 (K = ``len(vision_config.deepstack_visual_indexes)``)
receive extra vision features through a full-length mask of the image tokens, so no stage may shorten the
sequence before that: ``apply`` raises ValueError for a stage at a layer < K (stage -1 included).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..core import read_ints
from .base import Adapter, VisionLayout

__all__ = ["Qwen2VLAdapter", "Qwen2_5_VLAdapter", "Qwen3VLAdapter"]

logger = logging.getLogger("lightkv")


class _QwenVLAdapter(Adapter):
    """Shared by the three Qwen-VL generations (same entry module, token ids and grids)."""

    @classmethod
    def image_grid(cls, config, max_pixels: int | None = None) -> tuple[int, int] | None:
        """The grid follows the image: a square image of ``max_pixels`` pixels is cut into patches of
        ``patch_size`` px, merged ``spatial_merge_size`` x ``spatial_merge_size`` into one token; None without
        ``max_pixels``."""
        vision = getattr(config, "vision_config", None)
        patch, merge = getattr(vision, "patch_size", None), getattr(vision, "spatial_merge_size", None)
        if not (max_pixels and isinstance(patch, int) and isinstance(merge, int)):
            return None
        side = math.isqrt(int(max_pixels)) // (patch * merge)
        return (side, side) if side > 0 else None

    @property
    def language_model(self) -> nn.Module:
        return self.entry_module.language_model

    def vision_tower(self) -> nn.Module | None:
        return getattr(self.entry_module, "visual", None)

    def has_cls_token(self) -> bool:
        return False  # patch embeddings and a patch merger, no class token

    def rotary_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of (B, M) text-style position ids: the same position on the three M-RoPE axes (older 5.x
        rotary modules take only (3, B, M))."""
        if position_ids.dim() == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        return self.language_model.rotary_emb(hidden, position_ids=position_ids)

    def decode_position_ids(self, start: int, length: int, batch: int, device: torch.device) -> torch.Tensor:
        """(3, B, length) M-RoPE positions of new text tokens at original sequence index ``start``: the index
        plus the ``rope_deltas`` the model cached at prefill (what the model itself computes at decode)."""
        positions = torch.arange(start, start + length, device=device).view(1, 1, -1).expand(3, batch, -1)
        deltas = getattr(self.entry_module, "rope_deltas", None)
        if deltas is None:
            return positions
        deltas = deltas.to(device).repeat_interleave(batch // deltas.shape[0], dim=0)  # (B, 1)
        return positions + deltas[None]

    def _token_masks(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                     call_kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) bool masks of the image and the video tokens."""
        config = self.model.config
        if input_ids is not None:
            return input_ids == config.image_token_id, input_ids == config.video_token_id
        types = call_kwargs.get("mm_token_type_ids")
        if types is not None:
            return types == 1, types == 2
        return (self.token_mask(None, inputs_embeds, config.image_token_id),
                self.token_mask(None, inputs_embeds, config.video_token_id))

    def vision_layout(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                      call_kwargs: dict) -> VisionLayout | None:
        """One device -> host read (token counts per row, and the grids when the call gives them); a second one
        when ``generate`` passes 3-D positions instead of grids (the grids read back from the positions)."""
        masks = dict(zip(("image", "video"), self._token_masks(input_ids, inputs_embeds, call_kwargs)))
        merge = self.model.config.vision_config.spatial_merge_size
        B, N = masks["image"].shape
        device = masks["image"].device
        positions = call_kwargs.get("position_ids")
        if not (isinstance(positions, torch.Tensor) and positions.dim() == 3 and positions.shape[0] in (3, 4)):
            positions = None  # no 3-D M-RoPE positions in the call (the model computes them itself)
        given = {name: call_kwargs.get(f"{name}_grid_thw") for name in masks}
        given = {name: None if thw is None else thw.to(device) for name, thw in given.items()}
        runs = {name: _run_starts(tokens) for name, tokens in masks.items()
                if given[name] is None and positions is not None}
        # read 1: tokens per row of each modality, the number of runs where the grids come from positions, and
        # the grids the call gives
        reads = read_ints(*(tokens.sum(1) for tokens in masks.values()), *(r.sum() for r in runs.values()),
                          *(thw for thw in given.values() if thw is not None))
        row_counts = dict(zip(masks, reads[:2]))
        num_runs = dict(zip(runs, (r[0] for r in reads[2:2 + len(runs)])))
        host_thw = dict(zip([name for name in masks if given[name] is not None], reads[2 + len(runs):]))
        present = [name for name in masks if sum(row_counts[name])]
        if not present:
            return None
        if positions is None and input_ids is not None and call_kwargs.get("mm_token_type_ids") is None:
            logger.warning("lightkv: a prompt with images but no mm_token_type_ids: %s computes 3-D M-RoPE "
                           "positions only with them (Qwen2.5-VL silently uses 1-D positions, Qwen2-VL / "
                           "Qwen3-VL raise); pass the processor's output unchanged", type(self.model).__name__)
        grids, units = {}, {}
        for name in present:
            if given[name] is not None:
                grids[name], units[name] = given[name], merge
            elif positions is not None:
                # ``generate`` encodes the images before the prefill and passes the features and the 3-D
                # positions it computed from the grids, not the grids: read the grids back from the positions
                grids[name], units[name] = _grids_from_positions(masks[name], runs[name], num_runs[name],
                                                                 positions[-3:]), 1
            else:
                pixels = "pixel_values" if name == "image" else "pixel_values_videos"
                if call_kwargs.get(pixels) is None and (call_kwargs.get("mm_encoder_outputs") or {}).get(name) is None:
                    continue  # no features come with these ids (e.g. a generated placeholder id): plain text
                raise ValueError(f"lightkv: the prompt holds {name} tokens but neither {name}_grid_thw nor 3-D "
                                 "position_ids were given; pass the processor's output unchanged")
        from_positions = [name for name in grids if name not in host_thw]
        if from_positions:  # read 2: the grids read back from the positions (a bad grid has a zero row)
            host_thw.update(zip(from_positions, read_ints(*(grids[name] for name in from_positions))))
            for name in from_positions:
                if 0 in host_thw[name]:
                    raise ValueError(f"lightkv: the 3-D position_ids of a run of {name} tokens do not describe a "
                                     f"whole grid; pass {name}_grid_thw")
        image_index = torch.full((B, N), -1, dtype=torch.long, device=device)
        rows = torch.zeros(B, N, dtype=torch.long, device=device)
        cols = torch.zeros(B, N, dtype=torch.long, device=device)
        slices, first = [], 0
        for name in grids:
            tokens = masks[name]
            slice_hw, slice_index, slice_rows, slice_cols = _slices(tokens, grids[name], host_thw[name],
                                                                    row_counts[name], units[name], name)
            image_index = torch.where(tokens, slice_index + first, image_index)
            rows = torch.where(tokens, slice_rows, rows)
            cols = torch.where(tokens, slice_cols, cols)
            slices.append(slice_hw)
            first += slice_hw.shape[0]
        if not slices:
            return None
        return VisionLayout(image_index >= 0, image_index, rows, cols, torch.cat(slices))


def _slices(tokens: torch.Tensor, grid_thw: torch.Tensor, host_thw: list[int], row_counts: list[int], merge: int,
            name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token grids of one modality: each temporal slice of each image / video is one grid (no host read).

    tokens: (B, N) bool, this modality's tokens, filled with the features of ``grid_thw`` (K, 3) in order
    (row-major over the batch, as transformers scatters them); host_thw: the same grids read back, flat;
    row_counts: tokens of each row. Returns grid_hw (S, 2) of the S slices and, per token, (B, N) long: slice
    index, row and column in its slice (meaningless off ``tokens``).
    """
    thw = [host_thw[i:i + 3] for i in range(0, len(host_thw), 3)]
    item_ends, end = [], 0
    for t_, h_, w_ in thw:
        end += t_ * (h_ // merge) * (w_ // merge)
        item_ends.append(end)
    total = sum(row_counts)
    if total != end:
        raise ValueError(f"lightkv: the prompt holds {total} {name} tokens, {name}_grid_thw describes "
                         f"{end} (t * h/{merge} * w/{merge} per {name})")
    row_ends, end = set(), 0
    for count in row_counts:
        end += count
        if count:
            row_ends.add(end)
    if not row_ends <= set(item_ends):
        raise ValueError(f"lightkv: a batch row holds part of a {name}: every row must hold whole {name}s, in "
                         f"the order of {name}_grid_thw")
    t, h, w = grid_thw[:, 0], grid_thw[:, 1] // merge, grid_thw[:, 2] // merge
    slice_hw = torch.stack([h, w], dim=1).repeat_interleave(t, dim=0, output_size=sum(row[0] for row in thw))
    per_slice = slice_hw[:, 0] * slice_hw[:, 1]
    slice_ends = torch.cumsum(per_slice, 0)
    k = (torch.cumsum(tokens.reshape(-1).long(), 0) - 1).view_as(tokens).clamp(min=0)  # k-th token in the batch
    slice_index = torch.searchsorted(slice_ends, k, right=True).clamp(max=per_slice.shape[0] - 1)
    local = k - (slice_ends - per_slice)[slice_index]
    width = slice_hw[slice_index, 1]
    return slice_hw, slice_index, torch.div(local, width, rounding_mode="floor"), local % width


def _run_starts(tokens: torch.Tensor) -> torch.Tensor:
    """(B * N,) bool, the first token of each run of consecutive ``tokens`` (B, N) (a run never spans rows)."""
    B, N = tokens.shape
    previous = torch.nn.functional.pad(tokens[:, :-1], (1, 0), value=False)
    return (tokens & ~previous).reshape(-1)


def _grids_from_positions(tokens: torch.Tensor, starts: torch.Tensor, K: int, positions: torch.Tensor
                          ) -> torch.Tensor:
    """(K, 3) grids (slices, rows, cols), in tokens, of the K runs of consecutive ``tokens`` (B, N) (first tokens
    ``starts``, ``_run_starts``), in batch order, read from their 3-D M-RoPE ``positions`` (3, B, N): a run's row /
    column positions are its start plus the row / column index (Qwen's ``get_rope_index``), and each run is one
    image, video or video frame. No host read: a run whose length is not a whole grid gets a row of zeros."""
    flat = tokens.reshape(-1)
    run = torch.where(flat, torch.cumsum(starts.long(), 0) - 1, K)  # run of each token, in batch order; K: none
    out = []
    for axis in (1, 2):
        coord = positions[axis].reshape(-1).long()
        low = torch.full((K + 1,), torch.iinfo(torch.long).max, device=tokens.device).scatter_reduce(
            0, run, coord, "amin")
        high = torch.full((K + 1,), torch.iinfo(torch.long).min, device=tokens.device).scatter_reduce(
            0, run, coord, "amax")
        out.append((high - low + 1)[:K])
    rows, cols = out
    lengths = torch.zeros(K + 1, dtype=torch.long, device=tokens.device).index_add_(0, run, flat.long())[:K]
    whole = lengths % (rows * cols) == 0
    grids = torch.stack([lengths // (rows * cols), rows, cols], dim=1)
    return torch.where(whole[:, None], grids, 0)


class Qwen2VLAdapter(_QwenVLAdapter):
    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2VLModel")
    model_types = ("qwen2_vl",)


class Qwen2_5_VLAdapter(_QwenVLAdapter):
    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")
    model_types = ("qwen2_5_vl",)


class Qwen3VLAdapter(_QwenVLAdapter):
    family = "qwen3_vl"
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLModel")
    model_types = ("qwen3_vl",)

    def deepstack_layers(self) -> int:
        """K: decoder layers 0..K-1 get deepstack vision features added to their output."""
        return len(getattr(self.model.config.vision_config, "deepstack_visual_indexes", None) or ())

    def validate_stage_layers(self, stage_layers: tuple[int, ...]) -> None:
        k = self.deepstack_layers()
        early = [layer for layer in stage_layers if layer < k]
        if early:
            raise ValueError(
                f"Qwen3-VL adds deepstack vision features to the full-length output of decoder layers 0..{k - 1} "
                f"(through a mask of every image token), so no stage may shorten the sequence before that: stage "
                f"layers must be >= {k}, got {list(stage_layers)}")
