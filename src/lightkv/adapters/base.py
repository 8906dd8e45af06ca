"""What the engine needs to know about a model family, behind one small interface."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["VisionLayout", "Adapter", "is_instance_of", "true_indices", "token_runs", "run_table"]


@dataclass
class VisionLayout:
    """Where the vision tokens of a batch are, at full prefill length.

    vision_mask: (B, N) bool, every image/video token (patches and non-patch tokens such as a CLS).
    image_index: (B, N) long, index of the image a patch belongs to (into ``grid_hw``), -1 elsewhere.
        Only tokens with image_index >= 0 can be merged.
    grid_rows, grid_cols: (B, N) long, original grid coordinate of each patch (0 elsewhere).
    grid_hw: (I, 2) long, rows and columns of each image's token grid.
    """

    vision_mask: torch.Tensor
    image_index: torch.Tensor
    grid_rows: torch.Tensor
    grid_cols: torch.Tensor
    grid_hw: torch.Tensor

    @property
    def num_images(self) -> int:
        return int(self.grid_hw.shape[0])


def true_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """(count,) long: the flat indices of the True entries of ``mask`` (any shape), in order, when ``count`` of
    them are True (a count the caller read back already). What ``torch.nonzero`` gives, without its host read."""
    flat = mask.reshape(-1)
    slot = torch.where(flat, torch.cumsum(flat.long(), 0) - 1, count).clamp(max=count)  # count: a spare slot
    out = torch.zeros(count + 1, dtype=torch.long, device=flat.device)
    return out.scatter_(0, slot, torch.arange(flat.numel(), device=flat.device))[:count]


def token_runs(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs of consecutive ``tokens`` (B, N) bool (a run never spans rows): ``edges`` (B, N + 1) long, +1 at the
    first token of a run, -1 one past its last one, and the number of runs as a 0-d tensor (not read back)."""
    padded = torch.nn.functional.pad(tokens.long(), (1, 1))
    edges = padded[:, 1:] - padded[:, :-1]
    return edges, (edges == 1).sum()


def run_table(edges: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count,) long each, the ``count`` runs of ``token_runs`` in batch row-major order: batch row, first token,
    one past the last token. No host read."""
    width = edges.shape[1]
    starts = true_indices(edges == 1, count)
    ends = true_indices(edges == -1, count)
    return torch.div(starts, width, rounding_mode="floor"), starts % width, ends % width


def is_instance_of(obj: Any, class_names: str | tuple[str, ...]) -> bool:
    """``isinstance`` by class name: whether ``obj``'s class or any of its bases is named in ``class_names``.

    By name, so that an adapter needs no transformers import to describe its classes, and so that a user's
    subclass of a supported class (``class MyLlava(LlavaForConditionalGeneration)``) counts as that class.
    """
    names = (class_names,) if isinstance(class_names, str) else class_names
    return any(klass.__name__ in names for klass in type(obj).__mro__)


class Adapter:
    """Model-family knowledge: where the decoder is, where the image tokens are, how attention is computed.

    Subclasses set ``family``, ``model_classes`` (transformers class names; subclasses of them match too) and
    ``model_types`` (``config.model_type`` values, for code that holds only a config), and implement
    ``entry_module``, ``language_model`` and ``vision_layout`` (and ``image_grid`` when the family's token grid
    follows from its config); the Llama-style defaults below (``self_attn.q_proj``/``k_proj``, the modeling
    module's ``apply_rotary_pos_emb``) suit most decoders. ``lightkv.register_adapter`` makes a subclass
    available to ``lightkv.apply``.
    """

    family: str = ""
    model_classes: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this adapter fits ``model``: an instance of one of ``model_classes`` (or of a subclass)."""
        return is_instance_of(model, cls.model_classes)

    @classmethod
    def matches_config(cls, config: Any) -> bool:
        """Whether this adapter fits models built from ``config`` (by ``config.model_type``)."""
        return getattr(config, "model_type", None) in cls.model_types

    # -- image token grid ------------------------------------------------------------------------------------
    @classmethod
    def image_grid(cls, config: Any, max_pixels: int | None = None) -> tuple[int, int] | None:
        """(rows, cols) token grid of one image as the decoder sees it, from the model's config alone.

        Fixed-resolution families read it from the vision config; families whose grid follows the image size
        give the grid of the largest square image of ``max_pixels`` pixels (None without it). None when the
        config does not tell. What budget matching and the analytic cost model plan for; the layout of an
        actual prompt comes from ``vision_layout``.
        """
        return None

    def default_grid(self, max_pixels: int | None = None) -> tuple[int, int] | None:
        """``image_grid`` of this model's config."""
        return self.image_grid(self.model.config, max_pixels)

    # -- structure -------------------------------------------------------------------------------------------
    @property
    def entry_module(self) -> nn.Module:
        """Module whose forward receives ``input_ids``/``inputs_embeds``, the mask and the cache. Default: the
        ``.model`` of a model of the first of ``model_classes`` (the class with the LM head), else the model."""
        head = bool(self.model_classes) and is_instance_of(self.model, self.model_classes[0])
        return self.model.model if head else self.model

    @property
    def language_model(self) -> nn.Module:
        raise NotImplementedError

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def text_config(self) -> Any:
        return self.language_model.config

    def validate_stage_layers(self, stage_layers: tuple[int, ...]) -> None:
        """Raise ValueError when the model cannot be shortened after these decoder layers (-1: before layer 0)."""

    def decode_position_ids(self, start: int, length: int, batch: int, device: torch.device) -> torch.Tensor:
        """Position ids of ``length`` new tokens at original sequence index ``start`` onwards, as the model
        would compute them at decode steps; used when no layer holds the full prefill (a stage -1)."""
        return torch.arange(start, start + length, device=device)[None]

    def attn_implementation(self) -> str:
        return getattr(self.text_config, "_attn_implementation", None) or "eager"

    def token_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                   token_id: int) -> torch.Tensor:
        """(B, N) bool: where ``token_id`` stands, from the ids or, without them, the test transformers uses:
        the token's own embedding, before image features are scattered in."""
        if input_ids is not None:
            return input_ids == token_id
        embed = self.entry_module.get_input_embeddings()
        token = embed(torch.tensor(token_id, device=inputs_embeds.device)).to(inputs_embeds.dtype)
        return (inputs_embeds == token).all(-1)

    @staticmethod
    def has_features(call_kwargs: dict, name: str = "image", pixels: str = "pixel_values") -> bool:
        """Whether ``name`` features come with the call: pixels, or what ``generate`` encoded before the
        prefill. Without them the model embeds the placeholder ids as text, and so does lightkv."""
        return call_kwargs.get(pixels) is not None or (call_kwargs.get("mm_encoder_outputs") or {}).get(name) is not None

    def vision_layout(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                      call_kwargs: dict) -> VisionLayout | None:
        """Locate the vision tokens of a prefill call; None when the prompt has none."""
        raise NotImplementedError

    # -- vision encoder (for methods that act before the decoder, e.g. VisionZip) ---------------------------
    def vision_tower(self) -> nn.Module | None:
        """The vision encoder whose features become the image tokens; None when the adapter cannot give it."""
        return None

    def vision_feature_layer(self) -> int | list[int] | None:
        """Index into the vision encoder's hidden states (0 = embeddings, -1 = last layer) of the features."""
        return None

    def vision_encoder_layers(self) -> nn.ModuleList | None:
        """The vision encoder's transformer layers (CLIP / SigLIP layout: ``encoder.layers``), or None."""
        tower = self.vision_tower()
        for owner in (tower, getattr(tower, "vision_model", None)):
            layers = getattr(getattr(owner, "encoder", None), "layers", None)
            if isinstance(layers, nn.ModuleList):
                return layers
        return None

    def has_cls_token(self) -> bool:
        """Whether the vision encoder prepends a CLS token to the patches (CLIP does, SigLIP does not)."""
        tower = self.vision_tower()
        for owner in (tower, getattr(tower, "vision_model", None)):
            embeddings = getattr(owner, "embeddings", None)
            if getattr(embeddings, "class_embedding", None) is not None:
                return True
        return False

    def vision_feature_attention(self) -> nn.Module:
        """Self-attention module of the vision encoder layer whose output are the image features.

        Raises ValueError when there is none: no vision encoder known to the adapter, several feature layers,
        or features taken from the patch embeddings (before any attention).
        """
        layers = self.vision_encoder_layers()
        if layers is None:
            raise ValueError(f"lightkv: the {self.family or type(self.model).__name__} adapter cannot locate the "
                             "vision encoder's layers")
        feature_layer = self.vision_feature_layer()
        if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
            raise ValueError(f"lightkv: needs a single vision feature layer, the model uses {feature_layer!r}")
        n = len(layers)
        if not -(n + 1) <= feature_layer <= n:
            raise ValueError(f"lightkv: vision feature layer {feature_layer} is out of range for a vision encoder "
                             f"of {n} layers")
        hidden_index = feature_layer % (n + 1)  # hidden_states[0] are the embeddings, [i] the output of layer i-1
        if hidden_index == 0:
            raise ValueError("lightkv: the image features are the vision encoder's patch embeddings (feature layer "
                             f"{feature_layer}), which no attention layer produced")
        return layers[hidden_index - 1].self_attn

    # -- attention pieces for guidance ----------------------------------------------------------------------
    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def query_projection(self, layer: nn.Module) -> nn.Module:
        return self.attention(layer).q_proj

    def key_projection(self, layer: nn.Module) -> nn.Module:
        return self.attention(layer).k_proj

    def _rotary_fn(self, attn: nn.Module) -> Callable:
        fn = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
        if fn is None:
            raise TypeError(f"lightkv: cannot find apply_rotary_pos_emb next to {type(attn).__name__}")
        return fn

    def queries_keys(self, layer: nn.Module, q_raw: torch.Tensor, k_raw: torch.Tensor,
                     position_embeddings: tuple[torch.Tensor, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Post-RoPE queries (B, H, N, Dh) and keys (B, Hkv, N, Dh) from the q/k projection outputs."""
        attn = self.attention(layer)
        head_dim = attn.head_dim
        B, N, _ = q_raw.shape
        q = q_raw.view(B, N, -1, head_dim).transpose(1, 2)
        k = k_raw.view(B, N, -1, head_dim).transpose(1, 2)
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q)
        if hasattr(attn, "k_norm"):
            k = attn.k_norm(k)
        cos, sin = position_embeddings
        q, k = self._rotary_fn(attn)(q, k, cos, sin)
        scaling = float(getattr(attn, "scaling", head_dim ** -0.5))
        return q, k, scaling

    def rotary_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for arbitrary position ids (used by ``positions="compact"``)."""
        return self.language_model.rotary_emb(hidden, position_ids=position_ids)
