"""Tiny random models and prompts built from configs, for tests and examples (no downloads)."""

from __future__ import annotations

import torch

__all__ = ["tiny_llava", "llava_prompt", "batch_prompts"]


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
    per_image = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
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
    """Left-pad single-sample prompts into one batch (pixel values concatenated in order)."""
    length = max(p["input_ids"].shape[1] for p in prompts)
    ids, mask, pixels = [], [], []
    for p in prompts:
        n = p["input_ids"].shape[1]
        ids.append(torch.cat([torch.full((1, length - n), pad_token_id), p["input_ids"]], dim=1))
        mask.append(torch.cat([torch.zeros(1, length - n, dtype=torch.long), p["attention_mask"]], dim=1))
        if "pixel_values" in p:
            pixels.append(p["pixel_values"])
    out = {"input_ids": torch.cat(ids), "attention_mask": torch.cat(mask)}
    if pixels:
        out["pixel_values"] = torch.cat(pixels)
    return out
