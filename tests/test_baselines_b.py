"""SparseVLM and VisionZip on tiny random LLaVA models (CLIP tower: 2 layers, 16x16 patches + CLS): exact counts,
CLS attention, contextual clusters, SparseVLM raters, continuation turns, towers without a CLS token, pre-encoded
images, settings and matched budgets.

The contracts every family x method x attention keeps (batched = unbatched, remove(), removing nothing =
unpatched, cached = uncached where it holds, ...) are checked once, from one table, in test_contract.py."""

import math

import pytest
import torch

import lightkv
from lightkv.methods.sparsevlm import rater_scores
from lightkv.testing import batch_prompts, tiny_llava

from helpers import TEXT_AFTER, TEXT_BEFORE, generate, hook_counts, mixed_prompts, one_image, run

N_LAYERS, GRID = 4, 16
VISION = list(range(4, 4 + GRID * GRID))  # positions of the image tokens in `one_image`

# name -> (method, vision tokens per layer for one 16x16 image, vision tokens after each stage)
# SparseVLM, per stage: n -> keep + clusters, recycled r = floor(0.3 p) + 1 of the p pruned, c = floor(0.1 r) + 1
#   256 -> 100 + 5 (p 156, r 47); 105 -> 60 + 2 (p 45, r 14); 62 -> 30 + 2 (p 32, r 10)
METHODS = {
    "sparsevlm": (lambda: lightkv.SparseVLM(layers=[0, 1, 2], keep_tokens=[100, 60, 30]),
                  [256, 105, 62, 32], [105, 62, 32]),
    "visionzip": (lambda: lightkv.VisionZip(dominant=40, contextual=8), [48, 48, 48, 48], [48]),
}


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return tiny_llava(num_layers=N_LAYERS, grid=GRID, attn_implementation=request.param)


@pytest.fixture(scope="module")
def eager_model():
    return tiny_llava(num_layers=N_LAYERS, grid=GRID, attn_implementation="eager")


def top_k(scores, positions, k):
    """The k positions with the highest score (ties: earlier position), sorted."""
    return sorted(sorted(positions, key=lambda p: (-scores[p], p))[:k])


def clip_cls_attention(model, pixel_values):
    """(I, P) CLS attention over the patches of the CLIP layer that makes LLaVA's features, from an eager
    run with output_attentions (independent of lightkv's q/k hooks)."""
    tower = model.model.vision_tower
    n = len(tower.encoder.layers)
    layer = model.config.vision_feature_layer % (n + 1) - 1  # hidden_states[h] is the output of layer h - 1
    previous = tower.config._attn_implementation
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = tower(pixel_values, output_attentions=True)
    finally:
        tower.set_attn_implementation(previous)
    return out.attentions[layer][:, :, 0, 1:].mean(dim=1)


# -- counts -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(METHODS))
def test_kept_counts_per_layer(model, name):
    method, expected, after = METHODS[name][0](), METHODS[name][1], METHODS[name][2]
    out, stats = run(model, method, one_image(model), use_cache=True)
    n_text = len(TEXT_BEFORE) + len(TEXT_AFTER)
    assert stats.vision_tokens == [expected]
    assert [layer.keys.shape[2] for layer in out.cache.layers] == [n_text + v for v in expected]
    assert stats.mean_retained_fraction == pytest.approx(sum(expected) / (N_LAYERS * 256))
    assert stats.uncompressed_vision_kv_bytes[0] == 256 * 2 * 2 * 16 * 4  # the prompt's 256 tokens, fp32
    assert method.kept_per_layer(N_LAYERS, [(GRID, GRID)]) == expected
    assert [len(kept) for kept in stats.kept_positions[0]] == after
    assert all(set(kept) <= set(VISION) for kept in stats.kept_positions[0])
    # logits keep the input's full length
    assert out.logits.shape[1] == one_image(model)["input_ids"].shape[1]


@pytest.mark.parametrize("name", list(METHODS))
def test_counts_are_per_image(eager_model, name):
    method, expected = METHODS[name][0](), METHODS[name][1]
    _, stats = run(eager_model, method, mixed_prompts(eager_model)[1])  # two images
    assert stats.vision_tokens == [[2 * v for v in expected]]
    assert method.kept_per_layer(N_LAYERS, [(GRID, GRID)] * 2) == stats.vision_tokens[0]


def test_small_images_and_counts_edge_cases(eager_model):
    inputs = one_image(eager_model)
    # more dominant tokens than patches: the image is left whole; contextual = 0 drops the rest
    _, stats = run(eager_model, lightkv.VisionZip(dominant=300, contextual=10), inputs)
    assert stats.vision_tokens == [[256] * N_LAYERS]
    _, stats = run(eager_model, lightkv.VisionZip(dominant=50, contextual=0), inputs)
    assert stats.vision_tokens == [[50] * N_LAYERS]
    _, stats = run(eager_model, lightkv.VisionZip(dominant=0, contextual=7), inputs)
    assert stats.vision_tokens == [[7] * N_LAYERS]
    # SparseVLM: keep >= tokens prunes nothing; recycle_ratio = 0 only prunes
    _, stats = run(eager_model, lightkv.SparseVLM(layers=[1], keep_tokens=[256]), inputs)
    assert stats.vision_tokens == [[256] * N_LAYERS]
    _, stats = run(eager_model, lightkv.SparseVLM(layers=[1], keep_tokens=[64], recycle_ratio=0.0), inputs)
    assert stats.vision_tokens == [[256, 256, 64, 64]]
    assert lightkv.SparseVLM(layers=[1], keep_tokens=[64], recycle_ratio=0.0).kept_after_each_stage(((16, 16),)) == [64]


# -- which tokens are kept ----------------------------------------------------------------------------------------


def test_visionzip_keeps_top_cls_attention_tokens(model):
    prompts = mixed_prompts(model)
    pixels = torch.cat([prompts[0]["pixel_values"], prompts[1]["pixel_values"]])
    cls = clip_cls_attention(model, pixels)  # (3, 256)
    _, stats = run(model, lightkv.VisionZip(dominant=40, contextual=0), batch_prompts(prompts))
    # sample 0: one image after 4 text tokens; sample 1: two images after 2 text tokens, one token between
    starts = [[4], [2, 2 + 256 + 1]]
    image = 0
    for sample in (0, 1):
        expected = []
        for start in starts[sample]:
            scores = {start + p: s for p, s in enumerate(cls[image].tolist())}
            expected += top_k(scores, list(scores), 40)
            image += 1
        assert stats.kept_positions[sample] == [sorted(expected)]
    assert stats.kept_positions[2] == [[]] and stats.vision_tokens[2] == [0] * N_LAYERS


def test_visionzip_contextual_tokens_are_cluster_averages(eager_model):
    model = eager_model
    inputs = one_image(model)
    cls = clip_cls_attention(model, inputs["pixel_values"])[0].tolist()
    dominant, contextual = 30, 6
    with torch.no_grad():
        features = encode(model, inputs["pixel_values"]).pooler_output[0]  # (256, D) decoder input embeddings
    keep_dom = top_k(dict(enumerate(cls)), list(range(256)), dominant)
    remaining = [p for p in range(256) if p not in keep_dom]
    step = len(remaining) // contextual
    targets = remaining[::step][:contextual]
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    groups = {t: [t] for t in targets}
    for p in remaining:
        if p not in targets:
            groups[targets[int((unit[p] @ unit[targets].T).argmax())]].append(p)

    seen = {}
    layer0 = model.model.language_model.layers[0]
    with lightkv.apply(model, lightkv.VisionZip(dominant=dominant, contextual=contextual), record=True) as handle:
        # registered after apply: sees layer 0's (already shortened) input
        spy = layer0.register_forward_pre_hook(
            lambda m, args, kwargs: seen.update(hidden=(args[0] if args else kwargs["hidden_states"]).clone(),
                                                pos=kwargs["position_ids"].clone()), with_kwargs=True)
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            spy.remove()
    kept = sorted(keep_dom + targets)
    assert handle.stats.kept_positions[0] == [[4 + p for p in kept]]
    n_text = len(TEXT_BEFORE) + len(TEXT_AFTER)
    hidden = seen["hidden"][0]
    assert hidden.shape[0] == n_text + dominant + contextual
    assert seen["pos"][0].tolist() == [0, 1, 2, 3] + [4 + p for p in kept] + list(range(260, 265))
    for slot, p in enumerate(kept):
        expected = features[groups[p]].mean(0) if p in groups else features[p]
        torch.testing.assert_close(hidden[4 + slot], expected, rtol=1e-5, atol=1e-5)
    assert any(len(g) > 1 for g in groups.values())  # the check above covered real merges


def test_sparsevlm_keeps_top_rated_tokens_at_every_stage(eager_model):
    """Scores recomputed from the eager attention maps of each stage layer (the sequence that layer saw)."""
    model = eager_model
    inputs = one_image(model)
    method = METHODS["sparsevlm"][0]()
    out, stats = run(model, method, inputs, output_attentions=True)
    text = [p for p in range(inputs["input_ids"].shape[1]) if p not in VISION]
    present = VISION
    for stage, layer in enumerate(method.layers):
        slots = sorted(text + present)
        attn = out.attentions[layer][0].mean(0)  # (M, M), mean over heads
        assert attn.shape[0] == len(slots)
        vision_slots = [i for i, p in enumerate(slots) if p in present]
        candidates = [i for i, p in enumerate(slots) if p in TEXT_AFTER_POSITIONS]
        relevance = attn[candidates][:, vision_slots].mean(1)
        raters = [c for c, r in zip(candidates, relevance.tolist()) if r >= relevance.mean().item()]
        scores = dict(zip(slots, attn[raters].mean(0).tolist()))
        n = len(present)
        keep, _, clusters = (int(x) for x in method.stage_counts(stage, torch.tensor([n])))
        # kept by score, then the cluster centers: the next highest-scored pruned tokens
        present = top_k(scores, present, keep + clusters)
        assert stats.kept_positions[0][stage] == present


TEXT_AFTER_POSITIONS = list(range(4 + GRID * GRID, 4 + GRID * GRID + len(TEXT_AFTER)))


def test_rater_scores_match_dense_attention():
    torch.manual_seed(0)
    B, H, Hkv, M, Dh = 2, 4, 2, 12, 8
    q, k = torch.randn(B, H, M, Dh), torch.randn(B, Hkv, M, Dh)
    valid = torch.ones(B, M, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    patches = torch.zeros(B, M, dtype=torch.bool)
    patches[:, 4:9] = True
    candidates = torch.zeros(B, M, dtype=torch.bool)
    candidates[:, 9:] = True
    scores, raters = rater_scores(q, k, candidates, patches, valid, 0.3)
    for b in range(B):
        kk = k[b].repeat_interleave(H // Hkv, dim=0)
        logits = (q[b] @ kk.transpose(1, 2)) * 0.3
        allowed = torch.tril(torch.ones(M, M, dtype=torch.bool)) & valid[b][None, :]
        attn = torch.softmax(logits.masked_fill(~allowed, -math.inf), dim=-1).mean(0)  # (M, M)
        cand = list(range(9, M))
        relevance = attn[cand][:, 4:9].mean(1)
        expected_raters = [c for c, r in zip(cand, relevance.tolist()) if r >= relevance.mean().item()]
        assert torch.nonzero(raters[b]).flatten().tolist() == expected_raters
        torch.testing.assert_close(scores[b], attn[expected_raters].mean(0))


# -- equivalences -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sparsevlm"])
@pytest.mark.parametrize("batch", [1, 2])
def test_cached_generate_equals_uncached(model, name, batch):
    """The same tokens, and the same first step (the prefill). SparseVLM's uncached steps re-rate with the
    generated tokens among the raters, so later logits move. (VisionZip is prompt-agnostic: every step agrees,
    test_contract.py's test_cached_generation_equals_uncached[llava-visionzip-*].)"""
    prompts = mixed_prompts(model)[:2] if batch == 2 else [one_image(model)]
    inputs = batch_prompts(prompts)
    with lightkv.apply(model, METHODS[name][0]()):
        cached = generate(model, inputs)
        uncached = generate(model, inputs, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.logits[0], uncached.logits[0], rtol=1e-4, atol=1e-4)


def test_text_continuation_on_visionzip_cache(model):
    """No layer holds the full prefill: a multi-token turn without position ids still matches a full run."""
    first = one_image(model)
    follow = torch.tensor([[40, 41, 42]])
    full = {"input_ids": torch.cat([first["input_ids"], follow], 1), "pixel_values": first["pixel_values"]}
    with lightkv.apply(model, METHODS["visionzip"][0]()), torch.no_grad():
        out = model(**first, use_cache=True)
        cont = model(input_ids=follow, cache=out.cache, use_cache=True)
        whole = model(**full, use_cache=False)
    torch.testing.assert_close(cont.logits[0], whole.logits[0, -3:], rtol=1e-4, atol=1e-4)
    assert [layer.keys.shape[2] for layer in cont.cache.layers] == [9 + 48 + 3] * N_LAYERS


# -- models without a CLS token, bad input ------------------------------------------------------------------------


def tiny_siglip_llava():
    """LLaVA with a SigLIP tower (no CLS token; every encoder token is a patch, strategy "full")."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=8, patch_size=2)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=64, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=63, image_seq_length=16,
                         vision_feature_select_strategy="full", pad_token_id=0)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def test_visionzip_needs_a_cls_token():
    model = tiny_siglip_llava()
    hooks_before = hook_counts(model)
    with pytest.raises(ValueError, match="CLS token.*SiglipVisionModel has none"):
        lightkv.apply(model, lightkv.VisionZip(dominant=8, contextual=2))
    assert hook_counts(model) == hooks_before and not hasattr(model, "_lightkv_handle")
    # the adapter counts no CLS in "full" mode for SigLIP: SparseVLM runs on the 4x4 = 16 patches
    inputs = {"input_ids": torch.tensor([[1, 2] + [63] * 16 + [3, 4]]), "pixel_values": torch.randn(1, 3, 8, 8)}
    _, stats = run(model, lightkv.SparseVLM(layers=[0], keep_tokens=[8]), inputs)
    assert stats.vision_tokens == [[16, 8 + 1]]


@pytest.mark.parametrize("feature_layer,match", [(0, "patch embeddings"), ([-2, -1], "single vision feature"),
                                                 (-4, "out of range")])
def test_visionzip_needs_one_attention_feature_layer(feature_layer, match):
    model = tiny_llava(num_layers=2, grid=4)
    model.config.vision_feature_layer = feature_layer
    with pytest.raises(ValueError, match=match):
        lightkv.apply(model, lightkv.VisionZip(dominant=8, contextual=2))
    assert not hasattr(model, "_lightkv_handle")


def encode(model, pixel_values):
    """What ``generate`` does before the prefill: run the vision encoder outside the model's forward."""
    with torch.no_grad():
        return model.model.get_image_features(pixel_values, vision_feature_layer=model.config.vision_feature_layer,
                                              vision_feature_select_strategy="default", return_dict=True)


def test_visionzip_on_pre_encoded_images(eager_model):
    model = eager_model
    inputs = one_image(model)
    ids = inputs["input_ids"]
    early = encode(model, inputs["pixel_values"])  # before apply: its CLS attention was never seen
    with lightkv.apply(model, lightkv.VisionZip(dominant=8, contextual=2), record=True) as handle, torch.no_grad():
        with pytest.raises(RuntimeError, match="no CLS attention"):
            model(input_ids=ids, mm_encoder_outputs={"image": early})
        by_pixels = model(**inputs).logits
        pixel_positions = handle.stats.kept_positions
        late = encode(model, inputs["pixel_values"])  # while applied: recognised by identity
        by_features = model(input_ids=ids, mm_encoder_outputs={"image": late}).logits
    assert handle.stats.kept_positions == pixel_positions
    torch.testing.assert_close(by_features, by_pixels)


@pytest.mark.parametrize("cls,kwargs,error,match", [
    ("SparseVLM", dict(layers=[2, 1], keep_tokens=[10, 5]), ValueError, "strictly increasing"),
    ("SparseVLM", dict(layers=[1, 1], keep_tokens=[10, 5]), ValueError, "strictly increasing"),
    ("SparseVLM", dict(layers=[-1], keep_tokens=[10]), ValueError, ">= 0"),
    ("SparseVLM", dict(layers=[], keep_tokens=[]), ValueError, "at least one"),
    ("SparseVLM", dict(layers=[1, 2], keep_tokens=[10]), ValueError, "one count per layer"),
    ("SparseVLM", dict(layers=[1], keep_tokens=[-1]), ValueError, ">= 0"),
    ("SparseVLM", dict(layers=[1], keep_tokens=[2.5]), TypeError, "integers"),
    ("SparseVLM", dict(layers="12", keep_tokens=[1, 2]), TypeError, "list of integers"),
    ("SparseVLM", dict(recycle_ratio=1.5), ValueError, r"\[0, 1\]"),
    ("SparseVLM", dict(cluster_ratio=-0.1), ValueError, r"\[0, 1\]"),
    ("SparseVLM", dict(recycle_ratio="0.3"), TypeError, r"\[0, 1\]"),
    ("SparseVLM", dict(positions="reset"), ValueError, "positions"),
    ("VisionZip", dict(dominant=-1), ValueError, ">= 0"),
    ("VisionZip", dict(contextual=1.5), TypeError, "integer"),
    ("VisionZip", dict(dominant=True), TypeError, "integer"),
    ("VisionZip", dict(dominant=0, contextual=0), ValueError, ">= 1"),
])
def test_bad_hyperparameters_raise(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        getattr(lightkv, cls)(**kwargs)


def test_stage_beyond_model_raises(eager_model):
    before = hook_counts(eager_model)
    with pytest.raises(ValueError, match="4 decoder layers"):
        lightkv.apply(eager_model, lightkv.SparseVLM(layers=[1, 4], keep_tokens=[10, 5]))
    assert hook_counts(eager_model) == before


def test_published_settings():
    assert lightkv.SparseVLM() == lightkv.SparseVLM.published(192)
    assert lightkv.SparseVLM.published(64).keep_tokens == (66, 30, 17)
    assert lightkv.SparseVLM.published(128).layers == (2, 6, 15)
    assert (lightkv.VisionZip.published(64).dominant, lightkv.VisionZip.published(64).contextual) == (54, 10)
    assert lightkv.VisionZip() == lightkv.VisionZip.published(192)
    for tokens in (64, 128, 192):
        method = lightkv.VisionZip.published(tokens)
        assert method.kept_per_layer(32, [(24, 24)]) == [tokens] * 32
    with pytest.raises(ValueError, match="64, 128, 192"):
        lightkv.VisionZip.published(100)
    # the published SparseVLM 192 schedule on LLaVA-1.5-7B: layers 0-2 see 576, then 300 + 27, 200 + 13, 110 + 10
    assert lightkv.SparseVLM().kept_per_layer(32, [(24, 24)]) == [576] * 3 + [309] * 4 + [204] * 9 + [113] * 16


# -- matched budgets ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sparsevlm", "visionzip"])
@pytest.mark.parametrize("target", [0.55, 0.35])
def test_matched_budget_equals_measured(eager_model, name, target):
    model = eager_model
    match = lightkv.match_budget(name, target, N_LAYERS, (GRID, GRID))
    _, stats = run(model, match.method, one_image(model))
    assert stats.vision_tokens[0] == match.kept_per_layer
    assert stats.mean_retained_fraction == pytest.approx(match.retained_fraction, abs=1e-12)
    assert abs(match.retained_fraction - target) < 0.02
    match2 = lightkv.match_budget(name, target, N_LAYERS, (GRID, GRID), num_images=2)
    _, stats2 = run(model, match2.method, mixed_prompts(model)[1])
    assert stats2.vision_tokens[0] == match2.kept_per_layer


def test_budget_on_llava_7b_depth():
    for target in (0.55, 0.35, 0.2):
        zip_match = lightkv.match_budget("visionzip", target, 32, 576)
        total = round(target * 576)
        assert zip_match.method.dominant + zip_match.method.contextual == total
        assert zip_match.retained_fraction == pytest.approx(total / 576)
        sparse = lightkv.match_budget("sparsevlm", target, 32, 576)
        assert sparse.method.layers == (2, 6, 15)
        assert abs(sparse.retained_fraction - target) < 2e-3
    # the published 64 / 128 / 192 VisionZip settings are what the 54:10 split gives
    for tokens, (dominant, contextual) in lightkv.methods.visionzip.VISIONZIP_SETTINGS.items():
        method = lightkv.match_budget("visionzip", tokens / 576, 32, 576).method
        assert (method.dominant, method.contextual) == (dominant, contextual)
