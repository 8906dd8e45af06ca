"""Mistral3 (``Mistral3ForConditionalGeneration`` / ``Mistral3Model``: Mistral-Small-3.1/3.2, Ministral-3) and
Pixtral-12B (``LlavaForConditionalGeneration`` / ``LlavaModel`` with a Pixtral vision tower).

Token layout (the Pixtral processor): an image of h x w pixels becomes R = h / u rows of C = w / u ``[IMG]``
tokens (u = patch size x ``spatial_merge_size``; Pixtral-12B merges nothing), an ``[IMG_BREAK]`` after every
row but the last and an ``[IMG_END]`` after the last; any aspect ratio. The image features fill the ``[IMG]``
tokens in raster order. Break and end tokens are ordinary text embeddings: they are never merged and count as
prompt, so each image is one R x C grid of ``[IMG]`` tokens.

Rows and columns come from the runs of ``[IMG]`` tokens in the prompt (``generate`` drops ``image_sizes`` from
the prefill call), so the adapter must tell a break from an end after a run. Their ids live in the tokenizer,
not the config: the adapter takes them as ``image_break_token_id`` / ``image_end_token_id`` (constructor
arguments, else the same attributes on ``model.config``; set them from the processor to pin them:
``model.config.image_end_token_id = processor.image_end_token_id``). Unset, they are detected per call: the
token after the last ``[IMG]`` run of every prompt is ``[IMG_END]`` (the processor always closes an image with
it), and every other run must be followed by one same other token, ``[IMG_BREAK]``, with the next row of the
image right after it. A prompt that breaks these rules (rows of different lengths, a row not followed by
break or end, ids that disagree) raises ValueError; so does one whose grids disagree with ``image_sizes`` when
the call carries them.

Ministral-3 text models (``llama_4_scaling_beta`` in the text config's ``rope_parameters``) multiply every query
by 1 + beta * log(1 + floor(position / original_max_position_embeddings)) after RoPE: ``queries_keys`` applies
the model's own scale at the positions the stage layer received, so guidance scores use the model's queries.

Mistral text configs may set ``sliding_window`` (``MistralConfig`` defaults to 4096; released checkpoints set
null): a sliding-window cache cannot hold shortened layers, so ``apply`` raises ValueError for such a model.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
from torch import nn

from ..core import read_ints
from .base import Adapter, VisionLayout, run_table, token_runs

__all__ = ["Mistral3Adapter", "PixtralLlavaAdapter", "has_pixtral_tower"]


def has_pixtral_tower(config: Any) -> bool:
    """Whether ``config`` (a LLaVA-style config) describes a Pixtral vision tower."""
    return getattr(getattr(config, "vision_config", None), "model_type", None) == "pixtral"


def _optional_id(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"lightkv: {name} must be a non-negative token id or None, got {value!r}")
    return int(value)


class Mistral3Adapter(Adapter):
    family = "mistral3"
    model_classes = ("Mistral3ForConditionalGeneration", "Mistral3Model")
    model_types = ("mistral3",)

    def __init__(self, model: nn.Module, image_break_token_id: int | None = None,
                 image_end_token_id: int | None = None):
        super().__init__(model)
        config = model.config
        if image_break_token_id is None:
            image_break_token_id = getattr(config, "image_break_token_id", None)
        if image_end_token_id is None:
            image_end_token_id = getattr(config, "image_end_token_id", None)
        self.image_break_token_id = _optional_id("image_break_token_id", image_break_token_id)
        self.image_end_token_id = _optional_id("image_end_token_id", image_end_token_id)

    # -- structure -------------------------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        return self.entry_module.language_model

    def vision_tower(self) -> nn.Module | None:
        return getattr(self.entry_module, "vision_tower", None)

    def vision_feature_layer(self) -> int | list[int] | None:
        return self.model.config.vision_feature_layer

    def vision_encoder_layers(self) -> nn.ModuleList | None:
        layers = getattr(getattr(self.vision_tower(), "transformer", None), "layers", None)
        return layers if isinstance(layers, nn.ModuleList) else None

    def has_cls_token(self) -> bool:
        return False  # Pixtral: patch convolution and 2-D RoPE, no class token

    @classmethod
    def merge_size(cls, config: Any) -> int:
        """Patches per side merged into one image token (Mistral3's patch merger; 1 for Pixtral-12B)."""
        return int(getattr(config, "spatial_merge_size", 1) or 1)

    @classmethod
    def image_grid(cls, config: Any, max_pixels: int | None = None) -> tuple[int, int] | None:
        """The grid follows the image: a square image of ``max_pixels`` pixels (the largest one the vision
        config allows, ``image_size`` per side, without it) in tokens of patch size x merge size pixels."""
        vision = getattr(config, "vision_config", None)
        size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
        if not (isinstance(size, int) and isinstance(patch, int)):
            return None
        side = size if not max_pixels else min(size, math.isqrt(int(max_pixels)))
        side //= patch * cls.merge_size(config)
        return (side, side) if side > 0 else None

    def validate_stage_layers(self, stage_layers: tuple[int, ...]) -> None:
        window = getattr(self.text_config, "sliding_window", None)
        if window is not None:
            raise ValueError(f"lightkv: this {type(self.model).__name__}'s text model uses sliding-window attention "
                             f"(sliding_window={window}), whose cache cannot hold shortened layers; released Mistral3 "
                             "/ Pixtral checkpoints set it to null")

    # -- attention pieces for guidance ----------------------------------------------------------------------
    def _llama_4_scaling(self) -> tuple[float, int] | None:
        rope = getattr(self.text_config, "rope_parameters", None) or {}
        beta = rope.get("llama_4_scaling_beta") if isinstance(rope, dict) else None
        if beta is None:
            return None
        return float(beta), int(rope.get("original_max_position_embeddings"))

    def _stage_position_ids(self, length: int, device: torch.device) -> torch.Tensor:
        """(B or 1, length) position ids the stage layer in progress received (as the engine passed them)."""
        handle = getattr(self.model, "_lightkv_handle", None)
        state = handle.prefill_state() if handle is not None else None
        if state is None:
            raise RuntimeError("lightkv: Ministral-3 query scaling needs the position ids of the prefill in progress")
        kwargs = state.segment_kwargs if state.shortened else state.full_kwargs
        positions = kwargs.get("position_ids") if kwargs else None
        if positions is None:
            positions = torch.arange(length, device=device)[None]
        if positions.shape[-1] != length:
            raise RuntimeError(f"lightkv: the stage layer holds {length} tokens, its position ids {positions.shape[-1]}")
        return positions

    def queries_keys(self, layer: nn.Module, q_raw: torch.Tensor, k_raw: torch.Tensor,
                     position_embeddings: tuple[torch.Tensor, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Post-RoPE queries and keys; Ministral-3 queries also carry the model's position-dependent scale."""
        q, k, scaling = super().queries_keys(layer, q_raw, k_raw, position_embeddings)
        llama_4 = self._llama_4_scaling()
        if llama_4 is not None:
            beta, original = llama_4
            attn = self.attention(layer)
            scale_fn = getattr(sys.modules[type(attn).__module__], "get_llama_4_attn_scale", None)
            positions = self._stage_position_ids(q.shape[2], q.device)
            if scale_fn is not None:
                scale = scale_fn(positions, beta, original)
            else:  # the formula of transformers' Ministral3 attention, (B, 1, N, 1)
                scale = (1 + beta * torch.log(1 + torch.floor(positions / original)))[:, None, :, None]
            q = q * scale.to(q.dtype)
        return q, k, scaling

    # -- image tokens ----------------------------------------------------------------------------------------
    def _image_token_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
                          ) -> torch.Tensor:
        image_id = self.model.config.image_token_id
        if input_ids is not None:
            return input_ids == image_id
        return self.token_mask(None, inputs_embeds, image_id)

    def vision_layout(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                      call_kwargs: dict) -> VisionLayout | None:
        """Two device -> host reads, whatever the batch or the number of images: the number of runs of [IMG]
        tokens, then each run's batch row, first token, end and the token after it (or, from embeddings, whether
        that token is [IMG_END] / the break token) with ``image_sizes``; the checks and the grids follow on the
        host from those values."""
        image_tokens = self._image_token_mask(input_ids, inputs_embeds)
        encoded = (call_kwargs.get("mm_encoder_outputs") or {}).get("image")
        if call_kwargs.get("pixel_values") is None and encoded is None:
            return None  # no features come with these ids: the model embeds them as text, so do we
        B, N = image_tokens.shape
        device = image_tokens.device

        # runs of consecutive [IMG] tokens, in batch row-major order (the order features are scattered in)
        edges, num_runs = token_runs(image_tokens)
        (R,), = read_ints(num_runs)  # read 1
        if R == 0:
            return None
        run_row, run_start, run_end = run_table(edges, R)
        after, after_reads = self._after_runs(input_ids, inputs_embeds, run_row, run_end.clamp(max=N - 1))
        sizes = call_kwargs.get("image_sizes")
        sizes = None if sizes is None or call_kwargs.get("pixel_values") is None else torch.as_tensor(sizes)
        values = read_ints(run_row, run_start, run_end, *after_reads,  # read 2
                           *([] if sizes is None else [sizes.to(device)]))
        rows_of, starts, ends = values[:3]
        if any(end >= N for end in ends):
            raise ValueError("lightkv: a prompt ends inside an image: every image must end with [IMG_END] (pass the "
                             "processor's output unchanged)")
        last_in_row = [k == R - 1 or rows_of[k + 1] != rows_of[k] for k in range(R)]
        is_end = self._run_ends_image(after, values[3:3 + len(after_reads)], last_in_row)

        # every run not ending its image is followed by one break token and the next row, of the same length
        lengths = [end - start for start, end in zip(starts, ends)]
        inner = [k for k in range(R) if not is_end[k]]
        if inner:
            if inner[-1] >= R - 1:
                raise ValueError("lightkv: the last image of the batch has no [IMG_END]")
            if any(rows_of[k + 1] != rows_of[k] or starts[k + 1] != ends[k] + 1 or lengths[k + 1] != lengths[k]
                   for k in inner):
                raise ValueError("lightkv: an image's rows of [IMG] tokens are not equally long runs separated by "
                                 "one [IMG_BREAK] each (pass the processor's output unchanged)")
        image_of_run, row_of_run, grids = [], [], []
        for k in range(R):
            if k == 0 or is_end[k - 1]:  # the first row of an image
                grids.append([0, lengths[k]])
            image_of_run.append(len(grids) - 1)
            row_of_run.append(grids[-1][0])
            grids[-1][0] += 1
        if sizes is not None:
            self._check_image_sizes(grids, values[-1])

        image_of_run_t, row_of_run_t = (torch.tensor(v, dtype=torch.long, device=device)
                                        for v in (image_of_run, row_of_run))
        grid_hw = torch.tensor(grids, dtype=torch.long, device=device).view(-1, 2)  # (I, 2)
        run_of_token = (torch.cumsum((edges[:, :N] == 1).reshape(-1).long(), 0) - 1).view(B, N).clamp(min=0)
        position = torch.arange(N, device=device).expand(B, N)
        zeros = torch.zeros(B, N, dtype=torch.long, device=device)
        image_index = torch.where(image_tokens, image_of_run_t[run_of_token], torch.full_like(zeros, -1))
        rows = torch.where(image_tokens, row_of_run_t[run_of_token], zeros)
        cols = torch.where(image_tokens, position - run_start[run_of_token], zeros)
        return VisionLayout(image_tokens, image_index, rows, cols, grid_hw)

    def _after_runs(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                    run_row: torch.Tensor, run_end: torch.Tensor) -> tuple[bool, list[torch.Tensor]]:
        """What the host needs about the token after each run (at ``run_end``, clamped into the prompt): its id,
        or from embeddings (R,) bool each, whether it is [IMG_END] (the token after the last run of its batch
        row when that id is not set) and whether it is the break token (the first token after a run that does
        not end an image when that id is not set). Returns (from ids, the tensors to read). No host read."""
        if input_ids is not None:
            return True, [input_ids[run_row, run_end]]
        after = inputs_embeds[run_row, run_end]  # (R, D)
        R = after.shape[0]
        end_id, break_id = self.image_end_token_id, self.image_break_token_id
        if end_id is None:
            # compare with the token after the last run of the same batch row
            last_in_row = torch.ones_like(run_row, dtype=torch.bool)
            last_in_row[:-1] = run_row[1:] != run_row[:-1]
            index = torch.arange(R, device=after.device)
            last_of_row = torch.where(last_in_row, index, R).flip(0).cummin(0).values.flip(0)
            is_end = (after == after[last_of_row]).all(-1)
        else:
            is_end = self.token_mask(None, after[None], end_id)[0]
        if break_id is None:
            first_break = (~is_end).long().argmax()  # the first run not ending an image (0 when none)
            same = (after == after[first_break]).all(-1)
        else:
            same = self.token_mask(None, after[None], break_id)[0]
        return False, [is_end, same]

    def _run_ends_image(self, from_ids: bool, values: list[list[int]], last_in_row: list[bool]) -> list[bool]:
        """Whether the token after each run is [IMG_END] (else it must be [IMG_BREAK]), from ``_after_runs``'
        values read back."""
        end_id, break_id = self.image_end_token_id, self.image_break_token_id
        R = len(last_in_row)
        if from_ids:
            after = values[0]
            if end_id is None:
                found = sorted({after[k] for k in range(R) if last_in_row[k]})
                if len(found) != 1:
                    raise ValueError(f"lightkv: cannot tell the [IMG_END] id: the last images of the batch rows end "
                                     f"with ids {found}; set model.config.image_end_token_id from the processor")
                end_id = found[0]
            is_end = [token == end_id for token in after]
            breaks = [token for token, end in zip(after, is_end) if not end]
            if break_id is None:
                found = sorted(set(breaks))
                if len(found) > 1:
                    raise ValueError(f"lightkv: rows of [IMG] tokens are followed by ids {found} besides [IMG_END] "
                                     f"{end_id}; only [IMG_BREAK] may follow a row (set model.config."
                                     "image_break_token_id / image_end_token_id from the processor)")
            else:
                wrong = [token for token in breaks if token != break_id]
                if wrong:
                    raise ValueError(f"lightkv: a row of [IMG] tokens is followed by id {wrong[0]}, neither "
                                     f"[IMG_BREAK] {break_id} nor [IMG_END] {end_id}")
            if not all(end for end, last in zip(is_end, last_in_row) if last):
                raise ValueError(f"lightkv: an image does not end with [IMG_END] {end_id}")
            return is_end
        is_end, same = ([bool(v) for v in flags] for flags in values)
        if not all(s for s, end in zip(same, is_end) if not end):
            raise ValueError("lightkv: rows of [IMG] tokens are followed by different tokens besides [IMG_END]; "
                             "only [IMG_BREAK] may follow a row")
        if not all(end for end, last in zip(is_end, last_in_row) if last):
            raise ValueError("lightkv: an image does not end with [IMG_END]")
        return is_end

    def _check_image_sizes(self, grids: list[list[int]], sizes: list[int]) -> None:
        """The grids (rows, cols) against ``image_sizes`` (read back, flat: H, W per image) of the call."""
        sizes = [sizes[i:i + 2] for i in range(0, len(sizes), 2)]
        unit = self.model.config.vision_config.patch_size * self.merge_size(self.model.config)
        expected = [[v // unit for v in size] for size in sizes]
        if expected != grids:
            raise ValueError(f"lightkv: the prompt's [IMG] rows describe grids {grids} (rows, cols), "
                             f"image_sizes {sizes} give {expected} (pixels // {unit})")


class PixtralLlavaAdapter(Mistral3Adapter):
    """Pixtral-12B: a LLaVA model whose vision tower is Pixtral; the Mistral3 token layout without a merge."""

    family = "pixtral"
    model_classes = ("LlavaForConditionalGeneration", "LlavaModel")
    model_types = ("llava",)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return super().matches(model) and has_pixtral_tower(getattr(model, "config", None))

    @classmethod
    def matches_config(cls, config: Any) -> bool:
        return super().matches_config(config) and has_pixtral_tower(config)

    @classmethod
    def merge_size(cls, config: Any) -> int:
        return 1
