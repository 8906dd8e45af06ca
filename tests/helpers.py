"""Prompts and runners shared by the integration tests (tiny random LLaVA models)."""

from dataclasses import dataclass, field

import torch

import lightkv
from lightkv.core import MergeResult
from lightkv.testing import batch_prompts, llava_prompt

TEXT_BEFORE, TEXT_AFTER = [1, 10, 11, 12], [20, 21, 22, 23, 24]


def one_image(model, seed=1):
    return llava_prompt(model, TEXT_BEFORE, TEXT_AFTER, seed=seed)


def mixed_prompts(model):
    """One image, two images, no image."""
    return [
        llava_prompt(model, TEXT_BEFORE, TEXT_AFTER, seed=1),
        llava_prompt(model, [1, 13], [25, 26, 27], num_images=2, seed=2),
        llava_prompt(model, [1, 14, 15, 16, 17, 18, 19], [28, 29], num_images=0, seed=3),
    ]


def generate(model, inputs, max_new_tokens=4, **kwargs):
    # min_new_tokens: a row that meets EOS early would be padded in a batch and cut short alone
    return model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                          output_logits=True,
                          return_dict_in_generate=True, **kwargs)


def run(model, method, inputs, **kwargs):
    """One forward with ``method`` applied; returns (output, stats)."""
    with lightkv.apply(model, method, record=True) as handle, torch.no_grad():
        out = model(**inputs, **kwargs)
    return out, handle.stats


def hook_counts(model):
    """Hooks per module (transformers registers some of its own)."""
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}


def check_batched_equals_unbatched(model, method, num_layers, new_tokens=4, prompts=None):
    """Each sample of a mixed batch (default: one image, two images, no image; ``prompts`` may give others, the
    last one without images) gets the tokens, logits (1e-4), kept counts and kept positions it gets alone."""
    prompts = mixed_prompts(model) if prompts is None else prompts
    with lightkv.apply(model, method, record=True) as handle:
        singles, single_stats = [], []
        for p in prompts:
            singles.append(generate(model, p, max_new_tokens=new_tokens))
            single_stats.append(handle.stats)
        batched = generate(model, batch_prompts(prompts), max_new_tokens=new_tokens)
        stats = handle.stats
    for i, single in enumerate(singles):
        assert single.sequences[0, -new_tokens:].tolist() == batched.sequences[i, -new_tokens:].tolist()
        for a, b in zip(single.logits, batched.logits):
            torch.testing.assert_close(a[0], b[i], rtol=1e-4, atol=1e-4)
        assert stats.vision_tokens[i] == single_stats[i].vision_tokens[0]
    for i in range(len(prompts) - 1):
        assert stats.kept_positions[i] == single_stats[i].kept_positions[0]
    assert stats.vision_tokens[-1] == [0] * num_layers


@dataclass(frozen=True)
class KeepPositions(lightkv.Method):
    """Prunes to given vision positions: kept[sample][stage], positions among the sample's real tokens."""

    layers: tuple = ()
    kept: list = field(default_factory=list)

    @property
    def stage_layers(self):
        return tuple(self.layers)

    def reduce(self, ctx, stage):
        candidates = ctx.image_index >= 0
        wanted = torch.stack([torch.isin(ctx.input_positions[b], torch.tensor(kept[stage], dtype=torch.long))
                              for b, kept in enumerate(self.kept)])
        destination = torch.arange(candidates.shape[1]).expand_as(candidates)
        return MergeResult(~candidates | wanted, ctx.hidden, destination)


def check_remove_restores(model, inputs, method):
    """apply() changes the logits; remove() gives back bit-identical logits and the original hooks.
    Returns the unpatched logits."""
    with torch.no_grad():
        before = model(**inputs).logits
        hooks_before = hook_counts(model)
        handle = lightkv.apply(model, method)
        assert hook_counts(model) != hooks_before
        patched = model(**inputs).logits
        handle.remove()
        after = model(**inputs).logits
    assert not torch.allclose(patched, before)  # the patch did something
    assert torch.equal(after, before)
    assert hook_counts(model) == hooks_before and not hasattr(model, "_lightkv_handle")
    return before


def check_text_only_passes_through(model, inputs, method, num_layers):
    """A prompt without images: same logits, a full-length cache on every layer, zero vision tokens in the
    stats. Returns the stats."""
    with torch.no_grad():
        ref = model(**inputs, use_cache=True)
        hooks_before = hook_counts(model)
        with lightkv.apply(model, method) as handle:
            got = model(**inputs, use_cache=True)
    n = inputs["input_ids"].shape[1]
    assert torch.equal(got.logits, ref.logits)
    assert [layer.keys.shape[2] for layer in got.cache.layers] == [n] * num_layers
    assert handle.stats.vision_tokens == [[0] * num_layers]
    assert handle.stats.mean_retained_fraction is None and hook_counts(model) == hooks_before
    return handle.stats


def capture_attention_inputs(model, inputs):
    """Run ``model`` (eager, output_attentions=True) recording, per decoder layer, the outputs of its q/k
    projections ("q", "k") and the kwargs the layer received ("kwargs"). Returns (output, {layer: record})."""
    adapter = lightkv.adapters.get_adapter(model)
    seen, hooks = {}, []
    for i, layer in enumerate(adapter.decoder_layers):
        record = seen.setdefault(i, {})
        hooks.append(adapter.query_projection(layer).register_forward_hook(
            lambda m, a, out, record=record: record.__setitem__("q", out)))
        hooks.append(adapter.key_projection(layer).register_forward_hook(
            lambda m, a, out, record=record: record.__setitem__("k", out)))
        hooks.append(layer.register_forward_pre_hook(
            lambda m, a, kw, record=record: record.__setitem__("kwargs", kw), with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    return out, seen
