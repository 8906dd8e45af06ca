"""GLM-4.1V / 4.5V / 4.6V-specific behaviour; the contracts every family keeps are in test_contract.py (rows
"glm4v", "glm4v_moe", "glm46v")."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import lightkv
from lightkv.adapters import Glm46VAdapter, Glm4vAdapter, Glm4vMoeAdapter, adapter_class_for_config, get_adapter
from lightkv.testing import GLM_IMAGE_END, GLM_IMAGE_START, batch_prompts, glm4v_prompt, tiny_glm4v

from helpers import capture_attention_inputs, check_batched_equals_unbatched, generate

N_LAYERS = 4
VARIANTS = {"glm4v": Glm4vAdapter, "glm4v_moe": Glm4vMoeAdapter, "glm46v": Glm46VAdapter}
UNIFORM = dict(layers=[1, 2], windows=[2, 1], ratios=[0.5, 0.5], guidance="uniform")


@functools.cache
def tiny(variant="glm4v", attn="sdpa"):
    return tiny_glm4v(num_layers=N_LAYERS, attn_implementation=attn, variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_registered_for_both_classes_and_the_config(variant):
    model = tiny(variant)
    assert lightkv.SUPPORTED_FAMILIES[variant] == VARIANTS[variant].model_classes
    assert type(get_adapter(model)) is VARIANTS[variant]
    assert type(get_adapter(model.model)) is VARIANTS[variant]
    assert get_adapter(model.model).language_model is model.model.language_model
    assert adapter_class_for_config(model.config) is VARIANTS[variant]
    assert VARIANTS[variant].image_grid(model.config, max_pixels=32 * 32) == (8, 8)  # 32 px / (patch 2 x merge 2)


@pytest.mark.parametrize("variant", ["glm4v", "glm4v_moe"])  # interleaved / half-split partial rotary
def test_guidance_queries_and_keys_are_the_models(variant):
    """softmax(q k^T * scaling) from the adapter's post-RoPE q / k equals the eager attention weights of every
    layer: guidance sees the model's partial rotary, on the 3-D M-RoPE positions of an image prompt."""
    model = tiny(variant, "eager")
    adapter = get_adapter(model)
    inputs = glm4v_prompt(model, [1, 10, 11], [20, 21], images=[(4, 6)])
    out, seen = capture_attention_inputs(model, inputs)
    captured = {(i, name): record[name] for i, record in seen.items() for name in ("q", "k")}
    captured.update({(i, "pe"): record["kwargs"]["position_embeddings"] for i, record in seen.items()})
    N = inputs["input_ids"].shape[1]
    causal = torch.full((N, N), float("-inf")).triu(1)
    rotary = captured[(0, "pe")][0].shape[-1]
    assert rotary < adapter.attention(adapter.decoder_layers[0]).head_dim  # the rotary is partial
    for i, layer in enumerate(adapter.decoder_layers):
        q, k, scaling = adapter.queries_keys(layer, captured[(i, "q")], captured[(i, "k")], captured[(i, "pe")])
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        weights = torch.softmax(q @ k.transpose(2, 3) * scaling + causal, dim=-1)
        torch.testing.assert_close(weights, out.attentions[i], rtol=1e-5, atol=1e-6)


def test_video_frames_reuse_the_image_id_and_are_told_apart_by_type():
    model = tiny()
    inputs = glm4v_prompt(model, [1, 10], [20], images=[], videos=[(3, 4, 6)])
    ids = inputs["input_ids"][0]
    assert not bool((ids == model.config.video_token_id).any())  # frames use the image token id
    layout = get_adapter(model).vision_layout(inputs["input_ids"], None, inputs)
    assert layout.grid_hw.tolist() == [[4, 6]] * 3  # each frame its own grid
    frames = inputs["mm_token_type_ids"][0] == 2
    assert torch.equal(layout.vision_mask[0], frames)
    assert layout.image_index[0, frames].tolist() == [f for f in range(3) for _ in range(24)]
    markers = (ids == GLM_IMAGE_START) | (ids == GLM_IMAGE_END)
    assert int(markers.sum()) == 6 and not bool(layout.vision_mask[0, markers].any())  # begin / end per frame
    # without mm_token_type_ids every image id is an image
    image = glm4v_prompt(model, [1, 10], [20], images=[(4, 6)])
    untyped = {key: value for key, value in image.items() if key != "mm_token_type_ids"}
    assert get_adapter(model).vision_layout(image["input_ids"], None, untyped).grid_hw.tolist() == [[4, 6]]


@pytest.mark.parametrize("kind", ["images", "video"])
def test_grids_from_positions_equal_grids_from_thw(kind):
    """``generate`` passes (4, B, N) positions and no grids: the layout read back from them is the same."""
    model = tiny()
    extra = dict(images=[(4, 10), (8, 4)]) if kind == "images" else dict(images=[], videos=[(2, 4, 8)])
    inputs = batch_prompts([glm4v_prompt(model, [1, 13], [25, 26, 27], seed=2, **extra),
                            glm4v_prompt(model, [1, 14, 15, 16, 17], [28, 29], images=[], seed=3)])
    adapter = get_adapter(model)
    expected = adapter.vision_layout(inputs["input_ids"], None, inputs)
    positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              inputs.get("image_grid_thw"), inputs.get("video_grid_thw"),
                                              attention_mask=inputs["attention_mask"])
    text = inputs["attention_mask"].cumsum(-1)[None] - 1
    call = {"mm_token_type_ids": inputs["mm_token_type_ids"], "position_ids": torch.cat([text, positions])}
    got = adapter.vision_layout(inputs["input_ids"], None, call)
    for name in ("vision_mask", "image_index", "grid_rows", "grid_cols", "grid_hw"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


def _video_prompts(model):
    return [glm4v_prompt(model, [1, 10, 11], [20, 21, 22], images=[], videos=[(2, 4, 8)], seed=1),
            glm4v_prompt(model, [1, 13], [25, 26], images=[], videos=[(3, 6, 4)], seed=2),
            glm4v_prompt(model, [1, 14, 15, 16, 17], [28, 29], images=[], seed=3)]


def test_video_batch_kept_counts_cached_and_batched():
    model = tiny()
    method = lightkv.LightKV(**UNIFORM)
    prompts = _video_prompts(model)
    inputs = batch_prompts(prompts[:2])
    with lightkv.apply(model, method) as handle:
        cached = generate(model, inputs, max_new_tokens=3)
        stats = handle.stats
        uncached = generate(model, inputs, max_new_tokens=3, use_cache=False)
    assert stats.vision_tokens == [method.kept_per_layer(N_LAYERS, [(4, 8)] * 2),
                                   method.kept_per_layer(N_LAYERS, [(6, 4)] * 3)]
    assert torch.equal(cached.sequences, uncached.sequences)
    check_batched_equals_unbatched(model, method, N_LAYERS, new_tokens=3, prompts=prompts)


# -- with the family's own image processor and a tokenizer from a tiny vocabulary ---------------------------------

def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = (["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(118)]
             + ["<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>", "<|video|>",
                "<|image|>"])
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _processed(model, texts, images):
    """What ``Glm4vProcessor`` returns for images: its image processor (``Glm4vImageProcessorPil``, the one
    ``AutoImageProcessor`` picks without torchvision) gives pixel_values and image_grid_thw; each ``<|image|>``
    becomes t*h*w / merge^2 image tokens (``Glm4vProcessor.replace_image_token``) and mm_token_type_ids marks
    them 1 (``create_mm_token_type_ids``; the processor class itself cannot be built without torchvision, for
    its video processor)."""
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    vision = model.config.vision_config
    processor = Glm4vImageProcessorPil(size={"shortest_edge": 16, "longest_edge": 1024},
                                       patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                                       temporal_patch_size=vision.temporal_patch_size)
    pixels = processor([image for row in images for image in row], return_tensors="pt")
    counts = iter((pixels["image_grid_thw"].prod(-1) // vision.spatial_merge_size ** 2).tolist())
    expanded = []
    for text in texts:
        parts = text.split("<|image|>")
        expanded.append(parts[0] + "".join(" <|image|>" * next(counts) + " " + p for p in parts[1:]))
    tokenizer = _tokenizer()
    assert tokenizer.convert_tokens_to_ids("<|image|>") == model.config.image_token_id
    batch = tokenizer(expanded, return_tensors="pt", padding=True, padding_side="left")
    types = (batch["input_ids"] == model.config.image_token_id).long()
    return dict(batch, mm_token_type_ids=types, **pixels)


def test_generate_from_processor_output():
    from PIL import Image

    model = tiny()
    rng = np.random.RandomState(0)
    wide = Image.fromarray(rng.randint(0, 255, (20, 28, 3), dtype=np.uint8))
    tall = Image.fromarray(rng.randint(0, 255, (32, 16, 3), dtype=np.uint8))
    inputs = _processed(model, ["<s> w1 <|begin_of_image|> <|image|> <|end_of_image|> w5 w6",
                                "<s> w2 <|begin_of_image|> <|image|> <|end_of_image|> w3"], [[wide], [tall]])
    grids = [tuple((g[1:] // 2).tolist()) for g in inputs["image_grid_thw"]]
    method = lightkv.LightKV(**UNIFORM)
    with torch.no_grad():
        reference = generate(model, inputs, max_new_tokens=3)
    with lightkv.apply(model, lightkv.LightKV(**dict(UNIFORM, ratios=[0.0, 0.0]))):
        identity = generate(model, inputs, max_new_tokens=3)
    assert torch.equal(identity.sequences, reference.sequences)
    with lightkv.apply(model, method) as handle:
        cached = generate(model, inputs, max_new_tokens=3)
        stats = handle.stats
        uncached = generate(model, inputs, max_new_tokens=3, use_cache=False)
    assert stats.vision_tokens == [method.kept_per_layer(N_LAYERS, [grid]) for grid in grids]
    assert torch.equal(cached.sequences, uncached.sequences)


def test_real_size_spec():
    """``lightkv bench --model glm-4.1v-9b``: GLM-4.1V-9B's shapes (built on the meta device: no memory)."""
    from lightkv.perf import get_spec

    spec = get_spec("glm-4.1v-9b")
    text, vision = spec.dims()
    assert (text.layers, text.hidden, text.heads, text.kv_heads, text.head_dim) == (40, 4096, 32, 2, 128)
    assert (vision.tokens, vision.patches) == (48 * 48, 24 * 24)  # the 672-px reference image
    assert spec.grid() == (24, 24)
    assert spec.reference_schedule()["layers"] == [15, 23, 30]
    model = spec.build(device="meta", dtype=torch.bfloat16)
    assert type(get_adapter(model)) is Glm4vAdapter
    assert model.config.text_config.rope_parameters["partial_rotary_factor"] == 0.5
    assert abs(sum(p.numel() for p in model.parameters()) / 10.29e9 - 1) < 0.01  # 10.29B parameters
