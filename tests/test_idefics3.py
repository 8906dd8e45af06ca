"""Idefics3 / SmolVLM specifics (the shared contracts are in test_contract.py): the tiles of an image stitched
into one grid from the prompt's markers, the global image its own grid, markers stay text, the <global-img> id
pinned or detected, and clear errors for prompts that break the layout."""

import pytest
import torch

import lightkv
from lightkv.adapters import get_adapter
from lightkv.core import window_index
from lightkv.adapters.idefics3 import Idefics3Adapter, SmolVLMAdapter
from lightkv.testing import (IDEFICS3_FAKE_TOKEN, IDEFICS3_GLOBAL_TOKEN, IDEFICS3_NEWLINE, IDEFICS3_ROW_COL_FIRST,
                             batch_prompts, idefics3_prompt, tiny_idefics3)

S = 4  # tokens per tile side in the tiny models


@pytest.fixture(scope="module")
def model():
    return tiny_idefics3(num_layers=2)


def _layout(model, inputs, adapter=None):
    adapter = adapter or get_adapter(model)
    return adapter.vision_layout(inputs["input_ids"], None, inputs)


def test_tiles_are_stitched_into_one_grid_and_the_global_image_is_its_own(model):
    inputs = idefics3_prompt(model, [1, 10], [20], images=[(2, 3)])
    layout = _layout(model, inputs)
    assert layout.grid_hw.tolist() == [[2 * S, 3 * S], [S, S]]
    ids = inputs["input_ids"][0]
    image = layout.image_index[0]
    for r in range(2):
        for c in range(3):
            marker = torch.nonzero(ids == IDEFICS3_ROW_COL_FIRST + 6 * r + c).flatten()
            assert marker.numel() == 1
            tile = slice(int(marker) + 1, int(marker) + 1 + S * S)  # the run right behind <row_r_col_c>
            assert (image[tile] == 0).all()
            local = torch.arange(S * S)
            assert torch.equal(layout.grid_rows[0, tile], r * S + local // S)
            assert torch.equal(layout.grid_cols[0, tile], c * S + local % S)
    glob = int(torch.nonzero(ids == IDEFICS3_GLOBAL_TOKEN).flatten()) + 1
    assert (image[glob:glob + S * S] == 1).all()
    assert torch.equal(layout.grid_rows[0, glob:glob + S * S], torch.arange(S * S) // S)
    markers = (ids == IDEFICS3_FAKE_TOKEN) | (ids == IDEFICS3_GLOBAL_TOKEN) | (ids == IDEFICS3_NEWLINE) \
        | ((ids >= IDEFICS3_ROW_COL_FIRST) & (ids < IDEFICS3_ROW_COL_FIRST + 36))
    assert not layout.vision_mask[0][markers].any() and (image[markers] == -1).all()


def test_pinned_detected_and_embedding_layouts_agree(model):
    inputs = batch_prompts([idefics3_prompt(model, [1, 10], [20], images=[(1, 2), (0, 0)], seed=1),
                            idefics3_prompt(model, [1, 13], [25], images=[(3, 1)], seed=2)])
    detected = _layout(model, inputs)
    assert detected.grid_hw.tolist() == [[S, 2 * S], [S, S], [S, S], [3 * S, S], [S, S]]
    pinned = _layout(model, inputs, Idefics3Adapter(model, global_image_token_id=IDEFICS3_GLOBAL_TOKEN))
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    from_embeds = get_adapter(model).vision_layout(None, embeds, inputs)
    for other in (pinned, from_embeds):
        for name in ("vision_mask", "image_index", "grid_rows", "grid_cols", "grid_hw"):
            assert torch.equal(getattr(other, name), getattr(detected, name)), name


def test_config_pins_the_global_id(model):
    model.config.global_image_token_id = IDEFICS3_FAKE_TOKEN  # wrong on purpose: no run follows it
    try:
        inputs = idefics3_prompt(model, [1, 10], [20], images=[(1, 2)])
        with pytest.raises(ValueError, match="global image"):
            _layout(model, inputs)
    finally:
        del model.config.global_image_token_id


def _tile(r, c):
    return [IDEFICS3_FAKE_TOKEN, IDEFICS3_ROW_COL_FIRST + 6 * r + c] + [127] * (S * S)


GLOBAL = [IDEFICS3_NEWLINE, IDEFICS3_FAKE_TOKEN, IDEFICS3_GLOBAL_TOKEN] + [127] * (S * S) + [IDEFICS3_FAKE_TOKEN]


@pytest.mark.parametrize("case, message", [
    ("short run", "run of 15 image tokens"),
    ("rows of different lengths", "rows of equal length"),
    ("no global image", "global image"),
])
def test_a_prompt_that_breaks_the_layout_is_a_clear_error(model, case, message):
    body = {
        "short run": [IDEFICS3_FAKE_TOKEN, IDEFICS3_GLOBAL_TOKEN] + [127] * (S * S - 1) + [IDEFICS3_FAKE_TOKEN],
        "rows of different lengths": _tile(0, 0) + _tile(0, 1) + [IDEFICS3_NEWLINE] + _tile(1, 0) + GLOBAL,
        # the last run of the prompt decides the global id: here a tile of an image whose global part is missing
        "no global image": _tile(0, 0) + GLOBAL + [21] + _tile(0, 0) + _tile(0, 1),
    }[case]
    ids = torch.tensor([[1, 10] + body + [20]])
    pinned = Idefics3Adapter(model, global_image_token_id=IDEFICS3_GLOBAL_TOKEN)
    with pytest.raises(ValueError, match=message):
        pinned.vision_layout(ids, None, {"pixel_values": torch.ones(1, 1, 3, 16, 16)})


def test_image_ids_without_features_are_text(model):
    inputs = idefics3_prompt(model, [1, 10], [20], images=[(1, 2)])
    assert get_adapter(model).vision_layout(inputs["input_ids"], None, {}) is None


def test_adapters_and_families():
    smol = tiny_idefics3(num_layers=2, smolvlm=True)
    assert type(get_adapter(smol)) is SmolVLMAdapter
    assert get_adapter(smol).language_model is smol.model.text_model
    assert Idefics3Adapter.image_grid(smol.config) == (S, S)
    assert Idefics3Adapter.image_grid(smol.config, max_pixels=40 * 40) == (3 * S, 3 * S)  # 3 x 3 tiles of 16 px
    assert lightkv.SUPPORTED_FAMILIES["idefics3"] == ("Idefics3ForConditionalGeneration", "Idefics3Model")
    assert lightkv.SUPPORTED_FAMILIES["smolvlm"] == ("SmolVLMForConditionalGeneration", "SmolVLMModel")


def test_windows_span_tile_borders(model):
    """Merge windows cut the stitched grid, not each tile: with 3 windows per side over 2x2 tiles of 4x4 tokens,
    the middle windows hold tokens of several tiles (a 16-token tile alone could not be cut so)."""
    inputs = idefics3_prompt(model, [1, 10], [20], images=[(2, 2)])
    layout = _layout(model, inputs)
    tiles = layout.image_index[0] == 0
    rows, cols = layout.grid_rows[0][tiles], layout.grid_cols[0][tiles]
    grid = layout.grid_hw[0]
    window = window_index(rows, cols, grid[0], grid[1], 3)
    tile_of = (rows // S) * 2 + cols // S
    middle = window == 4
    assert int(middle.sum()) == 9 and set(tile_of[middle].tolist()) == {0, 1, 2, 3}  # rows and cols 3..5
    with lightkv.apply(model, lightkv.ToMe(layers=[0], windows=[3], ratios=[0.5])) as handle, torch.no_grad():
        model(**inputs)
    assert handle.stats.vision_tokens[0] == lightkv.ToMe(layers=[0], windows=[3], ratios=[0.5]).kept_per_layer(
        2, ((2 * S, 2 * S), (S, S)))


# -- with the family's own processor (PIL image processor) and a tokenizer from a tiny vocabulary -----------------

def _processor():
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.idefics3.processing_idefics3 import Idefics3Processor

    special = ["\n"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)] \
        + ["<global-img>", "<fake_token_around_image>", "<image>"]
    words = ["<pad>", "<s>", "</s>", "<unk>", "<end_of_utterance>"] + [f"w{i}" for i in range(5, 128 - len(special))] \
        + special  # <image> = 127, the tiny model's image token id
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in special])  # newlines stay tokens
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    images = Idefics3ImageProcessorPil(size={"longest_edge": 48}, max_image_size={"longest_edge": 16},
                                       do_image_splitting=True)
    return Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=S * S)


def test_generate_from_processor_output():
    import numpy as np
    from PIL import Image

    from helpers import generate

    model = tiny_idefics3(num_layers=4)
    processor = _processor()
    rng = np.random.default_rng(0)
    wide, small = (Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)) for shape in ((30, 44, 3), (10, 12, 3)))
    images = [[wide], [small, wide]]
    inputs = dict(processor(text=["w10 w11 <image> w20", "w12 <image> w13 <image> w22"], images=images,
                            return_tensors="pt", padding=True, padding_side="left"))
    tiles = processor.image_processor([image for row in images for image in row], return_row_col_info=True)
    grids = []
    for rows, cols in zip([r for row in tiles["rows"] for r in row], [c for row in tiles["cols"] for c in row]):
        grids += ([(rows * S, cols * S)] if rows else []) + [(S, S)]
    layout = get_adapter(model).vision_layout(inputs["input_ids"], None, inputs)
    assert [tuple(g) for g in layout.grid_hw.tolist()] == grids and grids[0][0] > S  # the wide image is split
    model.config.global_image_token_id = processor.global_image_token_id
    try:
        pinned = get_adapter(model).vision_layout(inputs["input_ids"], None, inputs)
    finally:
        del model.config.global_image_token_id
    assert torch.equal(pinned.grid_rows, layout.grid_rows) and torch.equal(pinned.image_index, layout.image_index)

    with torch.no_grad():
        expected = model(**inputs).logits
    with lightkv.apply(model, lightkv.LightKV(layers=[1, 2], windows=[2, 1], ratios=[0.0, 0.0])), torch.no_grad():
        same = model(**inputs).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(same[valid], expected[valid], rtol=1e-5, atol=1e-5)
    method = lightkv.LightKV(layers=[1, 2], windows=[2, 1], ratios=[0.5, 0.5], guidance="uniform")
    with lightkv.apply(model, method) as handle:
        cached = generate(model, inputs, max_new_tokens=3)
        kept = handle.stats.vision_tokens
        uncached = generate(model, inputs, max_new_tokens=3, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    first = 2 if grids[0][0] > S else 1  # grids of the first sample's image
    assert kept == [method.kept_per_layer(4, tuple(grids[:first])), method.kept_per_layer(4, tuple(grids[first:]))]


def test_real_size_spec():
    """SmolVLM2-2.2B for the analytic tables: dims, the stitched 2x2-tile grid of the 672-px reference image, the
    analytic parameter count close to the random-weight model's (built on the meta device, no memory)."""
    from lightkv.perf import Workload, get_spec, predict_profile
    from lightkv.perf.memory import parameter_count

    spec = get_spec("smolvlm2-2.2b")
    t, v = spec.dims()
    assert (t.hidden, t.layers, t.heads, t.kv_heads) == (2048, 24, 32, 32)
    assert spec.grid() == (18, 18) and v.patches == 5 * 81  # 4 tiles + the global image, 9 x 9 tokens each
    model = spec.build(device="meta", dtype=torch.bfloat16)
    assert type(get_adapter(model)) is SmolVLMAdapter
    assert parameter_count(t, v) == pytest.approx(sum(p.numel() for p in model.parameters()), rel=5e-3)  # ~2.25 B
    method = lightkv.LightKV(**spec.reference_schedule())
    assert predict_profile(spec, method, Workload()).vision_tokens[0] == method.kept_per_layer(24, ((18, 18),))
