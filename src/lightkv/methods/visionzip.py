"""VisionZip: keep the vision tokens the vision encoder's CLS token attends to most, merge the rest into a few.

Acts before the language model (stage layer -1, on the input embeddings), so every decoder layer sees and
caches the reduced set; prompt-agnostic. Per image:
  1. dominant: the ``dominant`` patches with the highest CLS attention in the vision encoder layer whose output
     are the image features (LLaVA: ``vision_feature_layer``, usually -2), i.e. softmax(q_cls . k / sqrt(d))
     over all keys of that layer, read at the patch keys and averaged over heads. The queries/keys come from
     hooks on that layer's q/k projections, so the encoder keeps running with sdpa. ``generate`` runs the
     encoder before the prefill and hands its output to the model (``mm_encoder_outputs``): the CLS attention
     of every encoder output made while the method is applied is remembered by identity for that case.
  2. contextual: ``contextual`` targets picked evenly among the remaining patches (every
     ``max(1, R // contextual)``-th in raster order, R remaining); every other remaining patch joins its most
     similar target (cosine on the decoder input embeddings, fp32) and each target becomes the plain average
     of its group. The targets stay in their own slots (sequence order and original positions are kept);
     with ``contextual=0`` the remaining patches are dropped.
The encoder must have a CLS token (CLIP); ``apply`` raises ValueError when the model's has none.
"""

from __future__ import annotations

import contextvars
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ._budget import BudgetMatch
from ._common import check_int, merge_into_nearest, rank_in_groups, set_field
from .base import Method, StageContext, StageResult
from .registry import register_method

if TYPE_CHECKING:
    from ..engine import Handle

__all__ = ["VisionZip", "cls_attention", "VISIONZIP_SETTINGS"]

# published (dominant, contextual) per total token count on LLaVA-1.5 (576 tokens per image)
VISIONZIP_SETTINGS = {64: (54, 10), 128: (108, 20), 192: (162, 30)}

_SCORES = "visionzip_cls_attention"


def cls_attention(cls_query: torch.Tensor, keys: torch.Tensor, num_heads: int, scaling: float) -> torch.Tensor:
    """Attention of the CLS query over the patch keys, averaged over heads.

    cls_query: (I, D) query projection of the CLS token (position 0) of each image; keys: (I, 1 + P, D) key
    projections of the same encoder layer. Softmax over all 1 + P keys, in fp32. Returns (I, P).
    """
    I, T, D = keys.shape
    q = cls_query.float().view(I, num_heads, 1, D // num_heads)
    k = keys.float().view(I, T, num_heads, D // num_heads).transpose(1, 2)  # (I, H, T, Dh)
    probs = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * scaling, dim=-1)  # (I, H, 1, T)
    return probs[:, :, 0, 1:].mean(dim=1)


@dataclass(frozen=True)
class VisionZip(Method):
    """VisionZip (Yang et al., CVPR 2025): ``dominant`` + ``contextual`` vision tokens per image, before the LLM.

    dominant: patches kept for their CLS attention (>= 0). contextual: merged tokens made from the other
    patches (>= 0). dominant + contextual >= 1. Published settings for 64 / 128 / 192 tokens (LLaVA-1.5):
    54+10, 108+20, 162+30 (``VisionZip.published(n)``); the default is the 192-token one. An image with at
    most ``dominant`` patches is left whole; one with fewer than ``contextual`` remaining patches keeps them.
    """

    dominant: int = 162
    contextual: int = 30

    def __post_init__(self) -> None:
        super().__post_init__()
        set_field(self, "dominant", check_int("dominant", self.dominant, 0))
        set_field(self, "contextual", check_int("contextual", self.contextual, 0))
        if self.dominant + self.contextual < 1:
            raise ValueError("VisionZip needs dominant + contextual >= 1 tokens per image, got "
                             f"{self.dominant} + {self.contextual}")

    @classmethod
    def published(cls, tokens: int, **kwargs: Any) -> "VisionZip":
        """The published setting that keeps ``tokens`` (64, 128 or 192) tokens per image."""
        if tokens not in VISIONZIP_SETTINGS:
            raise ValueError(f"published VisionZip settings exist for {sorted(VISIONZIP_SETTINGS)} tokens, "
                             f"got {tokens}")
        dominant, contextual = VISIONZIP_SETTINGS[tokens]
        return cls(dominant=dominant, contextual=contextual, **kwargs)

    def kept_after_each_stage(self, grids: tuple[tuple[int, int], ...]) -> list[int]:
        """Tokens of the sample after the one stage (before the decoder): each image keeps at most
        dominant + contextual of its patches."""
        return [sum(self._kept_of_image(h * w) for h, w in grids)]

    def _kept_of_image(self, n: int) -> int:
        if n <= self.dominant:
            return n
        return self.dominant + min(self.contextual, n - self.dominant)

    @property
    def stage_layers(self) -> tuple[int, ...]:
        return (-1,)

    def install(self, handle: "Handle") -> list[Any]:
        adapter = handle.adapter
        tower = adapter.vision_tower()
        if tower is None:
            raise ValueError(f"VisionZip needs the model's vision encoder, which the {adapter.family} adapter "
                             "cannot provide")
        if not adapter.has_cls_token():
            raise ValueError(f"VisionZip needs a vision encoder with a CLS token (e.g. CLIP); this model's "
                             f"{type(tower).__name__} has none, so there is no CLS attention to rank the patches by")
        attn = adapter.vision_feature_attention()  # ValueError when the features come from no attention layer
        heads = int(attn.num_heads)
        scaling = float(getattr(attn, "scale", getattr(attn, "scaling", attn.head_dim ** -0.5)))
        # q/k of the encoder run in progress (per thread / context), and the CLS attention of every encoder
        # output still alive, by identity: ``generate`` runs the encoder before the prefill and hands its output
        # to the model as ``mm_encoder_outputs`` (at every step when uncached)
        current: contextvars.ContextVar = contextvars.ContextVar(f"visionzip_{id(handle)}", default=None)
        scores_of_output: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

        def tower_pre(module: torch.nn.Module, args: tuple) -> None:
            current.set({})

        def keep_query(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            run = current.get()
            if run is not None:
                run["q"] = output[:, 0]  # only the CLS row is needed

        def keep_keys(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            run = current.get()
            if run is not None:
                run["k"] = output

        def tower_post(module: torch.nn.Module, args: tuple, output: Any) -> None:
            run = current.get()
            current.set(None)
            if run is None or "q" not in run or "k" not in run:
                return
            scores = cls_attention(run["q"], run["k"], heads, scaling)
            state = handle.prefill_state()
            if state is not None:  # the encoder ran inside the model's forward
                state.method_state[_SCORES] = scores
            key = id(output)
            scores_of_output[key] = (weakref.ref(output), scores)
            weakref.finalize(output, scores_of_output.pop, key, None)

        def entry_pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            state = handle.prefill_state()
            encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
            if state is None or encoded is None:
                return
            ref, scores = scores_of_output.get(id(encoded), (None, None))
            if ref is not None and ref() is encoded:
                state.method_state[_SCORES] = scores

        return [
            handle.adapter.entry_module.register_forward_pre_hook(entry_pre, with_kwargs=True),
            tower.register_forward_pre_hook(tower_pre),
            attn.q_proj.register_forward_hook(keep_query),
            attn.k_proj.register_forward_hook(keep_keys),
            tower.register_forward_hook(tower_post),
        ]

    def reduce(self, ctx: StageContext, stage: int) -> StageResult:
        hidden = ctx.hidden
        B, M, D = hidden.shape
        device = hidden.device
        patches = ctx.image_index >= 0  # (B, M)
        destination = torch.arange(M, device=device).expand(B, M).clone()
        if not bool(patches.any()):
            return StageResult(torch.ones_like(patches), hidden, destination)
        scores = ctx.method_state.get(_SCORES)  # (I, P)
        if scores is None:
            raise RuntimeError("VisionZip: no CLS attention for these images: the vision encoder ran before "
                               "lightkv.apply or outside the model (pass pixel_values, or image features the "
                               "patched model computed itself)")
        num_images = int(ctx.grid_hw.shape[0])
        grid_tokens = int(ctx.grid_hw.prod(dim=1).max())
        if scores.shape[0] != num_images or scores.shape[1] < grid_tokens:
            raise ValueError(f"VisionZip: the vision encoder saw {scores.shape[0]} images of {scores.shape[1]} "
                             f"patches, the prompt holds {num_images} images of up to {grid_tokens} tokens")

        image = ctx.image_index.clamp(min=0)
        patch = ctx.grid_rows * ctx.grid_hw[image, 1] + ctx.grid_cols  # raster index = encoder patch order
        token_score = scores[image, patch]
        dominant = patches & (rank_in_groups(ctx.image_index, -token_score) < self.dominant)
        remaining = patches & ~dominant

        # contextual targets: every step-th remaining patch of an image, in sequence (= raster) order
        n_remaining = torch.bincount(ctx.image_index[remaining], minlength=num_images)  # (I,)
        step = torch.div(n_remaining, max(self.contextual, 1), rounding_mode="floor").clamp(min=1)[image]
        inner = rank_in_groups(torch.where(remaining, ctx.image_index, -1), torch.zeros_like(token_score))
        targets = remaining & (inner % step == 0) & (torch.div(inner, step, rounding_mode="floor") < self.contextual)
        merged = remaining & ~targets
        keep = ~patches | dominant | targets

        if self.contextual > 0:  # contextual = 0: the other patches are just dropped
            # each target becomes the plain average of itself and the patches assigned to it
            hidden = merge_into_nearest(hidden, ctx.image_index, targets, merged, destination)
        return StageResult(keep, hidden, destination)



def _visionzip_matcher(target: float, num_layers: int, grids: tuple[tuple[int, int], ...], **fields: Any
                       ) -> Any:
    """Every layer sees the same round(target * tokens) tokens per image (tokens of the sample's largest
    image), split between dominant and contextual in the published 54:10 proportion."""
    tokens = max(h * w for h, w in grids)
    total = min(tokens, max(1, round(target * tokens)))
    contextual = round(total * 10 / 64)
    method = VisionZip(dominant=total - contextual, contextual=contextual, **fields)
    kept = method.kept_per_layer(num_layers, grids)
    # layer 0 already sees the reduced set, so the reference is the prompt's tokens
    return BudgetMatch(method, sum(kept) / (num_layers * sum(h * w for h, w in grids)), kept, target)


register_method("visionzip", VisionZip, matcher=_visionzip_matcher)
