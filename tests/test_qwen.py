"""The Qwen-VL adapters on tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL models: dynamic-resolution image grids
of any aspect ratio, several images and videos per prompt, 3-D M-RoPE positions, Qwen3-VL deepstack. The contracts
every family keeps (ratio 0, remove(), batched = unbatched, text-only, cached = uncached) are in test_contract.py."""

import functools

import pytest
import torch

import lightkv
from lightkv.adapters import get_adapter
from lightkv.testing import batch_prompts, qwen_prompt, tiny_qwen2_5_vl, tiny_qwen2_vl, tiny_qwen3_vl

from helpers import KeepPositions, generate, hook_counts, run

# "qwen2_5_vl_merge1": spatial_merge_size 1 (a patch a token), the bundled Qwen model's layout. Seed 1: with
# seed 0 the faithful-guidance batch-2 generation meets a top-2 logit gap of 0.006 at its 5th token, below the
# ~0.02 by which an uncached step's recomputed guidance moves the logits (see test_cached_generate_equals_uncached)
FAMILIES = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl, "qwen3_vl": tiny_qwen3_vl,
            "qwen2_5_vl_merge1": functools.partial(tiny_qwen2_5_vl, merge_size=1, seed=1)}
N_LAYERS = 4
SCHEDULE = dict(layers=[1, 2], windows=[2, 1], ratios=[0.5, 0.5])
TEXT_BEFORE, TEXT_AFTER = [1, 10, 11, 12], [20, 21, 22, 23, 24]


@functools.cache
def tiny(family, attn="sdpa"):
    return FAMILIES[family](num_layers=N_LAYERS, attn_implementation=attn)


@pytest.fixture(scope="module", params=[(f, a) for f in FAMILIES for a in ("sdpa", "eager")],
                ids=lambda p: "-".join(p))
def model(request):
    return tiny(*request.param)


@pytest.fixture(scope="module", params=list(FAMILIES))
def sdpa_model(request):
    return tiny(request.param)


def family_of(model):
    return get_adapter(model).family


def one_image(model, seed=1):
    return qwen_prompt(model, TEXT_BEFORE, TEXT_AFTER, images=[(6, 8)], seed=seed)


def rich_prompt(model):
    """Two images of different aspect ratios and a two-frame video: 48 + 40 + 2 x 32 vision tokens."""
    return qwen_prompt(model, TEXT_BEFORE, TEXT_AFTER, images=[(6, 8), (4, 10)], videos=[(2, 4, 8)], seed=5)


def mixed_prompts(model):
    """One 6x8 image; a 4x10 and an 8x4 image; a two-frame 4x8 video; no image (always last)."""
    return [
        one_image(model),
        qwen_prompt(model, [1, 13], [25, 26, 27], images=[(4, 10), (8, 4)], seed=2),
        qwen_prompt(model, [1, 14], [28, 29], images=[], videos=[(2, 4, 8)], seed=3),
        qwen_prompt(model, [1, 14, 15, 16, 17, 18, 19], [28, 29], images=[], seed=4),
    ]


# per prompt of `mixed_prompts`: vision tokens per layer under SCHEDULE (a W=2 stage needs >= 32 tokens a slice)
MIXED_COUNTS = [[48, 48, 24, 12], [72, 72, 36, 18], [64, 64, 32, 16], [0, 0, 0, 0]]


def slices_of(inputs, grids):
    """Per input position of a batch-1 prompt: (slice, row, col) of each vision token, None elsewhere.

    grids: (rows, cols) of each slice in prompt order (a video contributes one entry per frame)."""
    types = inputs["mm_token_type_ids"][0].tolist()
    out, k, slice_id = [], 0, 0
    for t in types:
        if t == 0:
            out.append(None)
            continue
        rows, cols = grids[slice_id]
        out.append((slice_id, k // cols, k % cols))
        k += 1
        if k == rows * cols:
            k, slice_id = 0, slice_id + 1
    return out


# -- layout -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batched", [False, True])
def test_layout_from_grids_and_from_positions(sdpa_model, batched):
    """The grids of every image and video frame, from image/video_grid_thw (a plain forward) and read back from
    the 3-D positions (what ``generate`` passes instead of the grids)."""
    model = sdpa_model
    prompts = [rich_prompt(model), mixed_prompts(model)[1]]
    inputs = batch_prompts(prompts) if batched else prompts[0]
    adapter = get_adapter(model)
    by_grids = adapter.vision_layout(inputs["input_ids"], None, inputs)
    expected = [[6, 8], [4, 10], [4, 10], [8, 4], [4, 8], [4, 8]] if batched else [[6, 8], [4, 10], [4, 8], [4, 8]]
    # image slices first (in batch order), then video frames
    assert by_grids.grid_hw.tolist() == expected
    keys = ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "attention_mask")
    positions, _ = model.model.get_rope_index(**{k: inputs[k] for k in keys})
    call = {"position_ids": positions, "mm_token_type_ids": inputs["mm_token_type_ids"]}
    by_positions = adapter.vision_layout(inputs["input_ids"], None, call)
    for name in ("vision_mask", "image_index", "grid_rows", "grid_cols", "grid_hw"):
        assert torch.equal(getattr(by_positions, name), getattr(by_grids, name)), name
    # vision start / end markers are text: never mergeable
    markers = (inputs["input_ids"] == model.config.vision_start_token_id) | \
        (inputs["input_ids"] == model.config.vision_end_token_id)
    assert bool((by_grids.image_index[markers] == -1).all()) and not bool(by_grids.vision_mask[markers].any())
    # rows and columns follow each slice's raster order
    first_frame = (by_grids.image_index[0] == (4 if batched else 2)).nonzero().flatten()
    assert by_grids.grid_rows[0, first_frame].tolist() == [r for r in range(4) for _ in range(8)]
    assert by_grids.grid_cols[0, first_frame].tolist() == list(range(8)) * 4


def test_grids_that_do_not_match_the_tokens_raise(sdpa_model):
    inputs = one_image(sdpa_model)
    bad = {**inputs, "image_grid_thw": torch.tensor([[1, 12, 14]])}  # 42 tokens, the prompt holds 48
    with lightkv.apply(sdpa_model, lightkv.LightKV(**SCHEDULE)), pytest.raises(ValueError, match="image_grid_thw"):
        sdpa_model(**bad)


def test_inputs_embeds_and_model_entry(sdpa_model):
    """Vision tokens found from mm_token_type_ids, or from the placeholder embeddings; the Qwen*VLModel entry."""
    model = sdpa_model
    inputs = one_image(model)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    pixels = {k: inputs[k] for k in ("pixel_values", "image_grid_thw")}
    with lightkv.apply(model, lightkv.LightKV(**SCHEDULE)) as handle, torch.no_grad():
        model(inputs_embeds=embeds, mm_token_type_ids=inputs["mm_token_type_ids"], **pixels)
        assert handle.stats.vision_tokens == [MIXED_COUNTS[0]]
        model(inputs_embeds=embeds, **pixels)
        assert handle.stats.vision_tokens == [MIXED_COUNTS[0]]
    with lightkv.apply(model.model, lightkv.LightKV(**SCHEDULE)) as handle, torch.no_grad():
        model.model(**inputs)
    assert handle.stats.vision_tokens == [MIXED_COUNTS[0]]


def test_missing_mm_token_type_ids_warns(caplog):
    model = tiny("qwen2_5_vl")
    inputs = {k: v for k, v in one_image(model).items() if k != "mm_token_type_ids"}
    with lightkv.apply(model, lightkv.LightKV(**SCHEDULE)), torch.no_grad(), caplog.at_level("WARNING", "lightkv"):
        model(**inputs)
    assert "mm_token_type_ids" in caplog.text


# -- counts -------------------------------------------------------------------------------------------------------


def test_cache_lengths_per_layer(model):
    inputs = rich_prompt(model)
    n = inputs["input_ids"].shape[1]
    n_text = n - 152
    with lightkv.apply(model, lightkv.LightKV(**SCHEDULE), record=True) as handle, torch.no_grad():
        out = model(**inputs, use_cache=True)
    vision = [152, 152, 76, 38]  # per image / frame: 48 -> 24 -> 12, 40 -> 20 -> 10, 32 -> 16 -> 8 (x2)
    assert [layer.keys.shape[2] for layer in out.cache.layers] == [n_text + v for v in vision]
    assert handle.stats.vision_tokens == [vision]
    assert handle.stats.tokens == [[n_text + v for v in vision]]
    assert out.logits.shape[:2] == (1, n)

    # merges stay inside one image or frame and inside one window; text and markers are never merged
    coords = slices_of(inputs, [(6, 8), (4, 10), (4, 8), (4, 8)])
    bands = [(3, 4), (2, 5), (2, 4), (2, 4)]  # rows / cols per band of the 2x2 windows of each slice
    stage1, stage2 = (m[0].tolist() for m in handle.stats.merge_maps)
    for p, dest in enumerate(stage1):
        if coords[p] is None:
            assert dest == p and stage2[p] == p
        elif dest != p:
            (s, r, c), (s2, r2, c2) = coords[p], coords[dest]
            h, w = bands[s]
            assert s2 == s and (r // h, c // w) == (r2 // h, c2 // w)
    for p, dest in enumerate(stage2):
        if coords[p] is not None:
            assert coords[dest][0] == coords[p][0]  # stage 2: one window per slice, still never across frames


def test_several_images_and_video_in_one_batch(model):
    with lightkv.apply(model, lightkv.LightKV(**SCHEDULE)) as handle, torch.no_grad():
        model(**batch_prompts(mixed_prompts(model)))
    assert handle.stats.vision_tokens == MIXED_COUNTS
    assert handle.stats.retained_fraction[3] is None


# -- equivalences -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", ["faithful"])  # uniform: tests/test_contract.py (every step identical)
@pytest.mark.parametrize("batch", [1, 2])
def test_cached_generate_equals_uncached(model, guidance, batch):
    prompts = mixed_prompts(model)[1:3] if batch == 2 else [one_image(model)]  # batch 2: images + a video
    inputs = batch_prompts(prompts)
    with lightkv.apply(model, lightkv.LightKV(**SCHEDULE, guidance=guidance)) as handle:
        cached = generate(model, inputs, max_new_tokens=5)
        assert handle.stats.vision_tokens == ([MIXED_COUNTS[0]] if batch == 1 else MIXED_COUNTS[1:3])
        uncached = generate(model, inputs, max_new_tokens=5, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.logits[0], uncached.logits[0], rtol=1e-4, atol=1e-4)
    if guidance == "uniform":  # identical merges at every uncached step (see test_llava)
        for a, b in zip(cached.logits, uncached.logits):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_generate_prefill_keeps_what_a_forward_keeps(sdpa_model):
    """``generate`` passes 3-D positions and encoder outputs instead of the grids: the same tokens are kept."""
    model = sdpa_model
    inputs = batch_prompts(mixed_prompts(model)[:3])
    with lightkv.apply(model, lightkv.LightKV(**SCHEDULE), record=True) as handle:
        with torch.no_grad():
            model(**inputs)
        forward_stats = handle.stats
        generate(model, inputs, max_new_tokens=1)
    assert handle.stats.kept_positions == forward_stats.kept_positions
    assert handle.stats.vision_tokens == MIXED_COUNTS[:3]


# -- positions ----------------------------------------------------------------------------------------------------


def position_spy(model, layers):
    """Records the cos of the rotary embeddings each decoder layer receives, per call."""
    seen = {i: [] for i in layers}
    hooks = [model.model.language_model.layers[i].register_forward_pre_hook(
        lambda m, a, kw, i=i: seen[i].append(kw["position_embeddings"][0].clone()), with_kwargs=True) for i in layers]
    return seen, hooks


def full_positions(model, inputs):
    keys = ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "attention_mask")
    positions, _ = model.model.get_rope_index(**{k: inputs[k] for k in keys if k in inputs})
    return positions  # (3, B, N)


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_kept_tokens_keep_their_3d_positions(sdpa_model, positions):
    model = sdpa_model
    inputs = rich_prompt(model)
    with lightkv.apply(model, lightkv.LightKV(**SCHEDULE, positions=positions), record=True) as handle, torch.no_grad():
        seen, hooks = position_spy(model, [2, 3])  # registered after lightkv's hooks: sees what the layer gets
        try:
            model(**inputs)
        finally:
            for h in hooks:
                h.remove()
    rotary = model.model.language_model.rotary_emb
    pos3d = full_positions(model, inputs)
    x = torch.zeros(1, 1, dtype=torch.float32)
    for stage, layer in enumerate([2, 3]):
        kept = handle.stats.merge_maps[stage][0].unique()  # input positions still present after the stage
        if positions == "original":  # each kept token keeps its (temporal, row, column) position
            expected = rotary(x, pos3d[:, :, kept])[0]
            assert not torch.equal(pos3d[1, 0, kept], pos3d[2, 0, kept])  # really 3-D
        else:  # the reference renumbering: 0..N'-1 in sequence order, on all three axes
            expected = rotary(x, torch.arange(len(kept)).expand(3, 1, -1))[0]
        torch.testing.assert_close(seen[layer][0], expected)


@pytest.mark.parametrize("stage_layer", [1, -1])
def test_decoding_continues_at_the_uncompressed_positions(sdpa_model, stage_layer):
    """A follow-up turn on the compressed cache, positions left to the model (cache length + rope_deltas): the
    decoder sees the positions the unpatched model uses, and the logits equal a full uncached run's."""
    model = sdpa_model
    first = one_image(model)
    vision = (first["mm_token_type_ids"][0] > 0).nonzero().flatten().tolist()
    if stage_layer == 1:
        method = lightkv.LightKV(**SCHEDULE, guidance="uniform")
    else:  # before the decoder: no layer holds the full prefill, the engine supplies the positions
        method = KeepPositions(layers=(-1,), kept=[[vision[::3]]])
    if family_of(model) == "qwen3_vl" and stage_layer == -1:
        with pytest.raises(ValueError, match="deepstack"):
            lightkv.apply(model, method)
        return
    follow = torch.tensor([[40, 41, 42]])
    full = {**first, "input_ids": torch.cat([first["input_ids"], follow], 1),
            "attention_mask": torch.ones(1, first["input_ids"].shape[1] + 3, dtype=torch.long),
            "mm_token_type_ids": torch.cat([first["mm_token_type_ids"], torch.zeros_like(follow)], 1)}
    seen, hooks = position_spy(model, [0, 3])
    try:
        with torch.no_grad():
            ref = model(**first, use_cache=True)
            model(input_ids=follow, cache=ref.cache, use_cache=True)
            with lightkv.apply(model, method):
                out = model(**first, use_cache=True)
                cont = model(input_ids=follow, cache=out.cache, use_cache=True)
                whole = model(**full, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    for layer in (0, 3):
        torch.testing.assert_close(seen[layer][3], seen[layer][1])  # follow-up turn: compressed vs unpatched
    torch.testing.assert_close(cont.logits[0], whole.logits[0, -3:], rtol=1e-4, atol=1e-4)


# -- what cannot run on Qwen --------------------------------------------------------------------------------------


def test_visionzip_needs_a_cls_token(sdpa_model):
    hooks_before = hook_counts(sdpa_model)
    match = "deepstack" if family_of(sdpa_model) == "qwen3_vl" else "CLS token"  # Qwen3-VL: stage -1 is early
    with pytest.raises(ValueError, match=match):
        lightkv.apply(sdpa_model, lightkv.VisionZip(dominant=16, contextual=4))
    assert hook_counts(sdpa_model) == hooks_before


@pytest.mark.parametrize("method,ok", [
    (lightkv.LightKV(layers=[1, 3], windows=[2, 1], ratios=[0.5, 0.5]), False),
    (lightkv.LightKV(layers=[2, 3], windows=[2, 1], ratios=[0.5, 0.5]), True),
    (lightkv.FastV(layer=0), False),
    (lightkv.FastV(layer=2), True),
    (lightkv.PDrop(layers=[1, 2, 3]), False),
])
def test_qwen3_stages_must_follow_the_deepstack_layers(method, ok):
    model = tiny_qwen3_vl(num_layers=N_LAYERS, deepstack_layers=2)  # deepstack after layers 0 and 1
    if not ok:
        hooks_before = hook_counts(model)
        with pytest.raises(ValueError, match=r"deepstack .* layers 0\.\.1.*>= 2"):
            lightkv.apply(model, method)
        assert hook_counts(model) == hooks_before
        return
    inputs = rich_prompt(model)
    with lightkv.apply(model, method) as handle:
        cached = generate(model, inputs, max_new_tokens=3)
        assert handle.stats.vision_tokens[0][:3] == [152, 152, 152] and handle.stats.vision_tokens[0][3] < 152
        uncached = generate(model, inputs, max_new_tokens=3, use_cache=False)
    torch.testing.assert_close(cached.logits[0], uncached.logits[0], rtol=1e-4, atol=1e-4)


# -- baselines on Qwen2.5-VL ----------------------------------------------------------------------------------------

# name -> (method, vision tokens per layer for one 6x8 image)
BASELINES = {
    "random": (lambda: lightkv.Random(layer=1, seed=3), [48, 48, 24, 24]),
    "tome": (lambda: lightkv.ToMe(**SCHEDULE), [48, 48, 24, 12]),
    "fastv": (lambda: lightkv.FastV(layer=1), [48, 48, 24, 24]),
    "pdrop": (lambda: lightkv.PDrop(layers=[0, 1, 2]), [48, 24, 12, 6]),
    "dart": (lambda: lightkv.DART(layer=1), [48, 48, 24, 24]),
    # keep 20 + 1 recycled cluster of the 9 best pruned, then 10 + 1, then 5 + 1
    "sparsevlm": (lambda: lightkv.SparseVLM(layers=[0, 1, 2], keep_tokens=[20, 10, 5]), [48, 21, 11, 6]),
}


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def qwen25(request):
    return tiny("qwen2_5_vl", request.param)


@pytest.mark.parametrize("name", list(BASELINES))
def test_baseline_kept_counts(qwen25, name):
    method, expected = BASELINES[name][0](), BASELINES[name][1]
    inputs = one_image(qwen25)
    out, stats = run(qwen25, method, inputs, use_cache=True)
    n_text = inputs["input_ids"].shape[1] - 48
    assert stats.vision_tokens == [expected]
    assert method.kept_per_layer(N_LAYERS, [(6, 8)]) == expected
    assert [layer.keys.shape[2] for layer in out.cache.layers] == [n_text + v for v in expected]


# random, tome and dart: every uncached step keeps the same tokens, in tests/test_contract.py
@pytest.mark.parametrize("name", ["fastv", "pdrop", "sparsevlm"])
@pytest.mark.parametrize("batch", [1, 2])
def test_baseline_cached_generate_equals_uncached(qwen25, name, batch):
    model = qwen25
    inputs = batch_prompts(mixed_prompts(model)[1:3] if batch == 2 else [one_image(model)])
    method = BASELINES[name][0]()
    with lightkv.apply(model, method, record=True) as handle:
        cached = generate(model, inputs)
        kept = handle.stats.kept_positions
        uncached = generate(model, inputs, use_cache=False)
    torch.testing.assert_close(cached.logits[0], uncached.logits[0], rtol=1e-4, atol=1e-4)  # the same prefill
    if name == "sparsevlm":
        return  # uncached steps re-rate with the generated tokens among the raters, and recycled merges differ
    if name in ("fastv", "pdrop"):
        # uncached steps re-score with the newest token; decoding on the pruned cache equals recomputing
        # everything with the same tokens pruned
        with lightkv.apply(model, KeepPositions(layers=method.stage_layers, kept=kept)):
            uncached = generate(model, inputs, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
