"""Tiny random models and prompts built from configs, for tests and examples (no downloads)."""

from __future__ import annotations

import torch

from .adapters import LlavaAdapter

__all__ = ["tiny_llava", "llava_prompt", "batch_prompts", "tiny_qwen2_vl", "tiny_qwen2_5_vl", "tiny_qwen3_vl",
           "qwen_prompt", "tiny_llava_next", "tiny_llava_onevision", "llava_next_prompt"]


def tiny_llava(num_layers: int = 4, grid: int = 16, attn_implementation: str = "sdpa", seed: int = 0,
               hidden_size: int = 64, vocab_size: int = 128):
    """A random ``LlavaForConditionalGeneration``: Llama text model with GQA, CLIP tower giving grid x grid tokens."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    patch = 2
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=grid * patch, patch_size=patch, projection_dim=32)
    text = LlamaConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                       max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab_size - 1,
                         image_seq_length=grid * grid, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    # random init is small; a larger scale makes hidden states (and so merges and logits) more distinct
    with torch.no_grad():
        for p in model.model.language_model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model.eval()


def llava_prompt(model, text_before: list[int], text_after: list[int], num_images: int = 1,
                 seed: int = 0) -> dict:
    """input_ids (1, N) = text_before + image tokens (per image) + text_after, and random pixel values."""
    config = model.config
    rows, cols = LlavaAdapter.image_grid(config)
    per_image = rows * cols
    ids = list(text_before)
    for i in range(num_images):
        ids += [config.image_token_id] * per_image
        if i < num_images - 1:
            ids += [5 + i]
    ids += list(text_after)
    gen = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    out = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    if num_images:
        out["pixel_values"] = torch.randn(num_images, 3, size, size, generator=gen)
    return out


def batch_prompts(prompts: list[dict], pad_token_id: int = 0) -> dict:
    """Left-pad single-sample prompts into one batch. Per-token inputs (input_ids, attention_mask,
    mm_token_type_ids) are left-padded; pixel values and Qwen grids are concatenated in order."""
    length = max(p["input_ids"].shape[1] for p in prompts)
    pad_values = {"input_ids": pad_token_id, "attention_mask": 0, "mm_token_type_ids": 0, "token_type_ids": 0}
    out = {}
    for key, value in pad_values.items():
        if key not in prompts[0]:
            continue
        rows = []
        for p in prompts:
            n = p[key].shape[1]
            rows.append(torch.cat([torch.full((1, length - n), value, dtype=p[key].dtype), p[key]], dim=1))
        out[key] = torch.cat(rows)
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "image_sizes",
                "batch_num_images"):
        parts = [p[key] for p in prompts if key in p]
        if key == "pixel_values" and parts and parts[0].dim() == 5:
            # Idefics3 / SmolVLM: (1, images, C, H, W) per sample; all-zero images pad the shorter samples
            most = max(p.shape[1] for p in parts)
            parts = [torch.cat([p, p.new_zeros(1, most - p.shape[1], *p.shape[2:])], dim=1) for p in parts]
        if parts:
            out[key] = torch.cat(parts)
    return out


# -- Qwen2-VL / Qwen2.5-VL / Qwen3-VL ----------------------------------------------------------------------------

QWEN_IMAGE_TOKEN, QWEN_VIDEO_TOKEN, QWEN_VISION_START, QWEN_VISION_END = 127, 126, 124, 125


def _qwen_text_kwargs(num_layers: int, hidden_size: int, vocab_size: int, mrope_section: list[int]) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section})


def _qwen_ids() -> dict:
    return dict(image_token_id=QWEN_IMAGE_TOKEN, video_token_id=QWEN_VIDEO_TOKEN,
                vision_start_token_id=QWEN_VISION_START, vision_end_token_id=QWEN_VISION_END)


def _finish_tiny(model, attn_implementation: str, placeholders: list[int], norms: tuple[str, ...] = ()):
    """Set the attention implementation, suppress the vision placeholder ids (a random model may emit them; an
    uncached step would then look for their features) and scale the text model's random weights up: see
    tiny_llava, a larger scale makes tokens (and so merges and logits) more distinct. ``norms``: names of 1-D
    norm weights drawn at random too (trained QK-norm scales differ per dimension; uniform ones give every key
    the same norm)."""
    model.set_attn_implementation(attn_implementation)
    model.generation_config.suppress_tokens = list(placeholders)
    with torch.no_grad():
        for name, p in model.model.language_model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
            elif norms and name.endswith(norms):
                p.normal_(0, 0.5)
    return model.eval()


def _finish(model, attn_implementation: str):
    return _finish_tiny(model, attn_implementation, [QWEN_VISION_START, QWEN_VISION_END, QWEN_VIDEO_TOKEN,
                                                     QWEN_IMAGE_TOKEN])


def tiny_qwen2_vl(num_layers: int = 4, attn_implementation: str = "sdpa", seed: int = 0, hidden_size: int = 64,
                  vocab_size: int = 128):
    """A random ``Qwen2VLForConditionalGeneration``: GQA text model with M-RoPE, patch 2, spatial merge 2."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(depth=2, embed_dim=32, hidden_size=hidden_size, mlp_ratio=2, num_heads=2, patch_size=2,
                  spatial_merge_size=2, temporal_patch_size=2)
    text = _qwen_text_kwargs(num_layers, hidden_size, vocab_size, [2, 3, 3])
    config = Qwen2VLConfig(vision_config=vision, text_config=text, **_qwen_ids())
    torch.manual_seed(seed)
    return _finish(Qwen2VLForConditionalGeneration(config), attn_implementation)


def tiny_qwen2_5_vl(num_layers: int = 4, attn_implementation: str = "sdpa", seed: int = 0, hidden_size: int = 64,
                    vocab_size: int = 128, merge_size: int = 2):
    """A random ``Qwen2_5_VLForConditionalGeneration`` (window attention in the vision tower); ``merge_size`` 1
    makes every patch a token (as in the bundled Qwen2.5-VL-architecture model)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2, spatial_merge_size=merge_size,
                  temporal_patch_size=2, window_size=8, out_hidden_size=hidden_size, fullatt_block_indexes=[1],
                  tokens_per_second=2)
    text = _qwen_text_kwargs(num_layers, hidden_size, vocab_size, [2, 3, 3])
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, **_qwen_ids())
    torch.manual_seed(seed)
    return _finish(Qwen2_5_VLForConditionalGeneration(config), attn_implementation)


def tiny_qwen3_vl(num_layers: int = 4, attn_implementation: str = "sdpa", seed: int = 0, hidden_size: int = 64,
                  vocab_size: int = 128, deepstack_layers: int = 1):
    """A random ``Qwen3VLForConditionalGeneration``: q/k norms, interleaved M-RoPE, ``deepstack_layers``
    deepstack feature layers (added after decoder layers 0..deepstack_layers-1)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=hidden_size, num_position_embeddings=64,
                  deepstack_visual_indexes=list(range(deepstack_layers)))
    text = _qwen_text_kwargs(num_layers, hidden_size, vocab_size, [2, 3, 3])
    text.update(head_dim=hidden_size // 4)
    config = Qwen3VLConfig(vision_config=vision, text_config=text, **_qwen_ids())
    torch.manual_seed(seed)
    return _finish(Qwen3VLForConditionalGeneration(config), attn_implementation)


def qwen_prompt(model, text_before: list[int], text_after: list[int], images: list[tuple[int, int]] = ((6, 8),),
                videos: list[tuple[int, int, int]] = (), seed: int = 0) -> dict:
    """Processor-free Qwen-VL inputs (batch 1), as the Qwen processors lay them out.

    images: (rows, cols) of each image's token grid after spatial merging; videos: (frames, rows, cols), frames
    being temporal slices. Each image / video is wrapped in vision start / end tokens, consecutive images are
    separated by one text token; a Qwen3-VL video puts one timestamp token and its own start / end pair before
    every frame. Returns input_ids, attention_mask, mm_token_type_ids (0 text, 1 image, 2 video), and
    pixel_values / image_grid_thw, pixel_values_videos / video_grid_thw (grids in patches) with random pixels.
    """
    config = model.config
    vision = config.vision_config
    merge, patch, temporal = vision.spatial_merge_size, vision.patch_size, vision.temporal_patch_size
    patch_dim = vision.in_channels * temporal * patch * patch
    gen = torch.Generator().manual_seed(seed)
    ids, types = list(text_before), [0] * len(text_before)

    def add(tokens: list[int], kind: int = 0) -> None:
        ids.extend(tokens)
        types.extend([kind] * len(tokens))

    image_grids, video_grids = [], []
    for i, (rows, cols) in enumerate(images):
        if i:
            add([5 + i])
        add([config.vision_start_token_id])
        add([config.image_token_id] * (rows * cols), 1)
        add([config.vision_end_token_id])
        image_grids.append([1, rows * merge, cols * merge])
    per_frame = type(model).__name__.startswith("Qwen3")
    for frames, rows, cols in videos:
        if per_frame:
            for f in range(frames):
                add([30 + f, config.vision_start_token_id])
                add([config.video_token_id] * (rows * cols), 2)
                add([config.vision_end_token_id])
        else:
            add([config.vision_start_token_id])
            add([config.video_token_id] * (frames * rows * cols), 2)
            add([config.vision_end_token_id])
        video_grids.append([frames, rows * merge, cols * merge])
    add(list(text_after))
    out = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
           "mm_token_type_ids": torch.tensor([types])}
    if image_grids:
        grid = torch.tensor(image_grids)
        out["pixel_values"] = torch.randn(int(grid.prod(1).sum()), patch_dim, generator=gen)
        out["image_grid_thw"] = grid
    if video_grids:
        grid = torch.tensor(video_grids)
        out["pixel_values_videos"] = torch.randn(int(grid.prod(1).sum()), patch_dim, generator=gen)
        out["video_grid_thw"] = grid
    return out


# -- InternVL ------------------------------------------------------------------------------------------------------

__all__ += ["tiny_internvl", "internvl_prompt"]

INTERNVL_IMAGE_TOKEN, INTERNVL_IMG_START, INTERNVL_IMG_END = 127, 125, 126


def tiny_internvl(num_layers: int = 4, attn_implementation: str = "sdpa", seed: int = 0, hidden_size: int = 64,
                  vocab_size: int = 128, tile_grid: int = 8):
    """A random ``InternVLForConditionalGeneration``: Qwen2 text model with GQA, an InternViT tower on 32-px
    tiles of 2-px patches, pixel-shuffled into ``tile_grid`` x ``tile_grid`` tokens per tile (4 * tile_grid px)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=4 * tile_grid, patch_size=2)
    text = Qwen2Config(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                       max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=INTERNVL_IMAGE_TOKEN,
                            image_seq_length=tile_grid * tile_grid)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    return _finish_tiny(model, attn_implementation, [INTERNVL_IMG_START, INTERNVL_IMG_END, INTERNVL_IMAGE_TOKEN])


def internvl_prompt(model, text_before: list[int], text_after: list[int], tiles: list[int] = (3,),
                    seed: int = 0) -> dict:
    """Processor-free InternVL inputs (batch 1), as ``InternVLProcessor`` lays them out: per image ``<img>`` +
    (tiles x tile tokens) image tokens + ``</img>``, consecutive images separated by one text token; random
    ``pixel_values`` (sum(tiles), 3, S, S). tiles: tiles of each image (a thumbnail counts as one)."""
    config = model.config
    per_tile = config.image_seq_length
    ids = list(text_before)
    for i, n in enumerate(tiles):
        if i:
            ids.append(5 + i)
        ids += [INTERNVL_IMG_START] + [config.image_token_id] * (n * per_tile) + [INTERNVL_IMG_END]
    ids += list(text_after)
    out = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    if sum(tiles):
        size = config.vision_config.image_size
        gen = torch.Generator().manual_seed(seed)
        out["pixel_values"] = torch.randn(sum(tiles), 3, size[0], size[1], generator=gen)
    return out


# -- LLaVA-NeXT / LLaVA-OneVision --------------------------------------------------------------------------------

NEXT_PINPOINTS = [[12, 24], [24, 12], [24, 24]]  # (H, W) pixels, multiples of the 12-px crop


def _scale_text(model, attn_implementation: str):
    model.set_attn_implementation(attn_implementation)
    with torch.no_grad():  # see tiny_llava: a larger scale makes tokens (and so merges and logits) more distinct
        for p in model.model.language_model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model.eval()


def tiny_llava_next(num_layers: int = 4, attn_implementation: str = "sdpa", seed: int = 0, hidden_size: int = 64,
                    vocab_size: int = 128):
    """A random ``LlavaNextForConditionalGeneration``: Llama text model, CLIP tower on 12-px crops of 2-px patches
    (6x6 base grid), pinpoints 12x24, 24x12, 24x24 (high-res grids up to 12x12 before unpadding)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=12, patch_size=2, projection_dim=32)
    text = LlamaConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                       max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=vocab_size - 1,
                             image_grid_pinpoints=NEXT_PINPOINTS, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", pad_token_id=0)
    torch.manual_seed(seed)
    model = _scale_text(LlavaNextForConditionalGeneration(config), attn_implementation)
    model.generation_config.suppress_tokens = [vocab_size - 1]
    return model


def tiny_llava_onevision(num_layers: int = 4, attn_implementation: str = "sdpa", seed: int = 0,
                         hidden_size: int = 64, vocab_size: int = 128, vision_aspect_ratio: str = "anyres_max_2"):
    """A random ``LlavaOnevisionForConditionalGeneration``: Qwen2 text model, SigLIP tower (no CLS) on 12-px crops
    (6x6 base grid, 3x3 pooled video frames), pinpoints as ``tiny_llava_next``; ``anyres_max_2`` shrinks a
    high-res grid of more than ~2 crops' worth of tokens."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=12, patch_size=2)
    text = Qwen2Config(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                       max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=vocab_size - 1,
                                  video_token_index=vocab_size - 2, image_grid_pinpoints=NEXT_PINPOINTS,
                                  vision_aspect_ratio=vision_aspect_ratio, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", pad_token_id=0)
    torch.manual_seed(seed)
    model = _scale_text(LlavaOnevisionForConditionalGeneration(config), attn_implementation)
    model.generation_config.suppress_tokens = [vocab_size - 1, vocab_size - 2]
    return model


def llava_next_prompt(model, text_before: list[int], text_after: list[int], image_sizes=((20, 30),),
                      video_frames: int = 0, seed: int = 0) -> dict:
    """Processor-free LLaVA-NeXT / OneVision inputs (batch 1): text_before, each image's tokens (base grid +
    high-res rows + newlines, as the adapter lays them out) separated by one text token, a video of
    ``video_frames`` frames (OneVision), text_after. image_sizes: (H, W) pixels per image. Pixel values are
    random crops in the stacked 4-D form; OneVision prompts carry ``batch_num_images``."""
    from .adapters import get_adapter

    adapter = get_adapter(model)
    config = model.config
    size = config.vision_config.image_size
    onevision = hasattr(config, "video_token_id")
    sizes = torch.tensor([list(s) for s in image_sizes], dtype=torch.long).view(-1, 2)
    call = {"batch_num_images": torch.tensor([len(sizes)])} if onevision else {}
    ids, crops = list(text_before), 0
    for i, parts in enumerate(adapter._items_from_sizes(sizes, call) if len(sizes) else []):
        if i:
            ids.append(5 + i)
        ids += [config.image_token_id] * sum(p[1] * (p[2] + int(p[3])) if p[0] == "grid" else 1 for p in parts)
        crops += 1 + (sum(1 for p in parts if p[0] == "grid" and p[3]) and _crops(sizes[i], config))
    if video_frames:
        frame = -(-size // config.vision_config.patch_size // 2)
        ids += [config.video_token_id] * (video_frames * frame * frame + 1)
    ids += list(text_after)
    gen = torch.Generator().manual_seed(seed)
    out = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long), **call}
    if len(sizes):
        out["pixel_values"] = torch.randn(crops, 3, size, size, generator=gen)
        out["image_sizes"] = sizes
    if video_frames:
        out["pixel_values_videos"] = torch.randn(1, video_frames, 3, size, size, generator=gen)
    return out


def _crops(image_size: torch.Tensor, config) -> int:
    """High-res crops of an image (the best pinpoint resolution over the crop size)."""
    from transformers.image_processing_utils import select_best_resolution

    height, width = select_best_resolution(tuple(image_size.tolist()), config.image_grid_pinpoints)
    side = config.vision_config.image_size
    return (height // side) * (width // side)


# -- Mistral3 / Pixtral ------------------------------------------------------------------------------------------

__all__ += ["tiny_mistral3", "tiny_pixtral_llava", "mistral3_prompt"]

MISTRAL3_IMAGE_TOKEN, MISTRAL3_IMAGE_BREAK, MISTRAL3_IMAGE_END = 127, 125, 126


def _mistral_text(num_layers: int, hidden_size: int, vocab_size: int, llama_4_scaling: bool):
    """A tiny Mistral text config; ``llama_4_scaling``: Ministral-3's query scale (beta 0.5 after every 16
    positions, so a tiny prompt spans several scales)."""
    common = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4, vocab_size=vocab_size,
                  max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=None)
    if llama_4_scaling:
        from transformers import Ministral3Config

        return Ministral3Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                            "llama_4_scaling_beta": 0.5,
                                                            "original_max_position_embeddings": 16})
    from transformers import MistralConfig

    return MistralConfig(**common)


def _finish_mistral(model, attn_implementation: str, language_model):
    model.set_attn_implementation(attn_implementation)
    # a random model may emit the image ids; an uncached step would then look for image features
    model.generation_config.suppress_tokens = [MISTRAL3_IMAGE_BREAK, MISTRAL3_IMAGE_END, MISTRAL3_IMAGE_TOKEN]
    with torch.no_grad():  # see tiny_llava: a larger scale makes tokens (and so merges and logits) more distinct
        for p in language_model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model.eval()


def tiny_mistral3(num_layers: int = 4, attn_implementation: str = "sdpa", seed: int = 0, hidden_size: int = 64,
                  vocab_size: int = 128, llama_4_scaling: bool = True):
    """A random ``Mistral3ForConditionalGeneration``: a Pixtral tower on images up to 32 x 32 px in 2-px patches,
    2 x 2 patches merged into a token (up to 8 x 8 tokens); a Ministral-3 text model (Mistral without
    ``llama_4_scaling``)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralVisionConfig

    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 head_dim=16, image_size=32, patch_size=2)
    config = Mistral3Config(vision_config=vision, text_config=_mistral_text(num_layers, hidden_size, vocab_size,
                                                                            llama_4_scaling),
                            image_token_index=MISTRAL3_IMAGE_TOKEN, spatial_merge_size=2)
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(config)
    return _finish_mistral(model, attn_implementation, model.model.language_model)


def tiny_pixtral_llava(num_layers: int = 4, attn_implementation: str = "sdpa", seed: int = 0, hidden_size: int = 64,
                       vocab_size: int = 128):
    """A random Pixtral-12B-style ``LlavaForConditionalGeneration``: a Pixtral tower on images up to 32 x 32 px in
    4-px patches, a patch a token (up to 8 x 8 tokens), a Mistral text model."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, PixtralVisionConfig

    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 head_dim=16, image_size=32, patch_size=4)
    config = LlavaConfig(vision_config=vision, text_config=_mistral_text(num_layers, hidden_size, vocab_size, False),
                         image_token_index=MISTRAL3_IMAGE_TOKEN, vision_feature_select_strategy="full",
                         vision_feature_layer=-1, projector_hidden_act="gelu", pad_token_id=0)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    return _finish_mistral(model, attn_implementation, model.model.language_model)


def mistral3_prompt(model, text_before: list[int], text_after: list[int], images: list[tuple[int, int]] = ((6, 8),),
                    seed: int = 0) -> dict:
    """Processor-free Mistral3 / Pixtral inputs (batch 1), as ``PixtralProcessor`` lays them out.

    images: (rows, cols) token grid of each image: rows of cols ``[IMG]``, ``[IMG_BREAK]`` after each row but the
    last, ``[IMG_END]`` after it; consecutive images are separated by one text token. Random pixels of
    (rows, cols) x patch x merge px per image, padded to the vision config's ``image_size`` square as the
    processor pads a batch, and ``image_sizes`` (H, W) in pixels.
    """
    from .adapters.mistral3 import Mistral3Adapter, PixtralLlavaAdapter

    config = model.config
    adapter = PixtralLlavaAdapter if type(config).__name__ == "LlavaConfig" else Mistral3Adapter
    unit = config.vision_config.patch_size * adapter.merge_size(config)
    size = config.vision_config.image_size
    ids = list(text_before)
    for i, (rows, cols) in enumerate(images):
        if i:
            ids.append(5 + i)
        for r in range(rows):
            ids += [config.image_token_id] * cols + [MISTRAL3_IMAGE_BREAK if r < rows - 1 else MISTRAL3_IMAGE_END]
    ids += list(text_after)
    out = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    if images:
        gen = torch.Generator().manual_seed(seed)
        pixels = torch.zeros(len(images), 3, size, size)
        for i, (rows, cols) in enumerate(images):
            pixels[i, :, :rows * unit, :cols * unit] = torch.randn(3, rows * unit, cols * unit, generator=gen)
        out["pixel_values"] = pixels
        out["image_sizes"] = torch.tensor([[rows * unit, cols * unit] for rows, cols in images])
    return out


# -- Idefics3 / SmolVLM ------------------------------------------------------------------------------------------

__all__ += ["tiny_idefics3", "idefics3_prompt"]

IDEFICS3_IMAGE_TOKEN, IDEFICS3_FAKE_TOKEN, IDEFICS3_GLOBAL_TOKEN, IDEFICS3_NEWLINE = 127, 126, 125, 3
IDEFICS3_ROW_COL_FIRST = 89  # <row_r_col_c> = 89 + 6 * (r - 1) + (c - 1), r, c in 1..6 (89..124)


def tiny_idefics3(num_layers: int = 4, attn_implementation: str = "sdpa", seed: int = 0, hidden_size: int = 64,
                  vocab_size: int = 128, smolvlm: bool = False):
    """A random ``Idefics3ForConditionalGeneration`` (``SmolVLMForConditionalGeneration`` with ``smolvlm``): a Llama
    text model, a SigLIP-style tower on 16-px tiles of 2-px patches, pixel-shuffled by 2 into 4 x 4 tokens."""
    import transformers
    from transformers import LlamaConfig

    prefix = "SmolVLM" if smolvlm else "Idefics3"
    vision = getattr(transformers, f"{prefix}VisionConfig")(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                            num_attention_heads=2, image_size=16, patch_size=2)
    text = LlamaConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                       max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = getattr(transformers, f"{prefix}Config")(vision_config=vision, text_config=text, scale_factor=2,
                                                      image_token_id=IDEFICS3_IMAGE_TOKEN, pad_token_id=0)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config)
    model.set_attn_implementation(attn_implementation)
    # a random model may emit the image id; an uncached step would then look for image features
    model.generation_config.suppress_tokens = [IDEFICS3_IMAGE_TOKEN, IDEFICS3_FAKE_TOKEN, IDEFICS3_GLOBAL_TOKEN]
    with torch.no_grad():  # see tiny_llava: a larger scale makes tokens (and so merges and logits) more distinct
        for p in model.model.text_model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model.eval()


def idefics3_prompt(model, text_before: list[int], text_after: list[int], images: list[tuple[int, int]] = ((2, 3),),
                    seed: int = 0) -> dict:
    """Processor-free Idefics3 / SmolVLM inputs (batch 1), as their processors lay them out.

    images: (rows, cols) of tiles of each image, (0, 0) for an image that is not split. Per tile
    ``<fake><row_r_col_c>`` + S x S ``<image>``, a newline after each row of tiles, then a newline and the global
    image ``<fake><global-img>`` + S x S ``<image>`` + ``<fake>``; consecutive images are separated by one text
    token. pixel_values (1, tiles + globals, 3, P, P) random, tiles first, each image's global last.
    """
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size // config.scale_factor
    per_tile = [config.image_token_id] * (side * side)
    ids = list(text_before)
    for i, (rows, cols) in enumerate(images):
        if i:
            ids.append(5 + i)
        for r in range(rows):
            for c in range(cols):
                ids += [IDEFICS3_FAKE_TOKEN, IDEFICS3_ROW_COL_FIRST + 6 * r + c] + per_tile
            ids.append(IDEFICS3_NEWLINE)
        if rows:
            ids.append(IDEFICS3_NEWLINE)
        ids += [IDEFICS3_FAKE_TOKEN, IDEFICS3_GLOBAL_TOKEN] + per_tile + [IDEFICS3_FAKE_TOKEN]
    ids += list(text_after)
    out = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    frames = sum(rows * cols + 1 for rows, cols in images)
    if frames:
        size = config.vision_config.image_size
        gen = torch.Generator().manual_seed(seed)
        out["pixel_values"] = torch.randn(1, frames, 3, size, size, generator=gen)
    return out


# -- GLM-4.1V / GLM-4.5V / GLM-4.6V --------------------------------------------------------------------------------

__all__ += ["tiny_glm4v", "glm4v_prompt"]

GLM_IMAGE_TOKEN, GLM_VIDEO_TOKEN = 127, 126
GLM_IMAGE_START, GLM_IMAGE_END, GLM_VIDEO_START, GLM_VIDEO_END = 122, 123, 124, 125
_GLM_CLASSES = {"glm4v": ("Glm4vConfig", "Glm4vForConditionalGeneration"),
                "glm4v_moe": ("Glm4vMoeConfig", "Glm4vMoeForConditionalGeneration"),
                "glm46v": ("Glm46VConfig", "Glm46VForConditionalGeneration")}


def tiny_glm4v(num_layers: int = 4, attn_implementation: str = "sdpa", seed: int = 0, hidden_size: int = 64,
               vocab_size: int = 128, variant: str = "glm4v"):
    """A random GLM-4V model: ``variant`` "glm4v" (GLM-4.1V), "glm4v_moe" (GLM-4.5V: MoE text model, 4 experts)
    or "glm46v" (GLM-4.6V). GQA text model with 3-D M-RoPE on half of each head's dims (partial rotary 0.5),
    vision tower with patch 2, spatial merge 2, temporal patch 2."""
    import transformers

    if variant not in _GLM_CLASSES:
        raise ValueError(f"variant must be one of {sorted(_GLM_CLASSES)}, got {variant!r}")
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=hidden_size, image_size=16)
    text = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                 "partial_rotary_factor": 0.5})
    if variant == "glm4v_moe":
        text.update(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                    first_k_dense_replace=1)
    if variant == "glm46v":  # sub-configs by model type
        vision, text = dict(vision, model_type="glm4v_vision"), dict(text, model_type="glm4v_text")
    config_cls, model_cls = (getattr(transformers, name) for name in _GLM_CLASSES[variant])
    config = config_cls(vision_config=vision, text_config=text, image_token_id=GLM_IMAGE_TOKEN,
                        video_token_id=GLM_VIDEO_TOKEN, image_start_token_id=GLM_IMAGE_START,
                        image_end_token_id=GLM_IMAGE_END, video_start_token_id=GLM_VIDEO_START,
                        video_end_token_id=GLM_VIDEO_END)
    torch.manual_seed(seed)
    model = model_cls(config)
    model.set_attn_implementation(attn_implementation)
    # a random model may emit the placeholder ids; an uncached step would then look for their features
    model.generation_config.suppress_tokens = [GLM_IMAGE_TOKEN, GLM_VIDEO_TOKEN, GLM_IMAGE_START, GLM_IMAGE_END,
                                               GLM_VIDEO_START, GLM_VIDEO_END]
    with torch.no_grad():  # see tiny_llava: a larger scale makes tokens (and so merges and logits) more distinct
        for p in model.model.language_model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model.eval()


def glm4v_prompt(model, text_before: list[int], text_after: list[int], images: list[tuple[int, int]] = ((6, 8),),
                 videos: list[tuple[int, int, int]] = (), seed: int = 0) -> dict:
    """Processor-free GLM-4V inputs (batch 1), as ``Glm4vProcessor`` lays them out.

    images: (rows, cols) token grid of each image after spatial merging, between ``<|begin_of_image|>`` and
    ``<|end_of_image|>``, consecutive images separated by one text token. videos: (frames, rows, cols):
    ``<|begin_of_video|>``, then per frame the image markers around rows x cols tokens of the *image* token id
    and a timestamp token, then ``<|end_of_video|>``. Returns input_ids, attention_mask, mm_token_type_ids
    (0 text, 1 image, 2 video), pixel_values / image_grid_thw and pixel_values_videos / video_grid_thw (grids
    in patches; a video's t counts frames) with random pixels.
    """
    config = model.config
    vision = config.vision_config
    merge, patch, temporal = vision.spatial_merge_size, vision.patch_size, vision.temporal_patch_size
    patch_dim = vision.in_channels * temporal * patch * patch
    gen = torch.Generator().manual_seed(seed)
    ids, types = list(text_before), [0] * len(text_before)

    def add(tokens: list[int], kind: int = 0) -> None:
        ids.extend(tokens)
        types.extend([kind] * len(tokens))

    image_grids, video_grids = [], []
    for i, (rows, cols) in enumerate(images):
        if i:
            add([5 + i])
        add([GLM_IMAGE_START])
        add([config.image_token_id] * (rows * cols), 1)
        add([GLM_IMAGE_END])
        image_grids.append([1, rows * merge, cols * merge])
    for frames, rows, cols in videos:
        add([GLM_VIDEO_START])
        for f in range(frames):
            add([GLM_IMAGE_START])
            add([config.image_token_id] * (rows * cols), 2)
            add([GLM_IMAGE_END, 30 + f])
        add([GLM_VIDEO_END])
        video_grids.append([frames, rows * merge, cols * merge])
    add(list(text_after))
    out = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
           "mm_token_type_ids": torch.tensor([types])}
    if image_grids:
        grid = torch.tensor(image_grids)
        out["pixel_values"] = torch.randn(int(grid.prod(1).sum()), patch_dim, generator=gen)
        out["image_grid_thw"] = grid
    if video_grids:
        grid = torch.tensor(video_grids)
        out["pixel_values_videos"] = torch.randn(int(grid.prod(1).sum()), patch_dim, generator=gen)
        out["video_grid_thw"] = grid
    return out


# -- Gemma 3 ----------------------------------------------------------------------------------------------------

__all__ += ["tiny_gemma3", "gemma3_prompt"]

GEMMA3_IMAGE_TOKEN, GEMMA3_BOI, GEMMA3_EOI = 127, 125, 126


def tiny_gemma3(num_layers: int = 6, attn_implementation: str = "sdpa", seed: int = 0, hidden_size: int = 64,
                vocab_size: int = 128, sliding_window: int = 24, grid: int = 8,
                layer_types: list[str] | None = None):
    """A random ``Gemma3ForConditionalGeneration`` with Gemma 3's hybrid decoder: five sliding-window layers then one
    full-attention layer (``layer_types`` overrides the pattern), each type with its own RoPE base, a
    ``sliding_window`` smaller than a prompt with an image, and ``grid`` x ``grid`` tokens per image (a SigLIP
    tower on 2-px patches, average-pooled 2 x 2 as in Gemma 3)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=grid * 4, patch_size=2)
    text = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=sliding_window, layer_types=layer_types, max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=grid * grid,
                          image_token_index=GEMMA3_IMAGE_TOKEN, boi_token_index=GEMMA3_BOI, eoi_token_index=GEMMA3_EOI,
                          pad_token_id=0)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # zeros at init: every image would project to the same features
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.3)
    return _finish_tiny(model, attn_implementation, [GEMMA3_IMAGE_TOKEN, GEMMA3_BOI, GEMMA3_EOI],
                        norms=("q_norm.weight", "k_norm.weight"))


def gemma3_prompt(model, text_before: list[int], text_after: list[int], num_images: int = 1, seed: int = 0) -> dict:
    """Processor-free Gemma3 inputs (batch 1), as ``Gemma3Processor`` lays them out: per image (or Pan & Scan crop)
    ``<start_of_image>``, ``mm_tokens_per_image`` image tokens, ``<end_of_image>``, consecutive images separated by
    one text token; ``token_type_ids`` 1 on image tokens; random pixels."""
    config = model.config
    ids = list(text_before)
    for i in range(num_images):
        if i:
            ids.append(5 + i)
        ids += [GEMMA3_BOI] + [config.image_token_id] * config.mm_tokens_per_image + [GEMMA3_EOI]
    ids += list(text_after)
    input_ids = torch.tensor([ids])
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
           "token_type_ids": (input_ids == config.image_token_id).long()}
    if num_images:
        size = config.vision_config.image_size
        out["pixel_values"] = torch.randn(num_images, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return out


# -- Aya Vision ----------------------------------------------------------------------------------------------------

__all__ += ["tiny_aya_vision", "aya_vision_prompt"]

AYA_IMAGE_TOKEN, AYA_START, AYA_END, AYA_TILE, AYA_TILE_GLOBAL = 127, 124, 125, 126, 123


def tiny_aya_vision(num_layers: int = 4, attn_implementation: str = "sdpa", seed: int = 0, hidden_size: int = 64,
                    vocab_size: int = 128, sliding_window: int = 24, grid: int = 8):
    """A random ``AyaVisionForConditionalGeneration``: a SigLIP tower on 2-px patches pixel-shuffled 2 x 2 into
    ``grid`` x ``grid`` tokens per tile, and a Cohere2 decoder with Aya's pattern (three sliding-window layers with
    RoPE, then a global layer without), the window smaller than a prompt with an image."""
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration, Cohere2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=grid * 4, patch_size=2)
    text = Cohere2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         sliding_window=sliding_window, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, logit_scale=1.0)
    config = AyaVisionConfig(vision_config=vision, text_config=text, image_token_index=AYA_IMAGE_TOKEN,
                             downsample_factor=2, vision_feature_layer=-1, vision_feature_select_strategy="full")
    torch.manual_seed(seed)
    model = AyaVisionForConditionalGeneration(config)
    return _finish_tiny(model, attn_implementation, [AYA_IMAGE_TOKEN, AYA_START, AYA_END, AYA_TILE, AYA_TILE_GLOBAL])


def aya_vision_prompt(model, text_before: list[int], text_after: list[int], tiles: list[int] = (2,),
                      seed: int = 0) -> dict:
    """Processor-free Aya Vision inputs (batch 1), as ``AyaVisionProcessor`` lays them out: per image with n tiles
    (the last one the global thumbnail) ``<|START_OF_IMG|>``, per tile a marker token and the tile's patch tokens,
    ``<|END_OF_IMG|>``; consecutive images separated by one text token; random pixels, one image per tile."""
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size // config.downsample_factor
    ids = list(text_before)
    for i, n in enumerate(tiles):
        if i:
            ids.append(5 + i)
        ids.append(AYA_START)
        for t in range(n):
            ids += [AYA_TILE_GLOBAL if t == n - 1 else AYA_TILE] + [config.image_token_id] * (side * side)
        ids.append(AYA_END)
    ids += list(text_after)
    input_ids = torch.tensor([ids])
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if sum(tiles):
        size = config.vision_config.image_size
        out["pixel_values"] = torch.randn(sum(tiles), 3, size, size, generator=torch.Generator().manual_seed(seed))
    return out
