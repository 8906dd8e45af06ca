"""Model specs for the benchmark: real-size architectures built from configs (random weights, no downloads).

A spec knows its configuration (pure arithmetic for the analytic numbers: no weights are built) and how to
build a model at full depth or with fewer decoder layers (``num_layers``) for machines that cannot hold the
whole model. Real sizes are those of shared/MODELS.md.

    spec = get_spec("llava-1.5-7b")
    dims = spec.dims()                        # TextDims / VisionDims for FLOPs and KV bytes
    model = spec.build(num_layers=8, dtype=torch.bfloat16)   # random weights, 8 of 32 decoder layers
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..methods._common import scale_layers

__all__ = ["TextDims", "VisionDims", "ModelSpec", "SPECS", "get_spec", "scale_layers", "scaled_schedule",
           "config_grid", "dims_from_config"]


@dataclass(frozen=True)
class TextDims:
    """Shapes of a Llama-style decoder (gated MLP, grouped-query attention)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    def with_layers(self, layers: int) -> "TextDims":
        return replace(self, layers=layers)


@dataclass(frozen=True)
class VisionDims:
    """Shapes of a ViT vision tower and the projector into the decoder.

    tokens: sequence length inside the tower per image (patches + CLS). cls_token: the tower prepends one
    (not a patch: no patch-embedding cost). patches: tokens handed to the decoder
    per image. gated_mlp: SwiGLU-style MLP (3 matrices) instead of fc1/fc2. projector: list of (in, out)
    matmul shapes applied to ``projector_tokens`` tokens per image. attention_window: tokens per attention
    window in windowed layers (None: every layer is global); full_attention_layers: how many layers are global.
    """

    hidden: int
    intermediate: int
    layers: int
    heads: int
    patch: int
    channels: int
    tokens: int
    patches: int
    cls_token: bool = False
    gated_mlp: bool = False
    patch_depth: int = 1  # temporal patch size (Qwen's Conv3d)
    projector: tuple[tuple[int, int], ...] = ()
    projector_tokens: int = 0
    attention_window: int | None = None
    full_attention_layers: int = 0


def scaled_schedule(spec: "ModelSpec", depth: int | None = None) -> dict:
    """The spec's reference LightKV schedule at ``depth`` decoder layers: dict(layers, windows, ratios)."""
    depth = depth or spec.num_layers
    layers = scale_layers(spec.reference_layers, spec.reference_depth, depth)
    if not layers:
        raise ValueError(f"a {depth}-layer decoder is too shallow for the schedule {spec.reference_layers}")
    n = len(layers)
    return {"layers": list(layers), "windows": list(spec.reference_windows[:n]),
            "ratios": list(spec.reference_ratios[:n])}


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: configuration, reference schedule, and whether an adapter can run it.

    text / vision: keyword arguments of the text and vision sub-configs; extra: of the top-level config.
    runnable: False for specs only defined for the analytic numbers (no lightkv adapter yet).
    pretrained: a local ``from_pretrained`` folder (the trained bundled model); its config.json gives dims.
    """

    name: str
    family: str
    description: str
    text: dict = field(default_factory=dict)
    vision: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    reference_layers: tuple[int, ...] = (12, 18, 24)
    reference_windows: tuple[int, ...] = (4, 2, 1)
    reference_ratios: tuple[float, ...] = (0.5, 0.5, 0.5)
    reference_depth: int = 32
    runnable: bool = True
    pretrained: str | None = None
    note: str = ""

    # -- configuration (no weights) ----------------------------------------------------------------------------
    def config(self, num_layers: int | None = None) -> Any:
        """The transformers config, optionally with ``num_layers`` decoder layers. Builds no weights."""
        if self.pretrained is not None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(self.pretrained)
        elif self.family == "llava":
            from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

            config = LlavaConfig(vision_config=CLIPVisionConfig(**self.vision), text_config=LlamaConfig(**self.text),
                                 **self.extra)
        elif self.family == "qwen2_5_vl":
            from transformers import Qwen2_5_VLConfig

            config = Qwen2_5_VLConfig(text_config=dict(self.text), vision_config=dict(self.vision), **self.extra)
        elif self.family in ("mistral3", "smolvlm", "internvl", "glm4v"):
            import transformers

            config_cls = {"mistral3": "Mistral3Config", "smolvlm": "SmolVLMConfig", "internvl": "InternVLConfig",
                          "glm4v": "Glm4vConfig"}[self.family]
            config = getattr(transformers, config_cls)(text_config=dict(self.text), vision_config=dict(self.vision),
                                                       **self.extra)
        else:
            raise ValueError(f"unknown model family {self.family!r}")
        if num_layers is not None:
            text = config.text_config if hasattr(config, "text_config") else config
            if not 1 <= num_layers <= text.num_hidden_layers:
                raise ValueError(
                    f"num_layers must lie in 1..{text.num_hidden_layers} for {self.name}, got {num_layers}")
            text.num_hidden_layers = num_layers
            if getattr(text, "layer_types", None) is not None:
                text.layer_types = text.layer_types[:num_layers]
        return config

    @property
    def num_layers(self) -> int:
        return self.dims()[0].layers

    def dims(self, num_layers: int | None = None) -> tuple[TextDims, VisionDims]:
        """Text and vision shapes from the config (pure arithmetic, no weights)."""
        return dims_from_config(self.config(num_layers), self.family)

    def grid(self) -> tuple[int, int]:
        """Token grid of one image as the decoder sees it: the family adapter's ``image_grid`` of the config
        (dynamic-resolution families: of the reference image, QWEN_IMAGE_PX square)."""
        return config_grid(self.config(), QWEN_IMAGE_PX * QWEN_IMAGE_PX)

    def reference_schedule(self, depth: int | None = None) -> dict:
        return scaled_schedule(self, depth)

    # -- building ----------------------------------------------------------------------------------------------
    def build(self, num_layers: int | None = None, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu", attn_implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
        """The model with random weights (or the pretrained folder's weights), in eval mode."""
        if not self.runnable:
            raise ValueError(f"{self.name}: {self.note or 'no lightkv adapter for this family yet'}; "
                             "its analytic numbers are available without building it")
        if self.pretrained is not None:
            from transformers import AutoModelForImageTextToText

            model = AutoModelForImageTextToText.from_pretrained(self.pretrained, dtype=dtype,
                                                                attn_implementation=attn_implementation)
            if num_layers is not None and num_layers < len(model.model.language_model.layers):
                model.model.language_model.layers = model.model.language_model.layers[:num_layers]
                model.config.text_config.num_hidden_layers = num_layers
            return model.to(device).eval()
        from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

        config = self.config(num_layers)
        torch.manual_seed(seed)
        with torch.device(device):
            if self.family == "llava":
                model = LlavaForConditionalGeneration._from_config(config, dtype=dtype,
                                                                   attn_implementation=attn_implementation)
            else:
                model = AutoModelForImageTextToText.from_config(config, dtype=dtype,
                                                                attn_implementation=attn_implementation)
        return model.eval()


def config_grid(config: Any, max_pixels: int | None = None) -> tuple[int, int]:
    """The adapter's ``image_grid`` for ``config``; ValueError when no adapter knows the family or the grid."""
    from ..adapters import SUPPORTED_FAMILIES, adapter_class_for_config

    adapter_cls = adapter_class_for_config(config)
    if adapter_cls is None:
        raise ValueError(f"no lightkv adapter for model_type {getattr(config, 'model_type', None)!r}; supported "
                         f"families: {', '.join(SUPPORTED_FAMILIES)}")
    grid = adapter_cls.image_grid(config, max_pixels)
    if grid is None:
        raise ValueError(f"the {adapter_cls.family} adapter cannot tell the image token grid from this config"
                         + ("" if max_pixels else " without max_pixels"))
    return grid


def dims_from_config(config: Any, family: str, image_px: int | None = None) -> tuple[TextDims, VisionDims]:
    """TextDims/VisionDims of a LLaVA or Qwen2.5-VL config (Qwen: for a square image of ``image_px`` pixels,
    by default the reference image QWEN_IMAGE_PX)."""
    text = config.text_config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    tdims = TextDims(hidden=text.hidden_size, intermediate=text.intermediate_size, layers=text.num_hidden_layers,
                     heads=heads, kv_heads=text.num_key_value_heads or heads, head_dim=head_dim,
                     vocab=text.vocab_size)
    v = config.vision_config
    if family == "qwen2_5_vl":
        merge = v.spatial_merge_size
        side = (image_px or QWEN_IMAGE_PX) // v.patch_size  # patches per side of the image
        merged_in = v.hidden_size * merge * merge
        window_tokens = (v.window_size // v.patch_size) ** 2
        vdims = VisionDims(hidden=v.hidden_size, intermediate=v.intermediate_size, layers=v.depth,
                           heads=v.num_heads, patch=v.patch_size, channels=v.in_channels, tokens=side * side,
                           patches=side * side // (merge * merge), gated_mlp=True,
                           patch_depth=v.temporal_patch_size,
                           projector=((merged_in, merged_in), (merged_in, v.out_hidden_size)),
                           projector_tokens=side * side // (merge * merge), attention_window=window_tokens,
                           full_attention_layers=len(v.fullatt_block_indexes))
        return tdims, vdims
    if family == "mistral3":
        # Pixtral tower on the whole image (no CLS, SwiGLU MLP), then the 2x2 patch merger and a 2-layer projector;
        # the decoder also reads one [IMG_BREAK] / [IMG_END] text token per row, not counted here
        merge = config.spatial_merge_size
        side = min(image_px or QWEN_IMAGE_PX, v.image_size) // v.patch_size
        tokens = (side // merge * merge) ** 2
        decoder_tokens = tokens // (merge * merge)
        vdims = VisionDims(hidden=v.hidden_size, intermediate=v.intermediate_size, layers=v.num_hidden_layers,
                           heads=v.num_attention_heads, patch=v.patch_size, channels=v.num_channels, tokens=tokens,
                           patches=decoder_tokens, gated_mlp=True,
                           projector=((v.hidden_size * merge * merge, v.hidden_size), (v.hidden_size, text.hidden_size),
                                      (text.hidden_size, text.hidden_size)),
                           projector_tokens=decoder_tokens)
        return tdims, vdims
    if family == "smolvlm":
        # SigLIP tower run per tile of image_size px (attention inside a tile: a window of one tile), tiles of a
        # square image of image_px plus the global image; pixel shuffle by scale_factor, one linear projector
        tile = v.image_size // v.patch_size
        per_side = max(1, math.ceil((image_px or QWEN_IMAGE_PX) / v.image_size))
        tiles = per_side * per_side + 1
        scale = config.scale_factor
        decoder_tokens = tiles * (tile // scale) ** 2
        vdims = VisionDims(hidden=v.hidden_size, intermediate=v.intermediate_size, layers=v.num_hidden_layers,
                           heads=v.num_attention_heads, patch=v.patch_size, channels=v.num_channels,
                           tokens=tiles * tile * tile, patches=decoder_tokens,
                           projector=((v.hidden_size * scale * scale, text.hidden_size),),
                           projector_tokens=decoder_tokens, attention_window=tile * tile, full_attention_layers=0)
        return tdims, vdims
    if family == "internvl":
        # InternViT on each 448-px tile (CLS + 32x32 patches), pixel shuffle by downsample_ratio, LayerNorm + 2-layer
        # projector: one analytic "image" is one tile (a 672-px image is 2x2 tiles + a thumbnail: 5 "images")
        side = v.image_size[0] // v.patch_size[0]
        ratio = config.downsample_ratio
        tokens = round(side * ratio) ** 2
        vdims = VisionDims(hidden=v.hidden_size, intermediate=v.intermediate_size, layers=v.num_hidden_layers,
                           heads=v.num_attention_heads, patch=v.patch_size[0], channels=v.num_channels,
                           tokens=side * side + 1, patches=tokens, cls_token=True,
                           projector=((round(v.hidden_size / ratio ** 2), text.hidden_size),
                                      (text.hidden_size, text.hidden_size)),
                           projector_tokens=tokens)
        return tdims, vdims
    if family == "glm4v":
        # Qwen-style tower on the whole image (every layer global, SwiGLU MLP of out_hidden_size), then a 2x2
        # strided conv into out_hidden_size and the gated merger (proj, gate/up to intermediate_size, down)
        merge, out = v.spatial_merge_size, v.out_hidden_size
        side = (image_px or QWEN_IMAGE_PX) // v.patch_size
        merged = side * side // (merge * merge)
        vdims = VisionDims(hidden=v.hidden_size, intermediate=out, layers=v.depth, heads=v.num_heads,
                           patch=v.patch_size, channels=v.in_channels, tokens=side * side, patches=merged,
                           gated_mlp=True, patch_depth=v.temporal_patch_size,
                           projector=((v.hidden_size * merge * merge, out), (out, out), (out, v.intermediate_size),
                                      (out, v.intermediate_size), (v.intermediate_size, out)),
                           projector_tokens=merged)
        return tdims, vdims
    side = v.image_size // v.patch_size
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    patches = side * side + (1 if strategy == "full" else 0)
    layers = config.vision_feature_layer
    n_feature = 1 if isinstance(layers, int) else len(layers)
    vdims = VisionDims(hidden=v.hidden_size, intermediate=v.intermediate_size, layers=v.num_hidden_layers,
                       heads=v.num_attention_heads, patch=v.patch_size, channels=v.num_channels,
                       tokens=side * side + 1, patches=patches, cls_token=True,
                       projector=((v.hidden_size * n_feature, text.hidden_size), (text.hidden_size, text.hidden_size)),
                       projector_tokens=patches)
    return tdims, vdims


# ---------------------------------------------------------------------------------------------------------------
# the specs

QWEN_IMAGE_PX = 672  # reference image for Qwen2.5-VL: 48 x 48 patches, 24 x 24 = 576 decoder tokens
_CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768)
_LLAVA = dict(image_token_index=32000, image_seq_length=576, vision_feature_layer=-2,
              vision_feature_select_strategy="default", projector_hidden_act="gelu", pad_token_id=32001)

SPECS: dict[str, ModelSpec] = {
    "llava-1.5-7b": ModelSpec(
        name="llava-1.5-7b", family="llava",
        description="LLaVA-1.5-7B: Llama-2-7B decoder (32 layers, hidden 4096, MHA) + CLIP ViT-L/14-336, 576 tokens",
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                  pad_token_id=32001),
        vision=dict(_CLIP_L_336), extra=dict(_LLAVA)),
    "llava-1.5-13b": ModelSpec(
        name="llava-1.5-13b", family="llava",
        description="LLaVA-1.5-13B: Llama-2-13B decoder (40 layers, hidden 5120, MHA) + CLIP ViT-L/14-336",
        text=dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                  num_key_value_heads=40, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                  pad_token_id=32001),
        vision=dict(_CLIP_L_336), extra=dict(_LLAVA)),
    "qwen2.5-vl-7b": ModelSpec(
        name="qwen2.5-vl-7b", family="qwen2_5_vl",
        description="Qwen2.5-VL-7B: 28-layer decoder (hidden 3584, GQA 28/4) + 32-layer windowed ViT; "
                    "a 672x672 image gives 576 tokens (24x24 after 2x2 merging)",
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064, rope_theta=1e6, max_position_embeddings=32768,
                  rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                    spatial_merge_size=2, window_size=112, out_hidden_size=3584, temporal_patch_size=2,
                    in_channels=3, fullatt_block_indexes=[7, 15, 23, 31]),
        extra=dict(image_token_id=151655),
        reference_layers=(12, 17, 22), reference_windows=(6, 4, 2), reference_depth=28,
        runnable=False, note="analytic numbers only: lightkv has no Qwen2.5-VL adapter yet"),
    "tiny": ModelSpec(
        name="tiny", family="llava",
        description="tiny random LLaVA (4 layers, hidden 64, GQA 4/2, 16x16 = 256 vision tokens) for tests",
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=4096, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                    patch_size=2, projection_dim=32),
        extra=dict(image_token_index=127, image_seq_length=256, pad_token_id=0),
        reference_layers=(1, 2), reference_windows=(2, 1), reference_ratios=(0.5, 0.5), reference_depth=4),
}

# Mistral3 and SmolVLM2: analytic numbers (and random-weight builds) at real size; the grid is the adapter's for
# the 672-px reference image (Mistral3: 24 x 24 tokens; SmolVLM2: 2 x 2 tiles of 9 x 9 stitched, plus a 9 x 9
# global image that the one-grid analytic tables leave out)
SPECS.update({
    "mistral-small-3.1-24b": ModelSpec(
        name="mistral-small-3.1-24b", family="mistral3",
        description="Mistral-Small-3.1-24B: 40-layer decoder (hidden 5120, GQA 32/8, head_dim 128) + Pixtral ViT "
                    "(24 layers, patch 14, up to 1540 px), 2x2 patch merger; a 672x672 image gives 24x24 tokens",
        text=dict(model_type="mistral", hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=131072,
                  max_position_embeddings=131072, rms_norm_eps=1e-5, sliding_window=None,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e9}),
        vision=dict(model_type="pixtral", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, head_dim=64, image_size=1540, patch_size=14),
        extra=dict(image_token_index=10, spatial_merge_size=2, vision_feature_layer=-1,
                   projector_hidden_act="gelu", multimodal_projector_bias=False, tie_word_embeddings=False),
        reference_depth=32),
    "smolvlm2-2.2b": ModelSpec(
        name="smolvlm2-2.2b", family="smolvlm",
        description="SmolVLM2-2.2B: SmolLM2-1.7B decoder (24 layers, hidden 2048, MHA 32) + SigLIP ViT (27 layers, "
                    "384-px tiles, patch 14), pixel shuffle 3: 81 tokens per tile; a 672x672 image is 2x2 tiles "
                    "(18x18 stitched) + a 9x9 global image",
        text=dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                  num_attention_heads=32, num_key_value_heads=32, vocab_size=49280, max_position_embeddings=8192,
                  rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 130000.0}),
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=384, patch_size=14),
        extra=dict(image_token_id=49190, scale_factor=3),
        reference_depth=32),
})


# InternVL3-8B and GLM-4.1V-9B: analytic numbers (and random-weight builds) at real size
SPECS.update({
    "internvl3-8b": ModelSpec(
        name="internvl3-8b", family="internvl",
        description="InternVL3-8B: Qwen2.5-7B decoder (28 layers, hidden 3584, GQA 28/4) + InternViT-300M "
                    "(24 layers, 448-px tiles, patch 14), pixel shuffle 0.5: 16x16 = 256 tokens per tile; one "
                    "analytic image is one tile (a 672x672 image is 2x2 tiles + a thumbnail)",
        text=dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, vocab_size=151674, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=448, patch_size=14),
        extra=dict(image_token_id=151667, image_seq_length=256, downsample_ratio=0.5, vision_feature_layer=-1,
                   vision_feature_select_strategy="default", tie_word_embeddings=False),
        reference_layers=(12, 17, 22), reference_windows=(4, 2, 1), reference_depth=28),
    "glm-4.1v-9b": ModelSpec(
        name="glm-4.1v-9b", family="glm4v",
        description="GLM-4.1V-9B: GLM-4 decoder (40 layers, hidden 4096, GQA 32/2, partial rotary 0.5) + 24-layer "
                    "ViT (hidden 1536, patch 14), 2x2 merge; a 672x672 image gives 24x24 tokens",
        text=dict(hidden_size=4096, intermediate_size=13696, num_hidden_layers=40, num_attention_heads=32,
                  num_key_value_heads=2, vocab_size=151552, max_position_embeddings=65536, rms_norm_eps=1e-5,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                   "mrope_section": [8, 12, 12]}),
        vision=dict(depth=24, hidden_size=1536, intermediate_size=13696, num_heads=12, image_size=336, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096),
        extra=dict(image_token_id=151343, video_token_id=151344, tie_word_embeddings=False)),
})


def _bundled_model_path() -> str | None:
    from ..bundled import BUNDLED_MODEL

    return str(BUNDLED_MODEL) if BUNDLED_MODEL.exists() else None


def get_spec(name: str) -> ModelSpec:
    """A spec by name; ``trained:PATH`` (or ``trained`` for the bundled model) loads a local checkpoint."""
    if name in SPECS:
        return SPECS[name]
    if name == "trained" or name.startswith("trained:"):
        path = name.partition(":")[2] or _bundled_model_path()
        if not path:
            raise ValueError("no bundled trained model found; pass trained:PATH with a from_pretrained folder")
        if not (Path(path) / "config.json").exists():
            raise ValueError(f"{path} is not a from_pretrained folder (no config.json)")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        family = config.model_type if config.model_type != "qwen2_5_vl" else "qwen2_5_vl"
        if family != "llava":
            raise ValueError(f"trained model at {path} is {config.model_type!r}; only llava is supported")
        depth = config.text_config.num_hidden_layers
        layers = scale_layers((12, 18, 24), 32, depth)
        rows, cols = config_grid(config)
        side = min(rows, cols)
        windows = tuple(w for w in (4, 2, 1) if side * side >= 8 * w * w)[: len(layers)]
        return ModelSpec(name=f"trained:{path}", family="llava", description=f"trained checkpoint at {path}",
                         pretrained=path, reference_layers=layers[: len(windows)], reference_windows=windows,
                         reference_ratios=(0.5,) * len(windows), reference_depth=depth)
    raise ValueError(f"unknown model spec {name!r}; choose one of {sorted(SPECS)} or trained[:PATH]")
