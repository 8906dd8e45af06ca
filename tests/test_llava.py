"""LightKV on tiny random LLaVA models (Llama text model with GQA, CLIP tower with a 16x16 token grid): exact
counts, cache lengths and KV bytes, merge maps, positions, prompt-guided cached generation, beam search and
sampling, continuation turns, bad input, entry points and isolation.

The contracts every family x method x attention keeps (kept counts = the prediction, merges inside one window,
removing nothing = unpatched, remove(), batched = unbatched, text-only pass-through, cached = uncached where it
holds) are checked once, from one table, in test_contract.py."""

import logging
import threading

import pytest
import torch

import lightkv
from lightkv.testing import batch_prompts, llava_prompt, tiny_llava

from helpers import check_remove_restores, check_text_only_passes_through, hook_counts

SCHEDULE = dict(layers=[1, 2], windows=[2, 1], ratios=[0.5, 0.5])
GRID_TOKENS = 256


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return tiny_llava(attn_implementation=request.param)


@pytest.fixture(scope="module")
def sdpa_model():
    return tiny_llava(attn_implementation="sdpa")


def one_image(model, seed=1):
    return llava_prompt(model, [1, 10, 11, 12], [20, 21, 22, 23, 24], seed=seed)


def mixed_prompts(model):
    return [
        llava_prompt(model, [1, 10, 11, 12], [20, 21, 22, 23, 24], seed=1),
        llava_prompt(model, [1, 13], [25, 26, 27], num_images=2, seed=2),
        llava_prompt(model, [1, 14, 15, 16, 17, 18, 19], [28, 29], num_images=0, seed=3),
        llava_prompt(model, [1, 30, 31], [32], seed=4),
    ]


def generate(model, inputs, **kwargs):
    kwargs.setdefault("max_new_tokens", 6)
    kwargs.setdefault("do_sample", False)
    return model.generate(**inputs, output_logits=True, return_dict_in_generate=True, **kwargs)



# -- the acceptance check ---------------------------------------------------------------------------------


def test_cache_lengths_per_layer(model):
    inputs = one_image(model)
    n_text = inputs["input_ids"].shape[1] - GRID_TOKENS
    with lightkv.apply(model, lightkv.LightKV(**SCHEDULE)) as handle, torch.no_grad():
        out = model(**inputs, use_cache=True)
    lengths = [layer.keys.shape[2] for layer in out.cache.layers]
    assert lengths == [n_text + 256, n_text + 256, n_text + 128, n_text + 64]
    assert handle.stats.vision_tokens == [[256, 256, 128, 64]]
    assert handle.stats.tokens == [[n_text + 256, n_text + 256, n_text + 128, n_text + 64]]
    assert handle.stats.mean_retained_fraction == pytest.approx((256 + 256 + 128 + 64) / (4 * 256))
    # logits keep the input's full length: merged positions read the token they were merged into
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    # KV bytes are read from the real cache
    for i, layer in enumerate(out.cache.layers):
        assert handle.stats.kv_bytes[i] == layer.keys.numel() * 4 + layer.values.numel() * 4
    per_token = 2 * 2 * 16 * 4  # keys+values, 2 KV heads, head_dim 16, fp32
    assert handle.stats.vision_kv_bytes == [256 * per_token, 256 * per_token, 128 * per_token, 64 * per_token]
    assert handle.stats.vision_kv_ratio == pytest.approx(704 / 1024)


def test_predicted_fraction_matches_run(sdpa_model):
    method = lightkv.LightKV(**SCHEDULE)
    with lightkv.apply(sdpa_model, method) as handle, torch.no_grad():
        sdpa_model(**one_image(sdpa_model))
    assert method.kept_per_layer(4, [(16, 16)]) == handle.stats.vision_tokens[0]
    assert lightkv.retained_fraction(method, 4, [(16, 16)]) == pytest.approx(handle.stats.mean_retained_fraction)


# -- equivalences -------------------------------------------------------------------------------------------------


def test_remove_restores_model(model):
    inputs = batch_prompts(mixed_prompts(model))
    before = check_remove_restores(model, inputs, lightkv.LightKV(**SCHEDULE))
    fresh = tiny_llava(attn_implementation=model.config._attn_implementation)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, before)


@pytest.mark.parametrize("guidance", ["faithful", "text_to_vision"])
@pytest.mark.parametrize("batch", [1, 2])
def test_cached_generate_equals_uncached(model, guidance, batch):
    """Prompt guidance: the same tokens cached and uncached. (An uncached step recomputes the guidance with the
    generated tokens among the prompt keys, so weights move a little and only the tokens are compared. Uniform
    guidance merges identically at every uncached step: its logits agree too, test_contract.py's
    test_cached_generation_equals_uncached[*-lightkv_uniform-*].)"""
    prompts = mixed_prompts(model)[:2] if batch == 2 else [one_image(model)]
    inputs = batch_prompts(prompts)
    with lightkv.apply(model, lightkv.LightKV(**SCHEDULE, guidance=guidance)):
        cached = generate(model, inputs)
        uncached = generate(model, inputs, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)


def test_batched_equals_unbatched(model):
    prompts = mixed_prompts(model)
    with lightkv.apply(model, lightkv.LightKV(**SCHEDULE)) as handle:
        singles, single_stats = [], []
        for p in prompts:
            singles.append(generate(model, p))
            single_stats.append(handle.stats)
        batched = generate(model, batch_prompts(prompts))
        batch_stats = handle.stats
    for i, single in enumerate(singles):
        assert single.sequences[0, -6:].tolist() == batched.sequences[i, -6:].tolist()
        for a, b in zip(single.logits, batched.logits):
            torch.testing.assert_close(a[0], b[i], rtol=1e-4, atol=1e-4)
        assert batch_stats.vision_tokens[i] == single_stats[i].vision_tokens[0]
        assert batch_stats.retained_fraction[i] == single_stats[i].retained_fraction[0]
    assert batch_stats.vision_tokens[1] == [512, 512, 256, 128]  # two images
    assert batch_stats.vision_tokens[2] == [0, 0, 0, 0] and batch_stats.retained_fraction[2] is None


def test_beam_search_and_sampling(sdpa_model):
    model = sdpa_model
    prompts = mixed_prompts(model)
    inputs = batch_prompts(prompts)
    # uniform guidance: an uncached step then merges exactly as the cached prefill did (see
    # test_cached_generate_equals_uncached)
    with lightkv.apply(model, lightkv.LightKV(**SCHEDULE, guidance="uniform")):
        beams = model.generate(**inputs, max_new_tokens=5, num_beams=3, do_sample=False)
        for i, p in enumerate(prompts):
            alone = model.generate(**p, max_new_tokens=5, num_beams=3, do_sample=False)
            assert beams[i, -5:].tolist() == alone[0, -5:].tolist()
        torch.manual_seed(0)
        sampled = model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=20)
        torch.manual_seed(0)
        sampled_uncached = model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=20, use_cache=False)
    assert torch.equal(sampled, sampled_uncached)


def test_text_only_prompt_passes_through(model):
    inputs = llava_prompt(model, [1, 14, 15, 16, 17], [18, 19], num_images=0)
    stats = check_text_only_passes_through(model, inputs, lightkv.LightKV(**SCHEDULE), 4)
    assert stats.tokens == [[inputs["input_ids"].shape[1]] * 4]
    assert stats.mean_retained_fraction is None and stats.kv_ratio == 1.0


def test_text_continuation_on_compressed_cache(sdpa_model):
    """A second, multi-token turn without images reuses the compressed cache correctly."""
    model = sdpa_model
    first = one_image(model)
    follow = torch.tensor([[40, 41, 42]])
    full = {"input_ids": torch.cat([first["input_ids"], follow], 1), "pixel_values": first["pixel_values"]}
    method = lightkv.LightKV(**SCHEDULE, guidance="uniform")
    with lightkv.apply(model, method), torch.no_grad():
        out = model(**first, use_cache=True)
        cont = model(input_ids=follow, cache=out.cache, use_cache=True)
        whole = model(**full, use_cache=False)
    torch.testing.assert_close(cont.logits[0], whole.logits[0, -3:], rtol=1e-4, atol=1e-4)


# -- positions ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_positions_seen_by_shortened_layers(sdpa_model, positions):
    model = sdpa_model
    inputs = one_image(model)
    seen = {}

    def spy(index):
        def hook(module, args, kwargs):
            seen[index] = kwargs["position_ids"].clone()
        return hook

    layers = model.model.language_model.layers
    method = lightkv.LightKV(**SCHEDULE, positions=positions)
    with lightkv.apply(model, method), torch.no_grad():
        spies = [layers[i].register_forward_pre_hook(spy(i), with_kwargs=True) for i in (2, 3)]
        model(**inputs)
        for s in spies:
            s.remove()
    n = inputs["input_ids"].shape[1]
    ids2, ids3 = seen[2][0].tolist(), seen[3][0].tolist()
    assert len(ids2) == n - 128 and len(ids3) == n - 192
    if positions == "compact":
        assert ids2 == list(range(n - 128)) and ids3 == list(range(n - 192))
    else:
        assert ids2 == sorted(ids2) and ids2[:4] == [0, 1, 2, 3] and ids2[-1] == n - 1
        assert set(ids3) <= set(ids2)
        assert ids3[-5:] == list(range(n - 5, n))


# -- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(layers=[2, 1], windows=[2, 1], ratios=[0.5, 0.5]), "increasing"),
    (dict(layers=[1, 1], windows=[2, 1], ratios=[0.5, 0.5]), "repeat"),
    (dict(layers=[1, 2], windows=[2, 0], ratios=[0.5, 0.5]), "windows"),
    (dict(layers=[1, 2], windows=[2, 1], ratios=[0.5, 1.5]), r"\[0, 1\]"),
    (dict(layers=[1, 2], windows=[2, 1], ratios=[-0.1, 0.5]), r"\[0, 1\]"),
    (dict(layers=[1, 2], windows=[2], ratios=[0.5, 0.5]), "same length"),
    (dict(layers=[], windows=[], ratios=[]), "at least one"),
    (dict(layers=[-1], windows=[1], ratios=[0.5]), ">= 0"),
    (dict(layers=[1], windows=[1], ratios=[0.5], guidance="random"), "guidance"),
    (dict(layers=[1], windows=[1], ratios=[0.5], positions="reset"), "positions"),
])
def test_bad_schedules_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lightkv.LightKV(**kwargs)


def test_layer_beyond_model_raises(sdpa_model):
    hooks_before = hook_counts(sdpa_model)
    with pytest.raises(ValueError, match="4 decoder layers"):
        lightkv.apply(sdpa_model, lightkv.LightKV(layers=[1, 4], windows=[2, 1], ratios=[0.5, 0.5]))
    assert hook_counts(sdpa_model) == hooks_before


def test_unsupported_model_names_families():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=64))
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        lightkv.apply(llama, lightkv.LightKV(layers=[0], windows=[1], ratios=[0.5]))


def test_apply_twice_raises_and_context_manager_cleans_up(sdpa_model):
    hooks_before = hook_counts(sdpa_model)
    with lightkv.apply(sdpa_model, lightkv.LightKV(**SCHEDULE)):
        with pytest.raises(ValueError, match="already applied"):
            lightkv.apply(sdpa_model, lightkv.LightKV(**SCHEDULE))
    assert hook_counts(sdpa_model) == hooks_before


def test_training_mode_raises(sdpa_model):
    with lightkv.apply(sdpa_model, lightkv.LightKV(**SCHEDULE)):
        sdpa_model.train()
        try:
            with pytest.raises(RuntimeError, match="training mode"):
                sdpa_model(**one_image(sdpa_model))
        finally:
            sdpa_model.eval()


def test_images_on_a_cached_prefix_raise(sdpa_model):
    with lightkv.apply(sdpa_model, lightkv.LightKV(**SCHEDULE)), torch.no_grad():
        out = sdpa_model(**one_image(sdpa_model), use_cache=True)
        with pytest.raises(ValueError, match="already holds"):
            sdpa_model(**one_image(sdpa_model), cache=out.cache, use_cache=True)


def test_image_too_small_for_windows_skips_stage(caplog):
    model = tiny_llava(grid=4)  # 16 tokens per image
    inputs = llava_prompt(model, [1, 10], [20, 21])
    method = lightkv.LightKV(layers=[0, 1], windows=[2, 1], ratios=[0.5, 0.5])  # W=2 needs 32 tokens
    with caplog.at_level(logging.DEBUG, logger="lightkv"), lightkv.apply(model, method) as handle, torch.no_grad():
        out = model(**inputs, use_cache=True)
    assert "skipped" in caplog.text
    assert handle.stats.vision_tokens == [[16, 16, 8, 8]]
    assert [layer.keys.shape[2] for layer in out.cache.layers] == [20, 20, 12, 12]


def test_run_of_image_tokens_must_hold_whole_images(sdpa_model):
    inputs = one_image(sdpa_model)
    ids = inputs["input_ids"][:, :-3]
    ids = torch.cat([ids[:, :10], ids[:, 11:]], dim=1)  # 255 image tokens
    with lightkv.apply(sdpa_model, lightkv.LightKV(**SCHEDULE)), pytest.raises(ValueError, match="whole number"):
        sdpa_model(input_ids=ids, pixel_values=inputs["pixel_values"])


# -- other entry points and isolation -----------------------------------------------------------------------------


def test_inputs_embeds_and_llava_model_entry(sdpa_model):
    model = sdpa_model
    inputs = one_image(model)
    with lightkv.apply(model, lightkv.LightKV(**SCHEDULE)), torch.no_grad():
        by_ids = model(**inputs).logits
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        by_embeds = model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"]).logits
    torch.testing.assert_close(by_embeds, by_ids)
    with lightkv.apply(model.model, lightkv.LightKV(**SCHEDULE)) as handle, torch.no_grad():
        model.model(**inputs)
    assert handle.stats.vision_tokens == [[256, 256, 128, 64]]


def test_two_models_and_threads_do_not_share_state():
    a, b = tiny_llava(seed=0), tiny_llava(seed=1)
    inputs_a, inputs_b = one_image(a, seed=5), batch_prompts(mixed_prompts(b))
    with torch.no_grad():
        with lightkv.apply(a, lightkv.LightKV(**SCHEDULE)) as ha, \
                lightkv.apply(b, lightkv.LightKV(layers=[2], windows=[1], ratios=[0.25])) as hb:
            ref_a = generate(a, inputs_a).sequences
            ref_b = generate(b, inputs_b).sequences
            results = {}

            def run(name, model, inputs):
                results[name] = [generate(model, inputs).sequences for _ in range(2)]

            threads = [threading.Thread(target=run, args=("a", a, inputs_a)),
                       threading.Thread(target=run, args=("b", b, inputs_b)),
                       threading.Thread(target=run, args=("a2", a, inputs_a))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert hb.stats.vision_tokens[1] == [512, 512, 512, 384]
            assert ha.stats.vision_tokens == [[256, 256, 128, 64]]
    for name, ref in (("a", ref_a), ("b", ref_b), ("a2", ref_a)):
        for seq in results[name]:
            assert torch.equal(seq, ref)


def test_merge_maps_point_at_kept_tokens_of_the_same_window(sdpa_model):
    inputs = one_image(sdpa_model)
    first = 4  # text_before has 4 tokens
    with lightkv.apply(sdpa_model, lightkv.LightKV(**SCHEDULE), record=True) as handle, torch.no_grad():
        sdpa_model(**inputs)
    stage1, stage2 = handle.stats.merge_maps
    n = inputs["input_ids"].shape[1]
    text = torch.tensor([i for i in range(n) if not first <= i < first + GRID_TOKENS])
    assert torch.equal(stage1[0, text], text) and torch.equal(stage2[0, text], text)
    patches = torch.arange(first, first + GRID_TOKENS)
    rep1 = stage1[0, patches]
    assert int((rep1 == patches).sum()) == 128  # kept tokens represent themselves
    # stage 1 uses 2x2 windows of 8x8 patches: a token merges only inside its window
    window = lambda p: ((p - first) // 16 // 8) * 2 + ((p - first) % 16) // 8  # noqa: E731
    assert torch.equal(window(rep1), window(patches))
    # representatives after stage 2 are kept tokens of stage 2, and compose with stage 1
    assert int((stage2[0, patches] == patches).sum()) == 64
    assert torch.equal(stage2[0, patches], stage2[0, rep1])
