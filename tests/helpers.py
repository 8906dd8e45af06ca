"""Prompts and runners shared by the integration tests (tiny random LLaVA models)."""

import torch

import lightkv
from lightkv.testing import llava_prompt

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
    return model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, **kwargs)


def run(model, method, inputs, **kwargs):
    """One forward with ``method`` applied; returns (output, stats)."""
    with lightkv.apply(model, method) as handle, torch.no_grad():
        out = model(**inputs, **kwargs)
    return out, handle.stats


def hook_counts(model):
    """Hooks per module (transformers registers some of its own)."""
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}
