"""What reaches torch's scaled_dot_product_attention in the decoder with LightKV applied.

Batch 1 without padding: every decoder attention call (prefill and decode steps, shortened layers included) gets
attn_mask=None, the prefill ones with is_causal=True, so torch may pick its flash kernel; no square mask (or any
square tensor) of a shortened layer's length is built. Padded batches: a shortened layer's mask has the layer's
own (short) length, nothing longer.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lightkv
from lightkv.adapters import get_adapter
from lightkv.testing import batch_prompts, llava_prompt, qwen_prompt, tiny_llava, tiny_qwen2_5_vl

LLAVA_SCHEDULE = dict(layers=(1, 2, 4), windows=(4, 2, 1), ratios=(0.5, 0.5, 0.5))
QWEN_SCHEDULE = dict(layers=(1, 2), windows=(1, 1), ratios=(0.5, 0.5), min_tokens_per_window=4)


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(num_layers=6, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen2_5_vl(num_layers=6, attn_implementation="sdpa")


def model_case(name, llava, qwen, batch):
    if name == "llava":
        prompts = [llava_prompt(llava, [1, 3, 4], [7, 8, 9]),
                   llava_prompt(llava, [1, 3, 4, 5, 6, 10, 11], [7, 8], num_images=2, seed=1)]
        model, schedule = llava, LLAVA_SCHEDULE
    else:
        prompts = [qwen_prompt(qwen, [1, 3, 4], [7, 8, 9]), qwen_prompt(qwen, [1, 3], [7], images=[(4, 4), (6, 8)])]
        model, schedule = qwen, QWEN_SCHEDULE
    return model, lightkv.LightKV(**schedule), prompts[0] if batch == 1 else batch_prompts(prompts)


class SdpaSpy:
    """Records (decoder layer, query length, key length, attn_mask, is_causal) of every sdpa call made inside a
    decoder layer's self-attention (the vision encoder's calls are left out)."""

    def __init__(self, model, monkeypatch):
        adapter = get_adapter(model)
        self.calls, self.layer, self.hooks = [], None, []
        for index, layer in enumerate(adapter.decoder_layers):
            attention = adapter.attention(layer)
            self.hooks.append(attention.register_forward_pre_hook(lambda m, a, index=index: self._enter(index)))
            self.hooks.append(attention.register_forward_hook(lambda m, a, out: self._enter(None)))
        original = torch.nn.functional.scaled_dot_product_attention

        def spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
            if self.layer is not None:
                self.calls.append((self.layer, query.shape[-2], key.shape[-2], attn_mask, is_causal))
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)

    def _enter(self, index):
        self.layer = index

    def remove(self):
        for hook in self.hooks:
            hook.remove()


class SquareTensors(TorchDispatchMode):
    """Shapes of every 4-D (or 3-D bool) op output whose last two dims are both one of ``sizes``: a batched n x n
    mask or attention score matrix of a layer's length (weights and the merge's windowed similarities are not)."""

    def __init__(self, sizes):
        super().__init__()
        self.sizes, self.shapes = set(sizes), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and (t.dim() >= 4 or t.dim() == 3 and t.dtype == torch.bool) \
                    and t.shape[-1] == t.shape[-2] in self.sizes:
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def layer_lengths(handle, num_layers):
    """Slots each decoder layer ran on at the last prefill (the longest row)."""
    return [max(row) for row in zip(*handle.stats.tokens)][:num_layers]


@pytest.mark.parametrize("name", ["llava", "qwen"])
def test_batch_1_reaches_sdpa_without_a_mask_and_builds_no_square_mask(llava, qwen, name, monkeypatch):
    model, method, inputs = model_case(name, llava, qwen, batch=1)
    num_layers = len(get_adapter(model).decoder_layers)
    spy = SdpaSpy(model, monkeypatch)
    try:
        with lightkv.apply(model, method) as handle, torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
            lengths = layer_lengths(handle, num_layers)
            assert min(lengths) < lengths[0]  # the schedule shortened the sequence
            with SquareTensors(lengths) as squares:
                model(**inputs)
        with SquareTensors(lengths) as unpatched, torch.no_grad():
            model(**inputs)
    finally:
        spy.remove()
    # generate: a prefill and 2 decode steps; then the prefill again (under SquareTensors), then unpatched
    L = num_layers
    prefills, decode = spy.calls[:L] + spy.calls[3 * L:4 * L], spy.calls[L:3 * L]
    assert len(spy.calls) == 5 * L
    assert [(layer, q, k) for layer, q, k, _, _ in prefills] == 2 * [(i, n, n) for i, n in enumerate(lengths)]
    assert all(mask is None and causal for _, _, _, mask, causal in prefills), prefills
    assert all(q == 1 and mask is None for _, q, _, mask, _ in decode), decode
    # each layer's keys at a decode step: its own prefill slots plus the tokens decoded so far
    assert [(layer, k) for layer, _, k, _, _ in decode] == [(i, n + s) for s in (1, 2) for i, n in enumerate(lengths)]
    # lightkv adds no (.., n, n) tensor for any layer length n (the vision tower's own are there in both runs)
    assert sorted(squares.shapes) == sorted(unpatched.shapes)


@pytest.mark.parametrize("name", ["llava", "qwen"])
def test_padded_batch_masks_have_each_layers_short_length(llava, qwen, name, monkeypatch):
    model, method, inputs = model_case(name, llava, qwen, batch=2)
    num_layers = len(get_adapter(model).decoder_layers)
    first_short = method.stage_layers[0] + 1
    spy = SdpaSpy(model, monkeypatch)
    try:
        with lightkv.apply(model, method) as handle, torch.no_grad():
            model(**inputs)
            lengths = layer_lengths(handle, num_layers)
    finally:
        spy.remove()
    assert [(layer, q, k) for layer, q, k, _, _ in spy.calls] == [(i, n, n) for i, n in enumerate(lengths)]
    for layer, q, k, mask, _ in spy.calls[first_short:]:
        assert mask is not None and tuple(mask.shape) == (2, 1, q, k), (layer, None if mask is None else mask.shape)


@pytest.mark.parametrize("impl", ["flex_attention", "flash_attention_2"])
def test_other_attention_implementations_get_a_one_line_error(impl):
    """flash_attn is not installed here and flex attention is not supported: apply() names the supported
    implementations in one line, and so does a forward after the model was switched to one under a handle."""
    model = tiny_llava(num_layers=3, attn_implementation="sdpa")
    method = lightkv.LightKV(layers=(1,), windows=(2,), ratios=(0.5,))
    model.config.text_config._attn_implementation = impl
    with pytest.raises(ValueError, match=r"supports attn_implementation in \('sdpa', 'eager'\), got '" + impl) as err:
        lightkv.apply(model, method)
    assert "\n" not in str(err.value)
    model.config.text_config._attn_implementation = "sdpa"
    handle = lightkv.apply(model, method)
    try:
        model.config.text_config._attn_implementation = impl
        with pytest.raises(ValueError, match="got '" + impl), torch.no_grad():
            model(**llava_prompt(model, [1, 3, 4], [7, 8]))
    finally:
        handle.remove()
