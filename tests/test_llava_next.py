"""LLaVA-NeXT and LLaVA-OneVision: any-resolution layouts (base + unpadded high-res grid, newline tokens), the
two ways of reading the grids (image_sizes vs the encoded features ``generate`` passes), newline tokens kept by
every method, exact kept counts, and clear refusals. The generic contracts run in test_contract.py."""

from __future__ import annotations

import functools
import inspect

import pytest
import torch

import lightkv
from lightkv.adapters import LlavaNextAdapter, LlavaOnevisionAdapter, get_adapter
from lightkv.adapters.llava_next import unpadded_grid
from lightkv.testing import batch_prompts, llava_next_prompt, tiny_llava_next, tiny_llava_onevision

from helpers import generate

N_LAYERS = 4
# kept_positions are diagnostics that newer engines record only on request
RECORD = {"record": True} if "record" in inspect.signature(lightkv.apply).parameters else {}


@functools.cache
def tiny(family: str):
    return (tiny_llava_next if family == "llava_next" else tiny_llava_onevision)(num_layers=N_LAYERS)


def _prompts(model):
    onevision = "Onevision" in type(model).__name__
    return [llava_next_prompt(model, [1, 10, 11], [20, 21, 22], image_sizes=[(20, 30)], seed=1),
            llava_next_prompt(model, [1, 13], [25, 26], image_sizes=[(30, 14), (24, 24)], seed=2),
            llava_next_prompt(model, [1, 14], [27], image_sizes=[(12, 40)], video_frames=2 if onevision else 0,
                              seed=3),
            llava_next_prompt(model, [1, 15, 16], [28, 29], image_sizes=[], seed=4)]


def _encoded_call(model, inputs):
    """What ``generate`` hands the prefill: the encoded features instead of pixel values / image sizes."""
    inner = model.model
    encoded = {}
    with torch.no_grad():
        if "pixel_values" in inputs:
            extra = {"batch_num_images": inputs["batch_num_images"]} if "batch_num_images" in inputs else {}
            encoded["image"] = inner.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True,
                                                        **extra)
        if "pixel_values_videos" in inputs:
            encoded["video"] = inner.get_video_features(inputs["pixel_values_videos"], return_dict=True)
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
            "mm_encoder_outputs": encoded}


def _grids_of(layout, sample):
    """(rows, cols) of the grids whose tokens sit in batch row ``sample``, in order."""
    indices = layout.image_index[sample]
    ids = indices[indices >= 0].unique_consecutive().tolist()
    return [tuple(layout.grid_hw[i].tolist()) for i in ids]


FAMILIES = ["llava_next", "llava_onevision"]


@pytest.mark.parametrize("family", FAMILIES)
def test_grids_from_image_sizes_and_from_encoded_features_agree(family):
    model = tiny(family)
    adapter = get_adapter(model)
    inputs = batch_prompts(_prompts(model))
    by_sizes = adapter.vision_layout(inputs["input_ids"], None, inputs)
    by_features = adapter.vision_layout(inputs["input_ids"], None, _encoded_call(model, inputs))
    for name in ("vision_mask", "image_index", "grid_rows", "grid_cols", "grid_hw"):
        assert torch.equal(getattr(by_sizes, name), getattr(by_features, name)), name
    # every image token is a vision token; the non-patch ones are exactly the newline vectors
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(inputs["input_ids"])
        encoded = _encoded_call(model, inputs)["mm_encoder_outputs"]
        features = torch.cat(list(encoded["image"].pooler_output))
        if "video" in encoded:
            features = torch.cat([features, encoded["video"].pooler_output.flatten(0, 1)])
    image_ids = [model.config.image_token_id, getattr(model.config, "video_token_id", -1)]
    assert torch.equal(by_sizes.vision_mask, torch.isin(inputs["input_ids"], torch.tensor(image_ids)))
    filled = embeds.masked_scatter(by_sizes.vision_mask[..., None], features.to(embeds.dtype))
    is_newline = (filled == model.model.image_newline.to(filled.dtype)).all(-1)
    assert torch.equal(is_newline, by_sizes.vision_mask & (by_sizes.image_index < 0))


def test_llava_next_layout_is_base_grid_then_unpadded_rows_with_newlines():
    model = tiny("llava_next")
    inputs = llava_next_prompt(model, [1], [2], image_sizes=[(20, 30)])
    layout = get_adapter(model).vision_layout(inputs["input_ids"], None, inputs)
    # 20x30 px (H x W): the 24x24 pinpoint keeps the most pixels -> 2x2 crops -> 12x12 tokens; the width fits
    # 30 px, so 20 * 12/30 = 8 rows carry the image and the padding rows above and below are cut off
    assert layout.grid_hw.tolist() == [[6, 6], list(unpadded_grid((20, 30), (2, 2), 6))] == [[6, 6], [8, 12]]
    tokens = layout.image_index[0][layout.vision_mask[0]]
    assert torch.equal(tokens[:36], torch.zeros(36, dtype=torch.long))
    rows = tokens[36:].view(8, 13)  # each high-res row: 12 patches, then the newline
    assert bool((rows[:, :12] == 1).all()) and bool((rows[:, 12] == -1).all())
    assert LlavaNextAdapter.image_grid(model.config) == (6, 6)  # budgets plan for the base grid


def test_onevision_shrinks_large_grids_and_lays_out_videos_and_multi_image_samples():
    model = tiny("llava_onevision")  # anyres_max_2: more than ~2 crops' worth of tokens is resized down
    adapter = get_adapter(model)
    single = llava_next_prompt(model, [1], [2], image_sizes=[(24, 24)], video_frames=2)
    layout = adapter.vision_layout(single["input_ids"], None, single)
    # 12x12 high-res tokens = 4 crops' worth > 2: ratio sqrt(144 / 72) -> 8x8; each video frame 3x3 (2x2 pooled)
    assert layout.grid_hw.tolist() == [[6, 6], [8, 8], [3, 3], [3, 3]]
    assert int((layout.vision_mask & (layout.image_index < 0)).sum()) == 8 + 1  # row newlines + the video's
    pair = llava_next_prompt(model, [1], [2], image_sizes=[(24, 24), (20, 30)])
    layout = adapter.vision_layout(pair["input_ids"], None, pair)
    assert layout.grid_hw.tolist() == [[6, 6], [6, 6]]  # several images in a sample: base grids only
    assert int((layout.vision_mask & (layout.image_index < 0)).sum()) == 2  # one newline after each


METHODS = {
    "lightkv": lambda: lightkv.LightKV(layers=[1, 2], windows=[2, 1], ratios=[0.5, 0.5]),
    "tome": lambda: lightkv.ToMe(layers=[1, 2], windows=[2, 1], ratios=[0.5, 0.5], size_weighted=True),
    "fastv": lambda: lightkv.FastV(layer=1, ratio=0.5),
    "pdrop": lambda: lightkv.PDrop(layers=[1, 2], ratio=0.5),
    "random": lambda: lightkv.Random(layer=1, ratio=0.5, seed=3),
    "dart": lambda: lightkv.DART(layer=1, ratio=0.5, num_pivots=2),
    "sparsevlm": lambda: lightkv.SparseVLM(layers=[1, 2], keep_tokens=[40, 20]),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_newlines_survive_every_stage_and_counts_match_the_prediction(family, method_name):
    model = tiny(family)
    method = METHODS[method_name]()
    prompts = _prompts(model)
    inputs = batch_prompts(prompts)
    layout = get_adapter(model).vision_layout(inputs["input_ids"], None, inputs)
    with lightkv.apply(model, method, **RECORD) as handle, torch.no_grad():
        model(**inputs)
    stats = handle.stats
    assert len(stats.kept_positions) == len(prompts)
    valid = inputs["attention_mask"].bool()
    for sample, prompt in enumerate(prompts):
        real = layout.vision_mask[sample][valid[sample]]
        newline_positions = set(torch.nonzero(real & (layout.image_index[sample][valid[sample]] < 0)).flatten().tolist())
        grids = _grids_of(layout, sample)
        expected = method.kept_per_layer(N_LAYERS, grids) if grids else [0] * N_LAYERS
        assert stats.vision_tokens[sample] == [n + len(newline_positions) for n in expected], sample
        for kept in stats.kept_positions[sample]:
            assert newline_positions <= set(kept)
    assert stats.vision_tokens[0][-1] < stats.vision_tokens[0][0]


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_reads_the_grids_back_from_the_features(family):
    """Under generate (images encoded before the prefill) the kept counts are those of the real grids."""
    model = tiny(family)
    prompts = _prompts(model)[:3]
    inputs = batch_prompts(prompts)
    layout = get_adapter(model).vision_layout(inputs["input_ids"], None, inputs)
    method = lightkv.LightKV(layers=[1, 2], windows=[2, 1], ratios=[0.5, 0.5], guidance="uniform")
    with lightkv.apply(model, method) as handle:
        cached = generate(model, inputs, max_new_tokens=3)
        stats = handle.stats
        uncached = generate(model, inputs, max_new_tokens=3, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for sample in range(len(prompts)):
        newlines = int((layout.vision_mask[sample] & (layout.image_index[sample] < 0)).sum())
        expected = method.kept_per_layer(N_LAYERS, _grids_of(layout, sample))
        assert stats.vision_tokens[sample] == [n + newlines for n in expected]


def test_visionzip_is_refused_clearly():
    with pytest.raises(ValueError, match="crops"):
        lightkv.apply(tiny("llava_next"), lightkv.VisionZip(dominant=20, contextual=4))
    with pytest.raises(ValueError, match="CLS token"):
        lightkv.apply(tiny("llava_onevision"), lightkv.VisionZip(dominant=20, contextual=4))
    assert not hasattr(tiny("llava_next"), "_lightkv_handle")


def test_bad_inputs_raise_clear_errors():
    model = tiny("llava_next")
    adapter = get_adapter(model)
    inputs = llava_next_prompt(model, [1], [2], image_sizes=[(20, 30)])
    with pytest.raises(ValueError, match="image_sizes"):
        adapter.vision_layout(inputs["input_ids"], None, {k: v for k, v in inputs.items() if k != "image_sizes"})
    wrong = dict(inputs, image_sizes=torch.tensor([[24, 24]]))  # describes more tokens than the prompt holds
    with pytest.raises(ValueError, match="image tokens"):
        adapter.vision_layout(inputs["input_ids"], None, wrong)
    # an image token id without features (e.g. spelled as text) is plain text, as for the model
    assert adapter.vision_layout(inputs["input_ids"], None, {}) is None
    assert isinstance(get_adapter(tiny("llava_onevision")), LlavaOnevisionAdapter)
