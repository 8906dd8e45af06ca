"""The contract every (model family x method x attention implementation) combination keeps, from one table.

Each case runs on a tiny random model of the family and a left-padded batch of prompts whose samples have
different images (one image, two images of other grids, a two-frame video for Qwen, no image): exact kept counts per layer equal the
method's own prediction (``kept_per_layer``), merges stay inside one image (and one window for the windowed
merges), text and marker tokens are never touched, a method that removes nothing gives the unpatched logits,
``remove()`` gives back bit-identical logits, a padded batch equals its samples run alone, a text-only prompt
passes through, and (for methods whose scores do not read generated tokens) cached generation equals
uncached generation.

Adding a family: one row in FAMILIES. Adding a method: one row in METHOD_CASES.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

import lightkv
from lightkv.adapters import get_adapter
from lightkv.core import window_index
from lightkv.testing import batch_prompts, llava_prompt, qwen_prompt, tiny_llava, tiny_qwen2_5_vl, tiny_qwen2_vl, \
    tiny_qwen3_vl
from lightkv.testing import internvl_prompt, tiny_internvl
from lightkv.testing import glm4v_prompt, tiny_glm4v

from lightkv.testing import mistral3_prompt, tiny_mistral3, tiny_pixtral_llava
from lightkv.testing import idefics3_prompt, tiny_idefics3
from lightkv.testing import llava_next_prompt, tiny_llava_next, tiny_llava_onevision
from lightkv.testing import gemma3_prompt, tiny_gemma3
from lightkv.testing import aya_vision_prompt, tiny_aya_vision
from helpers import check_batched_equals_unbatched, check_remove_restores, check_text_only_passes_through, generate

N_LAYERS = 4


@dataclass(frozen=True)
class Family:
    build: Callable  # (attn_implementation) -> model
    prompts: Callable  # (model) -> list of single-sample prompts, the last one without images
    grids: tuple  # per prompt: the (rows, cols) token grids of its images
    unmerged: tuple = ()  # per prompt: vision tokens in no grid, never merged (LLaVA-NeXT newlines)


def _llava_prompts(model):
    return [llava_prompt(model, [1, 10, 11, 12], [20, 21, 22, 23, 24], seed=1),
            llava_prompt(model, [1, 13], [25, 26, 27], num_images=2, seed=2),
            llava_prompt(model, [1, 14, 15, 16, 17, 18, 19], [28, 29], num_images=0, seed=3)]


def _qwen_prompts(model):
    return [qwen_prompt(model, [1, 10, 11, 12], [20, 21, 22, 23, 24], images=[(6, 8)], seed=1),
            qwen_prompt(model, [1, 13], [25, 26, 27], images=[(4, 10), (8, 4)], seed=2),
            qwen_prompt(model, [1, 14], [28, 29], images=[], videos=[(2, 4, 8)], seed=4),  # a frame is a grid
            qwen_prompt(model, [1, 14, 15, 16, 17], [28, 29], images=[], seed=3)]


QWEN_GRIDS = (((6, 8),), ((4, 10), (8, 4)), ((4, 8), (4, 8)), ())


def _internvl_prompts(model):  # an image of 2 tiles + thumbnail; images of 1 and 2 tiles; text only
    return [internvl_prompt(model, [1, 10, 11, 12], [20, 21, 22, 23, 24], tiles=[3], seed=1),
            internvl_prompt(model, [1, 13], [25, 26, 27], tiles=[1, 2], seed=2),
            internvl_prompt(model, [1, 14, 15, 16, 17], [28, 29], tiles=[], seed=3)]


def _glm4v_prompts(model):  # no video: GLM-4V fills image and video features by one token id, so transformers
    # cannot run a batch that mixes them (tests/test_glm4v.py runs videos alone)
    return [glm4v_prompt(model, [1, 10, 11, 12], [20, 21, 22, 23, 24], images=[(6, 8)], seed=1),
            glm4v_prompt(model, [1, 13], [25, 26, 27], images=[(4, 10), (8, 4)], seed=2),
            glm4v_prompt(model, [1, 14, 15, 16, 17], [28, 29], images=[], seed=3)]


GLM4V_GRIDS = (((6, 8),), ((4, 10), (8, 4)), ())


FAMILIES = {
    # each tile (thumbnail included) is its own 8x8 grid
    "internvl": Family(lambda attn: tiny_internvl(num_layers=N_LAYERS, attn_implementation=attn), _internvl_prompts,
                       (((8, 8),) * 3, ((8, 8),) * 3, ())),
    # GLM-4.1V, GLM-4.5V (MoE text model), GLM-4.6V: partial rotary, video frames under the image id
    "glm4v": Family(lambda attn: tiny_glm4v(num_layers=N_LAYERS, attn_implementation=attn), _glm4v_prompts,
                    GLM4V_GRIDS),
    "glm4v_moe": Family(lambda attn: tiny_glm4v(num_layers=N_LAYERS, attn_implementation=attn, variant="glm4v_moe"),
                        _glm4v_prompts, GLM4V_GRIDS),
    "glm46v": Family(lambda attn: tiny_glm4v(num_layers=N_LAYERS, attn_implementation=attn, variant="glm46v"),
                     _glm4v_prompts, GLM4V_GRIDS),
    "llava": Family(lambda attn: tiny_llava(num_layers=N_LAYERS, grid=8, attn_implementation=attn), _llava_prompts,
                    (((8, 8),), ((8, 8), (8, 8)), ())),
    "qwen2_vl": Family(lambda attn: tiny_qwen2_vl(num_layers=N_LAYERS, attn_implementation=attn), _qwen_prompts,
                       QWEN_GRIDS),
    "qwen2_5_vl": Family(lambda attn: tiny_qwen2_5_vl(num_layers=N_LAYERS, attn_implementation=attn), _qwen_prompts,
                         QWEN_GRIDS),
    # spatial_merge_size 1 (a patch a token), the bundled Qwen model's layout
    "qwen2_5_vl_merge1": Family(lambda attn: tiny_qwen2_5_vl(num_layers=N_LAYERS, attn_implementation=attn,
                                                            merge_size=1, seed=1), _qwen_prompts, QWEN_GRIDS),
    "qwen3_vl": Family(lambda attn: tiny_qwen3_vl(num_layers=N_LAYERS, attn_implementation=attn), _qwen_prompts,
                       QWEN_GRIDS),
}



def _mistral3_prompts(model):  # rows of [IMG] with [IMG_BREAK] / [IMG_END]: any aspect ratio
    return [mistral3_prompt(model, [1, 10, 11, 12], [20, 21, 22, 23, 24], images=[(6, 8)], seed=1),
            mistral3_prompt(model, [1, 13], [25, 26, 27], images=[(4, 6), (8, 4)], seed=2),
            mistral3_prompt(model, [1, 14, 15, 16, 17], [28, 29], images=[], seed=3)]


MISTRAL3_GRIDS = (((6, 8),), ((4, 6), (8, 4)), ())
# Ministral-3 text (llama_4 query scaling) in Mistral3; Pixtral-12B's layout: LLaVA with a Pixtral tower
FAMILIES["mistral3"] = Family(lambda attn: tiny_mistral3(num_layers=N_LAYERS, attn_implementation=attn),
                              _mistral3_prompts, MISTRAL3_GRIDS)
FAMILIES["pixtral"] = Family(lambda attn: tiny_pixtral_llava(num_layers=N_LAYERS, attn_implementation=attn),
                             _mistral3_prompts, MISTRAL3_GRIDS)


def _llava_next_prompts(model):  # base grid + unpadded high-res grid per image, a newline after each high-res row
    video = [llava_next_prompt(model, [1, 14], [28, 29], image_sizes=[], video_frames=2, seed=4)] \
        if hasattr(model.config, "video_token_id") else []
    return [llava_next_prompt(model, [1, 10, 11, 12], [20, 21, 22, 23, 24], image_sizes=[(20, 30)], seed=1),
            llava_next_prompt(model, [1, 13], [25, 26, 27], image_sizes=[(30, 14), (24, 24)], seed=2),
            *video, llava_next_prompt(model, [1, 14, 15, 16, 17], [28, 29], image_sizes=[], seed=3)]


FAMILIES["llava_next"] = Family(lambda attn: tiny_llava_next(num_layers=N_LAYERS, attn_implementation=attn),
                                _llava_next_prompts, (((6, 6), (8, 12)), ((6, 6), (12, 6), (6, 6), (12, 12)), ()),
                                unmerged=(8, 24, 0))
# OneVision: anyres_max_2 shrinks 8x12 to 6x10; two images in a sample are base grids only; a video's frames
FAMILIES["llava_onevision"] = Family(
    lambda attn: tiny_llava_onevision(num_layers=N_LAYERS, attn_implementation=attn), _llava_next_prompts,
    (((6, 6), (6, 10)), ((6, 6), (6, 6)), ((3, 3), (3, 3)), ()), unmerged=(6, 2, 1, 0))



def _idefics3_prompts(model):  # tiles of 4x4 tokens stitched per image (2x3 and 2x1 tiles), a global image each
    return [idefics3_prompt(model, [1, 10, 11, 12], [20, 21, 22, 23, 24], images=[(2, 3)], seed=1),
            idefics3_prompt(model, [1, 13], [25, 26, 27], images=[(0, 0), (2, 1)], seed=2),
            idefics3_prompt(model, [1, 14, 15, 16, 17], [28, 29], images=[], seed=3)]


IDEFICS3_GRIDS = (((8, 12), (4, 4)), ((4, 4), (8, 4), (4, 4)), ())
FAMILIES["idefics3"] = Family(lambda attn: tiny_idefics3(num_layers=N_LAYERS, attn_implementation=attn),
                              _idefics3_prompts, IDEFICS3_GRIDS)
FAMILIES["smolvlm"] = Family(lambda attn: tiny_idefics3(num_layers=N_LAYERS, attn_implementation=attn, smolvlm=True),
                             _idefics3_prompts, IDEFICS3_GRIDS)


def _gemma3_prompts(model):  # boi + 8x8 image tokens + eoi per image; every image prompt is longer than the window
    return [gemma3_prompt(model, [1, 10, 11, 12], [20, 21, 22, 23, 24], num_images=1, seed=1),
            gemma3_prompt(model, [1, 13], [25, 26, 27], num_images=2, seed=2),
            gemma3_prompt(model, [1, 14, 15, 16, 17], [28, 29], num_images=0, seed=3)]


# Gemma 3's hybrid decoder: sliding-window layers (window 24) and a full-attention layer, each with its own RoPE
# base, bidirectional attention inside an image; the stages (layers 1, 2) shorten one layer of each type
FAMILIES["gemma3"] = Family(
    lambda attn: tiny_gemma3(num_layers=N_LAYERS, attn_implementation=attn, sliding_window=24,
                             layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                          "sliding_attention"]),
    _gemma3_prompts, (((8, 8),), ((8, 8), (8, 8)), ()))



def _aya_vision_prompts(model):  # per image: tiles, the last one the global thumbnail, each an 8x8 grid
    return [aya_vision_prompt(model, [1, 10, 11, 12], [20, 21, 22, 23, 24], tiles=[2], seed=1),
            aya_vision_prompt(model, [1, 13], [25, 26, 27], tiles=[1, 2], seed=2),
            aya_vision_prompt(model, [1, 14, 15, 16, 17], [28, 29], tiles=[], seed=3)]


# Aya Vision's Cohere2 decoder: sliding-window layers with RoPE (window 24), a global layer without
FAMILIES["aya_vision"] = Family(lambda attn: tiny_aya_vision(num_layers=N_LAYERS, attn_implementation=attn),
                                _aya_vision_prompts, (((8, 8),) * 2, ((8, 8),) * 3, ()))

@dataclass(frozen=True)
class MethodCase:
    make: Callable[[], lightkv.Method]
    identity: Callable[[], lightkv.Method]  # the same method configured to remove nothing
    windows: tuple[int, ...] = ()  # windowed merges: windows per side of each stage (merges stay inside one)
    cached_equals_uncached: bool = True  # False where scores read the last token (a generated one when uncached)
    unsupported: dict = field(default_factory=dict)  # family -> error message pattern raised at apply


STAGES = dict(layers=[1, 2], windows=[2, 1])
METHOD_CASES = {
    "lightkv": MethodCase(lambda: lightkv.LightKV(**STAGES, ratios=[0.5, 0.5]),
                          lambda: lightkv.LightKV(**STAGES, ratios=[0.0, 0.0]), windows=(2, 1),
                          cached_equals_uncached=False),
    "lightkv_uniform": MethodCase(lambda: lightkv.LightKV(**STAGES, ratios=[0.5, 0.5], guidance="uniform"),
                                  lambda: lightkv.LightKV(**STAGES, ratios=[0.0, 0.0], guidance="uniform"),
                                  windows=(2, 1)),
    "lightkv_text_to_vision": MethodCase(
        lambda: lightkv.LightKV(**STAGES, ratios=[0.5, 0.3], guidance="text_to_vision"),
        lambda: lightkv.LightKV(**STAGES, ratios=[0.0, 0.0], guidance="text_to_vision"), windows=(2, 1),
        cached_equals_uncached=False),
    "tome_size_weighted": MethodCase(lambda: lightkv.ToMe(**STAGES, ratios=[0.5, 0.5], size_weighted=True),
                                     lambda: lightkv.ToMe(**STAGES, ratios=[0.0, 0.0], size_weighted=True),
                                     windows=(2, 1)),
    "random": MethodCase(lambda: lightkv.Random(layer=1, ratio=0.5, seed=3),
                         lambda: lightkv.Random(layer=1, ratio=0.0)),
    "fastv": MethodCase(lambda: lightkv.FastV(layer=1, ratio=0.5), lambda: lightkv.FastV(layer=1, ratio=0.0),
                        cached_equals_uncached=False),
    "pdrop": MethodCase(lambda: lightkv.PDrop(layers=[1, 2], ratio=0.5), lambda: lightkv.PDrop(layers=[1, 2], ratio=0.0),
                        cached_equals_uncached=False),
    "dart": MethodCase(lambda: lightkv.DART(layer=1, ratio=0.5, num_pivots=2),
                       lambda: lightkv.DART(layer=1, ratio=0.0, num_pivots=2)),
    "sparsevlm": MethodCase(lambda: lightkv.SparseVLM(layers=[1, 2], keep_tokens=[20, 10]),
                            lambda: lightkv.SparseVLM(layers=[1, 2], keep_tokens=[10_000, 10_000]),
                            cached_equals_uncached=False),
    "visionzip": MethodCase(lambda: lightkv.VisionZip(dominant=20, contextual=4),
                            lambda: lightkv.VisionZip(dominant=10_000, contextual=0),
                            unsupported={f: "CLS token" for f in ("qwen2_vl", "qwen2_5_vl", "qwen2_5_vl_merge1")} | {"qwen3_vl": "deepstack"}
                            | {f: "CLS token" for f in ("mistral3", "pixtral", "idefics3", "smolvlm")}
                            | {"internvl": "pixel-shuffles"}
                            | {f: "CLS token" for f in ("glm4v", "glm4v_moe", "glm46v")}),
}

METHOD_CASES["visionzip"].unsupported.update({"llava_next": "crops", "llava_onevision": "CLS token", "gemma3": "CLS token", "aya_vision": "CLS token"})


@functools.cache
def tiny(family: str, attn: str):
    return FAMILIES[family].build(attn)


CASES = [(f, m, a) for f in FAMILIES for m in METHOD_CASES for a in ("sdpa", "eager")]


@pytest.fixture(params=CASES, ids=lambda c: "-".join(c))
def case(request):
    family, method_name, attn = request.param
    spec, method_case = FAMILIES[family], METHOD_CASES[method_name]
    model = tiny(family, attn)
    pattern = method_case.unsupported.get(family)
    if pattern is not None:
        with pytest.raises(ValueError, match=pattern):
            lightkv.apply(model, method_case.make())
        assert not hasattr(model, "_lightkv_handle")
        pytest.skip(f"{method_name} refuses {family} at apply, as it should")
    return model, spec, method_case


def _run(model, method, inputs, **kwargs):
    with lightkv.apply(model, method, record=True) as handle, torch.no_grad():
        out = model(**inputs, use_cache=True, **kwargs)
    return out, handle.stats


def test_kept_counts_equal_the_prediction(case):
    model, spec, method_case = case
    method = method_case.make()
    prompts = spec.prompts(model)
    out, stats = _run(model, method, batch_prompts(prompts))
    for sample, grids in enumerate(spec.grids):
        expected = method.kept_per_layer(N_LAYERS, grids) if grids else [0] * N_LAYERS
        unmerged = spec.unmerged[sample] if spec.unmerged else 0
        assert stats.vision_tokens[sample] == [n + unmerged for n in expected], sample
    assert stats.vision_tokens[0][-1] < sum(h * w for h, w in spec.grids[0])  # the method did remove tokens
    # every layer caches the longest row: its real tokens, the rest is padding (a sliding-window cache layer:
    # its last window - 1 of them)
    tokens = [max(row[layer] for row in stats.tokens) for layer in range(N_LAYERS)]
    cache_layers = out.past_key_values.layers
    assert [layer.get_seq_length() for layer in cache_layers] == tokens
    assert [layer.keys.shape[2] for layer in cache_layers] == [
        min(n, layer.sliding_window - 1) if getattr(layer, "is_sliding", False) else n
        for n, layer in zip(tokens, cache_layers)]


def test_merges_stay_inside_one_image_and_window_and_text_is_untouched(case):
    model, spec, method_case = case
    inputs = batch_prompts(spec.prompts(model))
    _, stats = _run(model, method_case.make(), inputs)
    layout = get_adapter(model).vision_layout(inputs["input_ids"], None, inputs)
    valid = inputs["attention_mask"].bool()
    positions = torch.arange(inputs["input_ids"].shape[1]).expand_as(valid)
    text = valid & ~layout.vision_mask
    for stage, merge_map in enumerate(stats.merge_maps):
        assert torch.equal(merge_map[text], positions[text])  # text and markers live in themselves
        if not method_case.windows:
            continue
        patches = layout.image_index >= 0
        dest = merge_map.clamp(min=0)
        assert torch.equal(layout.image_index.gather(1, dest)[patches], layout.image_index[patches])
        grid = layout.grid_hw[layout.image_index.clamp(min=0)]
        windows = method_case.windows[stage]

        def window(rows, cols):
            return window_index(rows, cols, grid[..., 0], grid[..., 1], windows)

        here = window(layout.grid_rows, layout.grid_cols)
        there = window(layout.grid_rows.gather(1, dest), layout.grid_cols.gather(1, dest))
        assert torch.equal(there[patches], here[patches])


def test_removing_nothing_gives_the_unpatched_logits(case):
    model, spec, method_case = case
    inputs = batch_prompts(spec.prompts(model))
    with torch.no_grad():
        expected = model(**inputs).logits
    out, stats = _run(model, method_case.identity(), inputs)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(out.logits[valid], expected[valid], rtol=1e-5, atol=1e-5)
    unmerged = spec.unmerged[0] if spec.unmerged else 0
    assert stats.vision_tokens[0] == [sum(h * w for h, w in spec.grids[0]) + unmerged] * N_LAYERS


def test_remove_gives_back_the_model(case):
    model, spec, method_case = case
    check_remove_restores(model, batch_prompts(spec.prompts(model)), method_case.make())


def test_batched_equals_unbatched(case):
    model, spec, method_case = case
    check_batched_equals_unbatched(model, method_case.make(), N_LAYERS, new_tokens=3, prompts=spec.prompts(model))


def test_text_only_prompt_passes_through(case):
    model, spec, method_case = case
    check_text_only_passes_through(model, spec.prompts(model)[-1], method_case.make(), N_LAYERS)


def test_cached_generation_equals_uncached(case):
    model, spec, method_case = case
    if not method_case.cached_equals_uncached:
        pytest.skip("scores read the last token, a generated one in an uncached step (README FAQ)")
    inputs = batch_prompts(spec.prompts(model)[:2])
    with lightkv.apply(model, method_case.make()):
        cached = generate(model, inputs, max_new_tokens=3)
        uncached = generate(model, inputs, max_new_tokens=3, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
