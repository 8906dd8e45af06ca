"""Hybrid decoders. Gemma 3: five sliding-window layers, then a full-attention layer, each type with its own RoPE
base, bidirectional attention among one image's tokens at prefill, and a default cache with sliding-window layers.
Aya Vision (Cohere2): three sliding-window layers with RoPE, then a global layer without positions.

Tiny models with the real 5:1 pattern and a sliding window (24) smaller than every prompt with an image, so the
window matters at prefill and during generation longer than the window. The contract suite (test_contract.py)
runs every method on Gemma 3 too; this file checks what is specific to hybrid decoders.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache, StaticCache

import lightkv
from lightkv.engine.handle import layer_kinds
from lightkv.engine.masks import decode_mask
from lightkv.testing import aya_vision_prompt, batch_prompts, gemma3_prompt, tiny_aya_vision, tiny_gemma3
from helpers import KeepPositions, capture_attention_inputs, generate

WINDOW = 24
NEW = 30  # generated tokens: more than the sliding window


@functools.cache
def model_for(attn: str):
    return tiny_gemma3(num_layers=6, attn_implementation=attn, sliding_window=WINDOW)


def prompts(model):
    return [gemma3_prompt(model, [1, 10, 11], [20, 21, 22, 23], num_images=1, seed=1),
            gemma3_prompt(model, [1, 13], [25, 26], num_images=2, seed=2),
            gemma3_prompt(model, [1, 14, 15, 16, 17], [28, 29], num_images=0, seed=3)]


INPUTS = {"one_image": lambda m: prompts(m)[0], "two_images": lambda m: prompts(m)[1],
          "padded_batch": lambda m: batch_prompts(prompts(m))}


def test_the_tiny_model_has_the_real_layer_pattern():
    config = model_for("sdpa").config.text_config
    assert config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert config.rope_parameters["sliding_attention"]["rope_theta"] != config.rope_parameters["full_attention"]["rope_theta"]
    assert gemma3_prompt(model_for("sdpa"), [1], [2])["input_ids"].shape[1] > WINDOW


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("inputs", list(INPUTS))
def test_removing_nothing_is_bit_identical_at_prefill_and_every_decode_step(attn, inputs):
    model = model_for(attn)
    batch = INPUTS[inputs](model)
    reference = generate(model, batch, max_new_tokens=NEW)
    with lightkv.apply(model, lightkv.LightKV(layers=[1, 3], windows=[2, 1], ratios=[0.0, 0.0])) as handle:
        got = generate(model, batch, max_new_tokens=NEW)
    assert handle.stats.vision_tokens[0] == [64 * (2 if inputs == "two_images" else 1)] * 6
    assert torch.equal(got.sequences, reference.sequences)
    for a, b in zip(got.logits, reference.logits):
        assert torch.equal(a, b)


def test_the_default_cache_keeps_sliding_layers_and_shortened_layers_hold_their_slots():
    model = model_for("sdpa")
    inputs = prompts(model)[0]
    n = inputs["input_ids"].shape[1]
    method = lightkv.LightKV(layers=[1, 3], windows=[2, 1], ratios=[0.5, 0.5])
    with lightkv.apply(model, method) as handle, torch.no_grad():
        out = model(**inputs, use_cache=True)
    tokens = handle.stats.tokens[0]
    assert tokens[0] == n and tokens[2] < n and tokens[5] < tokens[2]
    cache = out.past_key_values
    assert [type(layer).__name__ for layer in cache.layers] == ["DynamicSlidingWindowLayer"] * 5 + ["DynamicLayer"]
    # a sliding-window layer keeps its last window - 1 slots (in slots: merged tokens are gone), the full one all
    assert [layer.keys.shape[2] for layer in cache.layers] == [min(t, WINDOW - 1) for t in tokens[:5]] + [tokens[5]]
    assert [layer.get_seq_length() for layer in cache.layers] == tokens


def _dropping_reference(model, inputs, dropped, after_layer, new_tokens):
    """Generation of the unpatched model in which, from decoder layer ``after_layer + 1`` on, no query may attend
    to the ``dropped`` (B, N) prompt positions: what dropping them after ``after_layer`` computes for every other
    token, with windows and the image block in original positions. Eager attention (every mask 4-D) and a cache
    of plain layers (so mask columns are original positions)."""
    N = dropped.shape[1]
    hooks = []

    def mask_dropped(module, args, kwargs):
        mask = kwargs["attention_mask"].clone()
        columns = min(N, mask.shape[-1])
        blocked = dropped[:, None, None, :columns].expand(-1, 1, mask.shape[2], -1)
        mask[..., :columns] = mask[..., :columns].masked_fill(blocked, torch.finfo(mask.dtype).min)
        return args, {**kwargs, "attention_mask": mask}

    for layer in model.model.language_model.layers[after_layer + 1:]:
        hooks.append(layer.register_forward_pre_hook(mask_dropped, with_kwargs=True))
    try:
        return generate(model, inputs, max_new_tokens=new_tokens, cache=DynamicCache())
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("inputs", ["one_image", "padded_batch"])
def test_dropping_tokens_equals_masking_them_in_original_positions(inputs):
    """Random pruning after layer 1 (a sliding layer) on the default sliding-window cache, generating past the
    window, equals the unpatched model that masks the same tokens out of every later layer's attention."""
    model = model_for("eager")
    batch = INPUTS[inputs](model)
    method = lightkv.Random(layer=1, ratio=0.5, seed=7)
    with lightkv.apply(model, method, record=True) as handle:
        got = generate(model, batch, max_new_tokens=NEW)
    stats = handle.stats
    valid = batch["attention_mask"].bool()
    image = batch["input_ids"] == model.config.image_token_id
    dropped = torch.zeros_like(valid)
    for b in range(valid.shape[0]):
        positions = torch.nonzero(valid[b]).flatten()  # real tokens, in order
        real_image = image[b][positions]
        kept = set(stats.kept_positions[b][0]) if stats.kept_positions[b] else set()
        for rank, position in enumerate(positions.tolist()):
            if real_image[rank] and rank not in kept:
                dropped[b, position] = True
    assert int(dropped.sum()) == {"one_image": 32, "padded_batch": 32 + 64}[inputs]  # half of each sample's patches
    reference = _dropping_reference(model, batch, dropped, after_layer=1, new_tokens=NEW)
    assert torch.equal(got.sequences, reference.sequences)
    for a, b in zip(got.logits, reference.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_generation_longer_than_the_window_equals_uncached(attn):
    model = model_for(attn)
    batch = batch_prompts(prompts(model)[:2])
    method = lightkv.LightKV(layers=[1, 3], windows=[2, 1], ratios=[0.5, 0.5], guidance="uniform")
    with lightkv.apply(model, method):
        cached = generate(model, batch, max_new_tokens=NEW)
        uncached = generate(model, batch, max_new_tokens=NEW, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_stage_on_the_full_attention_layer_and_before_the_decoder():
    """Stages on both layer types and a stage -1 (every layer short): cached generation equals uncached."""
    model = model_for("sdpa")
    batch = batch_prompts(prompts(model)[:2])
    for method in (lightkv.LightKV(layers=[0, 5], windows=[2, 1], ratios=[0.5, 0.5], guidance="uniform"),
                   KeepPositions(layers=(-1,), kept=[[list(range(0, 300, 2))]] * 2)):
        with lightkv.apply(model, method):
            cached = generate(model, batch, max_new_tokens=NEW)
            uncached = generate(model, batch, max_new_tokens=NEW, use_cache=False)
        assert torch.equal(cached.sequences, uncached.sequences), method
        for a, b in zip(cached.logits, uncached.logits):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_static_cache_is_refused_with_its_layer_types():
    model = model_for("sdpa")
    inputs = prompts(model)[0]
    cache = StaticCache(config=model.config.text_config, max_cache_len=200)
    with lightkv.apply(model, lightkv.LightKV(layers=[1, 3], windows=[2, 1], ratios=[0.5, 0.5])):
        with pytest.raises(ValueError, match="needs a DynamicCache.*StaticCache"):
            with torch.no_grad():
                model(**inputs, cache=cache, use_cache=True)


def test_layer_types_the_engine_cannot_shorten_are_refused():
    config = SimpleNamespace(layer_types=["sliding_attention", "chunked_attention", "full_attention"],
                             sliding_window=8)
    assert layer_kinds(config, 3, first_shortened=2) == [("sliding_attention", 8), ("chunked_attention", None),
                                                         ("full_attention", None)]
    with pytest.raises(ValueError, match="layer 1 is a 'chunked_attention' layer"):
        layer_kinds(config, 3, first_shortened=0)
    with pytest.raises(ValueError, match="sliding_window is None"):
        layer_kinds(SimpleNamespace(layer_types=["sliding_attention"], sliding_window=None), 1, first_shortened=0)
    assert layer_kinds(SimpleNamespace(), 2, first_shortened=0) == [("full_attention", None)] * 2


def test_decode_mask_window_counts_original_positions():
    # 6 prefill slots at original positions 0, 2, 5, 6, 8, 9 (of 10), 2 tokens decoded since, one new token at 12
    orig = torch.tensor([[0, 2, 5, 6, 8, 9]])
    valid = torch.ones_like(orig, dtype=torch.bool)
    full = decode_mask(orig, valid, prefill_length=10, decoded=2, q=1)
    assert full[0, 0, 0].tolist() == [True] * 9
    windowed = decode_mask(orig, valid, prefill_length=10, decoded=2, q=1, window=5)  # keys at 8..12
    assert windowed[0, 0, 0].tolist() == [False, False, False, False, True, True, True, True, True]
    # a sliding-window cache layer keeps its last 4 slots (positions 9, 10, 11) plus the new token
    tail = decode_mask(orig, valid, prefill_length=10, decoded=2, q=1, window=5, keep_last=4)
    assert tail[0, 0, 0].tolist() == [True, True, True, True]
    narrow = decode_mask(orig, valid, prefill_length=10, decoded=2, q=1, window=2, keep_last=4)  # keys 11, 12
    assert narrow[0, 0, 0].tolist() == [False, False, True, True]


def test_adapter_grid_and_layout():
    model = model_for("sdpa")
    adapter = lightkv.adapters.get_adapter(model)
    assert adapter.family == "gemma3" and adapter.default_grid() == (8, 8)
    inputs = batch_prompts(prompts(model))
    layout = adapter.vision_layout(inputs["input_ids"], None, inputs)
    assert layout.grid_hw.tolist() == [[8, 8]] * 3
    assert layout.vision_mask.sum(1).tolist() == [64, 128, 0]
    boi = inputs["input_ids"] == 125
    assert not bool((layout.vision_mask & boi).any())  # the image markers are text


# -- Aya Vision ----------------------------------------------------------------------------------------------------

@functools.cache
def aya_for(attn: str):
    return tiny_aya_vision(num_layers=4, attn_implementation=attn, sliding_window=WINDOW)


def aya_batch(model):
    return batch_prompts([aya_vision_prompt(model, [1, 10, 11], [20, 21, 22], tiles=[2], seed=1),
                          aya_vision_prompt(model, [1, 13], [25], tiles=[1, 2], seed=2),
                          aya_vision_prompt(model, [1, 14, 15], [28], tiles=[], seed=3)])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_aya_vision_removing_nothing_is_bit_identical_past_the_window(attn):
    model = aya_for(attn)
    assert model.config.text_config.layer_types == ["sliding_attention"] * 3 + ["full_attention"]
    batch = aya_batch(model)
    reference = generate(model, batch, max_new_tokens=NEW)
    with lightkv.apply(model, lightkv.LightKV(layers=[1, 3], windows=[2, 1], ratios=[0.0, 0.0])) as handle:
        got = generate(model, batch, max_new_tokens=NEW)
    assert handle.stats.vision_tokens == [[128] * 4, [192] * 4, [0] * 4]  # 8x8 tokens per tile
    assert torch.equal(got.sequences, reference.sequences)
    for a, b in zip(got.logits, reference.logits):
        assert torch.equal(a, b)


@pytest.mark.parametrize("guidance", ["uniform", "faithful"])
def test_aya_vision_stage_on_the_global_layer(guidance):
    """A stage on the global (NoPE) layer: its guidance reads unrotated queries and keys, as the model uses them;
    cached generation past the window equals uncached (uniform weights: guidance=faithful scores read the last
    token, see the README FAQ, so only its kept counts are checked)."""
    model = aya_for("sdpa")
    batch = aya_batch(model)
    method = lightkv.LightKV(layers=[1, 3], windows=[2, 1], ratios=[0.5, 0.5], guidance=guidance)
    with lightkv.apply(model, method) as handle:
        cached = generate(model, batch, max_new_tokens=NEW)
        kept = handle.stats.vision_tokens
        uncached = generate(model, batch, max_new_tokens=NEW, use_cache=False)
    assert kept[0] == method.kept_per_layer(4, [(8, 8)] * 2)
    assert kept[1] == method.kept_per_layer(4, [(8, 8)] * 3)
    if guidance == "uniform":
        assert torch.equal(cached.sequences, uncached.sequences)
        for a, b in zip(cached.logits, uncached.logits):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gemma3", "aya_vision"])
def test_guidance_queries_and_keys_are_the_models_own_on_every_layer_type(family):
    """The adapter's post-RoPE (or, on Aya's global layers, unrotated) queries and keys, with the mask the layer
    received, reproduce the attention probabilities the model itself computes (eager, output_attentions)."""
    model = model_for("eager") if family == "gemma3" else aya_for("eager")
    inputs = prompts(model)[0] if family == "gemma3" else aya_batch(model)
    adapter = lightkv.adapters.get_adapter(model)
    layers = adapter.decoder_layers
    out, seen = capture_attention_inputs(model, inputs)
    types = model.config.text_config.layer_types
    for i in (types.index("sliding_attention"), types.index("full_attention")):
        kwargs = seen[i]["kwargs"]
        q, k, scaling = adapter.queries_keys(layers[i], seen[i]["q"], seen[i]["k"], kwargs["position_embeddings"])
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        probs = torch.softmax(q @ k.transpose(-1, -2) * scaling + kwargs["attention_mask"], dim=-1)
        torch.testing.assert_close(probs, out.attentions[i], rtol=1e-4, atol=1e-5)
