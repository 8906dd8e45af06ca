"""The engine's contracts that do not depend on the method: compressed caches that are copied, handed over,
reset or orphaned; copies of a patched model; nested handles; interrupted calls; full-length hidden states;
and the mask builders as pure functions."""

import contextvars
import copy

import pytest
import torch

import lightkv
from lightkv.engine import masks, record_of
from lightkv.testing import batch_prompts, llava_prompt, tiny_llava

SCHEDULE = dict(layers=[1, 2], windows=[2, 1], ratios=[0.5, 0.5])


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return tiny_llava(attn_implementation=request.param)


def padded_batch(model):
    return batch_prompts([llava_prompt(model, [1, 10, 11, 12], [20, 21, 22, 23, 24], seed=1),
                          llava_prompt(model, [1, 13], [25, 26], seed=2)])


def continue_with(model, cache, inputs, new_ids):
    """One decode call of ``new_ids`` (B, q) on ``cache`` after the prompt ``inputs``; returns logits."""
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(new_ids)], dim=1)
    with torch.no_grad():
        return model(input_ids=new_ids, attention_mask=mask, cache=cache, use_cache=True).logits


def compressed_prefill(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=True).past_key_values


NEW = torch.tensor([[40, 41, 42], [43, 44, 45]])


def test_deep_copied_cache_continues_like_the_original(model):
    inputs = padded_batch(model)
    with lightkv.apply(model, lightkv.LightKV(**SCHEDULE)):
        cache = compressed_prefill(model, inputs)
        copied = copy.deepcopy(cache)
        original = continue_with(model, cache, inputs, NEW)
        from_copy = continue_with(model, copied, inputs, NEW)
    assert [layer.keys.shape[2] for layer in copied.layers] == [layer.keys.shape[2] for layer in cache.layers]
    torch.testing.assert_close(from_copy, original, rtol=0, atol=0)


def test_cache_continues_under_another_handle_and_fails_clearly_without_one(model):
    inputs = padded_batch(model)
    with lightkv.apply(model, lightkv.LightKV(**SCHEDULE)):
        cache = compressed_prefill(model, inputs)
        kept = copy.deepcopy(cache)
        reference = continue_with(model, cache, inputs, NEW)
    # after remove(): no hook is left to build the shortened layers' masks
    with pytest.raises(ValueError, match="compressed by lightkv"):
        continue_with(model, copy.deepcopy(kept), inputs, NEW)
    # another handle (another method object, same depth) continues it exactly
    with lightkv.apply(model, lightkv.ToMe(**SCHEDULE)):
        torch.testing.assert_close(continue_with(model, kept, inputs, NEW), reference, rtol=0, atol=0)


def test_cache_from_a_deeper_model_is_refused():
    small, deep = tiny_llava(num_layers=4), tiny_llava(num_layers=6)
    inputs = llava_prompt(small, [1, 10], [20, 21])
    with lightkv.apply(small, lightkv.LightKV(**SCHEDULE)):
        cache = compressed_prefill(small, inputs)
    with lightkv.apply(deep, lightkv.LightKV(**SCHEDULE)), pytest.raises(ValueError, match="4 decoder layers"):
        continue_with(deep, cache, inputs, NEW[:1])


def test_reset_cache_starts_over(model):
    inputs = padded_batch(model)
    text_only = {"input_ids": torch.tensor([[1, 14, 15, 16]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        expected_text = model(**text_only).logits
    with lightkv.apply(model, lightkv.LightKV(**SCHEDULE)), torch.no_grad():
        expected_images = model(**inputs).logits
        cache = model(**inputs, use_cache=True).past_key_values
        cache.reset()
        assert record_of(cache) is not None and cache.get_seq_length() == 0
        torch.testing.assert_close(model(**text_only, cache=cache).logits, expected_text)
        assert record_of(cache) is None and len({layer.keys.shape[2] for layer in cache.layers}) == 1
        cache.reset()
        torch.testing.assert_close(model(**inputs, cache=cache).logits, expected_images)
        assert record_of(cache) is not None


def test_cropped_cache_is_refused(model):
    inputs = padded_batch(model)
    with lightkv.apply(model, lightkv.LightKV(**SCHEDULE)):
        cache = compressed_prefill(model, inputs)
        cache.layers[0].crop(-2)  # layer 0 only: now it disagrees with the shortened layers
        with pytest.raises(ValueError, match="inconsistent"):
            continue_with(model, cache, inputs, NEW)


def test_deep_copy_of_a_patched_model_is_patched_on_its_own(model):
    inputs = padded_batch(model)
    method = lightkv.LightKV(**SCHEDULE)
    with torch.no_grad():
        plain = model(**inputs).logits
    handle = lightkv.apply(model, method)
    try:
        assert not any(isinstance(v, contextvars.ContextVar) for v in vars(handle).values())
        with torch.no_grad():
            patched = model(**inputs).logits
        twin = copy.deepcopy(model)
        twin_handle = twin._lightkv_handle
        assert twin_handle is not handle and twin_handle.model is twin and twin_handle.active
        with torch.no_grad():
            torch.testing.assert_close(twin(**inputs).logits, patched, rtol=0, atol=0)
        assert twin_handle.stats.vision_tokens == handle.stats.vision_tokens
        twin_handle.remove()
        with torch.no_grad():
            torch.testing.assert_close(twin(**inputs).logits, plain, rtol=0, atol=0)
            torch.testing.assert_close(model(**inputs).logits, patched, rtol=0, atol=0)  # the original stays patched
    finally:
        handle.remove()


def test_second_handle_anywhere_in_the_same_model_is_refused():
    model = tiny_llava()
    with lightkv.apply(model, lightkv.LightKV(**SCHEDULE)):
        with pytest.raises(ValueError, match="already applied"):
            lightkv.apply(model.model, lightkv.LightKV(**SCHEDULE))
    with lightkv.apply(model.model, lightkv.LightKV(**SCHEDULE)):
        with pytest.raises(ValueError, match="already applied"):
            lightkv.apply(model, lightkv.LightKV(**SCHEDULE))
    with lightkv.apply(model, lightkv.LightKV(**SCHEDULE)) as handle, torch.no_grad():  # free again after remove()
        model(**llava_prompt(model, [1], [2]))
    assert handle.stats.vision_tokens == [[256, 256, 128, 64]]


def test_interrupted_prefill_leaves_no_state_behind():
    model = tiny_llava()
    inputs = llava_prompt(model, [1, 10, 11], [20, 21])
    embeds = torch.randn(1, 7, model.config.text_config.hidden_size)
    with torch.no_grad():
        expected_direct = model.model.language_model(inputs_embeds=embeds).last_hidden_state
    calls = []

    def interrupt(module, args):
        if not calls:
            calls.append(1)
            raise KeyboardInterrupt

    with lightkv.apply(model, lightkv.LightKV(**SCHEDULE)) as handle, torch.no_grad():
        expected = model(**inputs).logits
        hook = model.model.language_model.layers[2].register_forward_pre_hook(interrupt)
        with pytest.raises(KeyboardInterrupt):
            model(**inputs)
        hook.remove()
        # the language model called directly (not through the entry module): the interrupted call's state is gone
        torch.testing.assert_close(model.model.language_model(inputs_embeds=embeds).last_hidden_state,
                                   expected_direct, rtol=0, atol=0)
        assert handle.prefill_state() is None
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)


def test_hidden_states_come_back_at_full_length(model):
    inputs = padded_batch(model)
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        plain = model(**inputs, output_hidden_states=True).hidden_states
    with lightkv.apply(model, lightkv.LightKV(**SCHEDULE)), torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    assert len(out.hidden_states) == len(plain) == 5
    assert all(h.shape == plain[0].shape for h in out.hidden_states)
    for before_first_stage in range(2):  # embeddings and layer 0 run on the full sequence
        torch.testing.assert_close(out.hidden_states[before_first_stage], plain[before_first_stage])
    assert out.logits.shape[1] == n


def masks_seen(model, run):
    """The attention_mask every decoder layer receives (after lightkv's hooks) during ``run()``, per call."""
    seen = []
    layers = model.model.language_model.layers

    def spy(index):
        def hook(module, args, kwargs):
            seen.append((index, kwargs.get("attention_mask")))
        return hook

    hooks = [layer.register_forward_pre_hook(spy(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize("with_mask", [False, True])
def test_unpadded_batch_1_reaches_sdpa_without_any_mask(with_mask):
    """Batch 1 without padding: every shortened layer gets attention_mask=None (sdpa's causal kernel) at
    prefill and at decode steps; no N x N mask is built."""
    model = tiny_llava(attn_implementation="sdpa")
    inputs = llava_prompt(model, [1, 10, 11], [20, 21])
    if not with_mask:
        inputs.pop("attention_mask")
    with lightkv.apply(model, lightkv.LightKV(**SCHEDULE)):
        seen = masks_seen(model, lambda: model.generate(**inputs, max_new_tokens=3, min_new_tokens=3,
                                                        do_sample=False))
    shortened = [mask for index, mask in seen if index > SCHEDULE["layers"][0]]
    assert len(shortened) == 3 * 2  # 3 calls (prefill, 2 decode steps) x layers 2 and 3
    assert all(mask is None for mask in shortened)


def test_padded_batch_gets_masks_of_the_short_length():
    model = tiny_llava(attn_implementation="sdpa")
    inputs = padded_batch(model)
    with lightkv.apply(model, lightkv.LightKV(**SCHEDULE)) as handle:
        seen = masks_seen(model, lambda: model(**inputs))
    kept = [max(row) for row in zip(*handle.stats.tokens)]  # slots per layer (the longest row)
    for index, mask in seen:
        if index > SCHEDULE["layers"][0]:
            assert mask is not None and mask.shape == (2, 1, kept[index], kept[index])


# ---------------------------------------------------------------------------------------------------------------
# mask builders, without a model


def test_prefill_mask_is_causal_in_original_positions_and_isolates_padding():
    orig_index = torch.tensor([[0, 0, 3, 5], [1, 2, 4, 6]])
    valid = torch.tensor([[False, True, True, True], [True, True, True, True]])
    allowed = masks.prefill_mask(orig_index, valid, None, unpadded=False)[:, 0]
    expected_row1 = orig_index[1][None, :] <= orig_index[1][:, None]
    assert torch.equal(allowed[1], expected_row1)
    assert bool(allowed[0, 0, 0])  # a padding query sees itself: no row is empty
    assert allowed[0, 1:, 0].tolist() == [False, False, False]  # nobody sees padding
    assert masks.prefill_mask(orig_index[1:], valid[1:], None, unpadded=True) is None


def test_prefill_mask_gathers_a_full_mask():
    full = torch.tril(torch.ones(7, 7, dtype=torch.bool))
    full[:, 0] = False  # column 0 is padding in the full mask
    orig_index, valid = torch.tensor([[1, 4, 6]]), torch.ones(1, 3, dtype=torch.bool)
    allowed = masks.prefill_mask(orig_index, valid, full[None, None], unpadded=True)[0, 0]
    assert torch.equal(allowed, full[orig_index[0]][:, orig_index[0]])
    additive = masks.to_attention_format(allowed[None, None], torch.zeros(1, 1, 7, 7), "eager", torch.float32)
    assert torch.equal(masks.allowed_from_mask(additive)[0, 0], allowed)


def test_decode_mask_columns():
    orig_index = torch.tensor([[0, 2, 5]])  # a layer holding 3 of 6 prefill tokens
    valid = torch.ones(1, 3, dtype=torch.bool)
    allowed = masks.decode_mask(orig_index, valid, prefill_length=6, decoded=2, q=1)[0, 0]
    assert allowed.shape == (1, 3 + 2 + 1) and bool(allowed.all())
    padding = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1]])
    allowed = masks.decode_mask(orig_index, valid, 6, 2, 1, padding=padding)[0, 0]
    assert allowed.tolist() == [[False, True, True, True, True, True]]
    full = torch.ones(1, 1, 2, 10, dtype=torch.bool)
    full[..., 2] = False
    allowed = masks.decode_mask(orig_index, valid, 6, 2, 2, full_mask=full)[0, 0]
    assert allowed.shape == (2, 7) and allowed[:, 1].tolist() == [False, False]
    with pytest.raises(ValueError, match="expected 10"):
        masks.decode_mask(orig_index, valid, 6, 2, 2, full_mask=full[..., :9])
