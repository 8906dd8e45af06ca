"""InternVL-specific behaviour; the contracts every family keeps are in test_contract.py ("internvl" row)."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import lightkv
from lightkv.adapters import InternVLAdapter, adapter_class_for_config, get_adapter
from lightkv.adapters.internvl import tile_layout
from lightkv.testing import INTERNVL_IMG_END, INTERNVL_IMG_START, batch_prompts, internvl_prompt, tiny_internvl

from helpers import generate

N_LAYERS = 4
UNIFORM = dict(layers=[1, 2], windows=[2, 1], ratios=[0.5, 0.5], guidance="uniform")


@functools.cache
def tiny():
    return tiny_internvl(num_layers=N_LAYERS)


def test_registered_for_both_classes_and_the_config():
    model = tiny()
    assert lightkv.SUPPORTED_FAMILIES["internvl"] == ("InternVLForConditionalGeneration", "InternVLModel")
    assert isinstance(get_adapter(model), InternVLAdapter)
    assert isinstance(get_adapter(model.model), InternVLAdapter)
    assert get_adapter(model.model).language_model is model.model.language_model
    assert adapter_class_for_config(model.config) is InternVLAdapter


def test_tile_grid_from_the_config():
    assert InternVLAdapter.image_grid(tiny().config) == (8, 8)
    # InternVL3-8B: 448-px tiles, patch 14, pixel shuffle 0.5 -> 16x16 = 256 tokens per tile
    real = SimpleNamespace(vision_config=SimpleNamespace(image_size=(448, 448), patch_size=(14, 14)),
                           downsample_ratio=0.5)
    assert InternVLAdapter.image_grid(real) == (16, 16)
    assert InternVLAdapter.image_grid(SimpleNamespace(vision_config=None)) is None


def test_each_tile_is_its_own_grid_and_markers_are_text():
    model = tiny()
    inputs = internvl_prompt(model, [1, 10], [20], tiles=[3, 1])
    ids = inputs["input_ids"]
    layout = get_adapter(model).vision_layout(ids, None, inputs)
    assert layout.grid_hw.tolist() == [[8, 8]] * 4
    image = ids[0] == model.config.image_token_id
    assert torch.equal(layout.vision_mask[0], image)
    markers = (ids[0] == INTERNVL_IMG_START) | (ids[0] == INTERNVL_IMG_END)
    assert int(markers.sum()) == 4 and not bool(layout.vision_mask[0, markers].any())
    tiles = layout.image_index[0, image]
    assert tiles.tolist() == [t for t in range(4) for _ in range(64)]
    assert layout.grid_rows[0, image].tolist() == [r for _ in range(4) for r in range(8) for _ in range(8)]
    assert layout.grid_cols[0, image].tolist() == [c for _ in range(4) for _ in range(8) for c in range(8)]


def test_tiles_are_counted_across_batch_rows():
    tokens = torch.zeros(2, 12, dtype=torch.bool)
    tokens[0, 2:10] = True  # two tiles of 4
    tokens[1, 5:9] = True  # one tile
    layout = tile_layout(tokens, (2, 2))
    assert layout.grid_hw.tolist() == [[2, 2]] * 3
    assert layout.image_index[0, 2:10].tolist() == [0] * 4 + [1] * 4
    assert layout.image_index[1, 5:9].tolist() == [2] * 4
    assert layout.grid_rows[1, 5:9].tolist() == [0, 0, 1, 1] and layout.grid_cols[1, 5:9].tolist() == [0, 1, 0, 1]


def test_a_run_that_is_not_whole_tiles_is_a_clear_error():
    model = tiny()
    inputs = internvl_prompt(model, [1, 10], [20], tiles=[2])
    ids = inputs["input_ids"][0].tolist()
    first = ids.index(model.config.image_token_id)
    ids.insert(first + 40, 30)  # runs of 40 and 88 tokens: the model's total (128) holds, whole tiles do not
    inputs = dict(inputs, input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    with lightkv.apply(model, lightkv.LightKV(**UNIFORM)), torch.no_grad():
        with pytest.raises(ValueError, match="a run of 40 image tokens is not a whole number of tiles of 64"):
            model(**inputs)


def test_image_ids_without_features_are_text():
    model = tiny()
    inputs = internvl_prompt(model, [1, 10], [20], tiles=[1])
    del inputs["pixel_values"]
    assert get_adapter(model).vision_layout(inputs["input_ids"], None, inputs) is None
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with_pixels = internvl_prompt(model, [1, 10], [20], tiles=[1])
    layout = get_adapter(model).vision_layout(None, embeds, with_pixels)  # found by the placeholder embedding
    assert layout.grid_hw.tolist() == [[8, 8]]


def test_visionzip_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="pixel-shuffles"):
        lightkv.apply(tiny(), lightkv.VisionZip(dominant=20, contextual=4))
    assert not hasattr(tiny(), "_lightkv_handle")


def test_generate_keeps_the_predicted_counts_per_tile():
    """Under generate the prefill gets the encoded features, not pixel_values: the layout still holds."""
    model = tiny()
    method = lightkv.LightKV(**UNIFORM)
    inputs = batch_prompts([internvl_prompt(model, [1, 10, 11], [20, 21], tiles=[3], seed=1),
                            internvl_prompt(model, [1, 13], [25], tiles=[1, 2], seed=2)])
    with lightkv.apply(model, method) as handle:
        out = generate(model, inputs, max_new_tokens=3)
    expected = method.kept_per_layer(N_LAYERS, [(8, 8)] * 3)
    assert handle.stats.vision_tokens == [expected, expected]
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 3


# -- with the family's own image processor and a tokenizer from a tiny vocabulary ---------------------------------

def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(121)] + ["<img>", "</img>", "<IMG_CONTEXT>"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _processed(model, texts, images):
    """What ``InternVLProcessor`` returns: its image processor (``GotOcr2ImageProcessorPil``, the one
    ``AutoImageProcessor`` picks without torchvision) tiles the images; each ``<IMG_CONTEXT>`` placeholder becomes
    ``<img>`` + 64 x tiles ``<IMG_CONTEXT>`` + ``</img>`` (``InternVLProcessor.replace_image_token``; the processor
    class itself cannot be built without torchvision, for its video processor)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    size = model.config.vision_config.image_size
    processor = GotOcr2ImageProcessorPil(size={"height": size[0], "width": size[1]}, crop_to_patches=True,
                                         max_patches=4)
    flat = [image for row in images for image in row]
    pixels = processor(flat, return_tensors="pt")
    tiles = iter(pixels["num_patches"])
    per_tile = model.config.image_seq_length
    expanded = []
    for text in texts:
        parts = text.split("<IMG_CONTEXT>")
        expanded.append(parts[0] + "".join(f" <img> {'<IMG_CONTEXT> ' * (per_tile * int(next(tiles)))}</img> " + p
                                           for p in parts[1:]))
    tokenizer = _tokenizer()
    assert tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") == model.config.image_token_id
    batch = tokenizer(expanded, return_tensors="pt", padding=True, padding_side="left")
    return dict(batch, pixel_values=pixels["pixel_values"]), [int(n) for n in pixels["num_patches"]]


def test_generate_from_processor_output():
    from PIL import Image

    model = tiny()
    rng = np.random.RandomState(0)
    wide = Image.fromarray(rng.randint(0, 255, (40, 72, 3), dtype=np.uint8))
    square = Image.fromarray(rng.randint(0, 255, (30, 30, 3), dtype=np.uint8))
    inputs, tiles = _processed(model, ["<s> w1 <IMG_CONTEXT> w5 w6", "<s> w2 <IMG_CONTEXT> w3 <IMG_CONTEXT> w4"],
                               [[wide], [square, wide]])
    assert tiles[0] > 1  # the wide image is cut into tiles plus a thumbnail
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
    assert stats.vision_tokens == [method.kept_per_layer(N_LAYERS, [(8, 8)] * tiles[0]),
                                   method.kept_per_layer(N_LAYERS, [(8, 8)] * (tiles[1] + tiles[2]))]
    assert torch.equal(cached.sequences, uncached.sequences)


def test_real_size_spec():
    """``lightkv bench --model internvl3-8b``: InternVL3-8B's shapes (built on the meta device: no memory)."""
    from lightkv.perf import get_spec

    spec = get_spec("internvl3-8b")
    text, vision = spec.dims()
    assert (text.layers, text.hidden, text.heads, text.kv_heads, text.head_dim) == (28, 3584, 28, 4, 128)
    assert (vision.tokens, vision.patches, vision.cls_token) == (32 * 32 + 1, 256, True)
    assert spec.grid() == (16, 16)
    model = spec.build(device="meta", dtype=torch.bfloat16)
    assert isinstance(get_adapter(model), InternVLAdapter) and get_adapter(model).default_grid() == (16, 16)
    assert abs(sum(p.numel() for p in model.parameters()) / 7.94e9 - 1) < 0.01  # 7.94B parameters
