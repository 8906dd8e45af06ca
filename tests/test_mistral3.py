"""Mistral3 / Pixtral specifics (the shared contracts are in test_contract.py): the rows of [IMG] tokens found
from the break / end tokens (pinned or detected), clear errors for prompts that break the layout, Pixtral-12B
taken by its own adapter rather than LLaVA's, and Ministral-3's position-scaled queries in guidance."""

from dataclasses import dataclass, field

import pytest
import torch

import lightkv
from lightkv.adapters import LlavaAdapter, adapter_class_for_config, get_adapter
from lightkv.adapters.mistral3 import Mistral3Adapter, PixtralLlavaAdapter
from lightkv.methods.base import StageResult
from lightkv.testing import (MISTRAL3_IMAGE_BREAK, MISTRAL3_IMAGE_END, batch_prompts, mistral3_prompt,
                             tiny_mistral3, tiny_pixtral_llava)


@pytest.fixture(scope="module")
def model():
    return tiny_mistral3(num_layers=4, attn_implementation="eager")


def _prompts(model):
    return [mistral3_prompt(model, [1, 10, 11], [20, 21], images=[(3, 5)], seed=1),
            mistral3_prompt(model, [1, 13], [25], images=[(2, 7), (4, 1), (1, 3)], seed=2)]


def test_grids_rows_and_columns_come_from_the_runs(model):
    inputs = batch_prompts(_prompts(model))
    layout = get_adapter(model).vision_layout(inputs["input_ids"], None, inputs)
    assert layout.grid_hw.tolist() == [[3, 5], [2, 7], [4, 1], [1, 3]]
    ids = inputs["input_ids"]
    assert torch.equal(layout.vision_mask, ids == model.config.image_token_id)  # break / end stay text
    row = ids[1][layout.image_index[1] == 1]
    assert row.numel() == 14
    first = torch.nonzero(layout.image_index[1] == 1).flatten()
    assert layout.grid_rows[1, first].tolist() == [0] * 7 + [1] * 7
    assert layout.grid_cols[1, first].tolist() == list(range(7)) * 2
    assert int(first[7] - first[6]) == 2  # one [IMG_BREAK] between the rows


def test_pinned_ids_detected_ids_and_embeddings_agree(model):
    inputs = batch_prompts(_prompts(model))
    detected = Mistral3Adapter(model).vision_layout(inputs["input_ids"], None, inputs)
    pinned = Mistral3Adapter(model, image_break_token_id=MISTRAL3_IMAGE_BREAK,
                             image_end_token_id=MISTRAL3_IMAGE_END).vision_layout(inputs["input_ids"], None, inputs)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    from_embeds = Mistral3Adapter(model).vision_layout(None, embeds, inputs)
    for other in (pinned, from_embeds):
        for name in ("vision_mask", "image_index", "grid_rows", "grid_cols", "grid_hw"):
            assert torch.equal(getattr(other, name), getattr(detected, name)), name


def test_config_pins_the_ids(model):
    model.config.image_end_token_id = MISTRAL3_IMAGE_BREAK  # wrong on purpose
    try:
        adapter = get_adapter(model)
        assert adapter.image_end_token_id == MISTRAL3_IMAGE_BREAK
        inputs = _prompts(model)[0]
        with pytest.raises(ValueError, match="does not end with"):
            adapter.vision_layout(inputs["input_ids"], None, inputs)
    finally:
        del model.config.image_end_token_id


@pytest.mark.parametrize("tokens, message", [
    ("rows of different length", "equally long"),
    ("row followed by text", "followed by ids"),
    ("no end", "ends inside an image"),
])
def test_a_prompt_that_breaks_the_layout_is_a_clear_error(model, tokens, message):
    img, brk, end = model.config.image_token_id, MISTRAL3_IMAGE_BREAK, MISTRAL3_IMAGE_END
    rows = {"rows of different length": [img] * 3 + [brk] + [img] * 2 + [end],
            "row followed by text": [img] * 3 + [brk] + [img] * 3 + [30] + [img] * 3 + [end],
            "no end": [1, 10] + [img] * 3}[tokens]
    ids = torch.tensor([[1, 10] + rows]) if tokens == "no end" else torch.tensor([[1, 10] + rows + [20]])
    kwargs = {"pixel_values": torch.zeros(1, 3, 32, 32)}
    with pytest.raises(ValueError, match=message):
        get_adapter(model).vision_layout(ids, None, kwargs)


def test_grids_disagreeing_with_image_sizes_are_a_clear_error(model):
    inputs = _prompts(model)[0]
    inputs = {**inputs, "image_sizes": torch.tensor([[12, 24]])}  # 3 x 6 tokens, the prompt holds 3 x 5
    with pytest.raises(ValueError, match="image_sizes"):
        get_adapter(model).vision_layout(inputs["input_ids"], None, inputs)


def test_image_ids_without_features_are_text(model):
    inputs = _prompts(model)[0]
    assert get_adapter(model).vision_layout(inputs["input_ids"], None, {}) is None


def test_pixtral_llava_is_taken_by_the_pixtral_adapter():
    pixtral = tiny_pixtral_llava(num_layers=2)
    assert type(get_adapter(pixtral)) is PixtralLlavaAdapter
    assert not LlavaAdapter.matches(pixtral) and not LlavaAdapter.matches_config(pixtral.config)
    assert adapter_class_for_config(pixtral.config) is PixtralLlavaAdapter
    assert PixtralLlavaAdapter.image_grid(pixtral.config) == (8, 8)  # 32 px, 4-px patches, no merge
    from lightkv.testing import tiny_llava
    assert type(get_adapter(tiny_llava(num_layers=2, grid=4))) is LlavaAdapter
    assert lightkv.SUPPORTED_FAMILIES["pixtral"] == ("LlavaForConditionalGeneration", "LlavaModel")
    assert lightkv.SUPPORTED_FAMILIES["mistral3"] == ("Mistral3ForConditionalGeneration", "Mistral3Model")


def test_sliding_window_text_is_refused_at_apply():
    model = tiny_mistral3(num_layers=2, llama_4_scaling=False)
    model.config.text_config.sliding_window = 4096
    with pytest.raises(ValueError, match="sliding-window"):
        lightkv.apply(model, lightkv.FastV(layer=1, ratio=0.5))
    assert not hasattr(model, "_lightkv_handle")


@dataclass(frozen=True)
class _RecordAttention(lightkv.Method):
    """Keeps every other image token at its first stage; records the guidance queries/keys at every stage."""

    layers: tuple = (1, 2)
    seen: list = field(default_factory=list)
    needs_attention = True

    @property
    def stage_layers(self):
        return tuple(self.layers)

    def reduce(self, ctx, stage):
        self.seen.append(ctx.attention_fn())
        keep = ~(ctx.image_index >= 0) | (ctx.input_positions % 2 == 0) if stage == 0 else ctx.token_valid
        destination = torch.arange(keep.shape[1]).expand_as(keep)
        return StageResult(keep, ctx.hidden, destination)


def _weights(q, k, scaling):
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    n = scores.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


def test_guidance_uses_the_ministral3_scaled_queries(model):
    inputs = mistral3_prompt(model, [1, 10, 11], [20, 21], images=[(6, 8)], seed=1)  # 59 tokens, 16 per scale
    method = _RecordAttention()
    with lightkv.apply(model, method), torch.no_grad():
        out = model(**inputs, output_attentions=True)
    assert len(method.seen) == 2
    for (q, k, scaling), layer in zip(method.seen, (1, 2)):
        expected = out.attentions[layer]  # eager: the model's own softmax, at the layer's (shortened) length
        assert expected.shape[-1] == q.shape[2]
        torch.testing.assert_close(_weights(q, k, scaling), expected, rtol=1e-4, atol=1e-5)


def test_without_the_scale_the_guidance_weights_would_differ(model, monkeypatch):
    inputs = mistral3_prompt(model, [1, 10, 11], [20, 21], images=[(6, 8)], seed=1)
    monkeypatch.setattr(Mistral3Adapter, "_llama_4_scaling", lambda self: None)
    method = _RecordAttention()
    with lightkv.apply(model, method), torch.no_grad():
        out = model(**inputs, output_attentions=True)
    q, k, scaling = method.seen[0]
    assert not torch.allclose(_weights(q, k, scaling), out.attentions[1], rtol=1e-4, atol=1e-5)


# -- with the family's own image processor and a tokenizer from a tiny vocabulary ---------------------------------

def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, 125)] + ["[IMG_BREAK]", "[IMG_END]", "[IMG]"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["[IMG]", "[IMG_BREAK]", "[IMG_END]"])  # matched inside "[IMG][IMG]..." runs
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _processor_inputs(model, texts, images):
    """What ``PixtralProcessor`` returns (its module needs torchvision): its PIL image processor
    (``PixtralImageProcessorPil``) resizes and pads the images, and each ``[IMG]`` placeholder becomes the
    processor's expansion (``PixtralProcessor.replace_image_token``): H // unit rows of W // unit ``[IMG]`` and
    an ``[IMG_BREAK]``, the last one replaced by ``[IMG_END]``."""
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    unit = model.config.vision_config.patch_size * model.config.spatial_merge_size
    pixels = PixtralImageProcessorPil(size={"longest_edge": 32}, patch_size={"height": unit, "width": unit})(
        [image for row in images for image in row], return_tensors="pt")
    expanded, index = [], 0
    for text in texts:
        parts = text.split("[IMG]")
        out = parts[0]
        for part in parts[1:]:
            height, width = pixels["image_sizes"][index].tolist()
            tokens = (["[IMG]"] * (width // unit) + ["[IMG_BREAK]"]) * (height // unit)
            tokens[-1] = "[IMG_END]"
            out += " " + "".join(tokens) + " " + part
            index += 1
        expanded.append(out)
    batch = _tokenizer()(expanded, return_tensors="pt", padding=True, padding_side="left")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "pixel_values": pixels["pixel_values"], "image_sizes": pixels["image_sizes"]}


def test_generate_from_processor_output():
    import numpy as np
    from PIL import Image

    from helpers import generate

    model = tiny_mistral3(num_layers=4)
    rng = np.random.default_rng(0)
    wide, tall = (Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)) for shape in ((24, 32, 3), (40, 16, 3)))
    inputs = _processor_inputs(model, ["w10 w11 [IMG] w20 w21", "w12 [IMG] w13 [IMG] w22"], [[wide], [tall, wide]])
    layout = get_adapter(model).vision_layout(inputs["input_ids"], None, inputs)
    assert layout.grid_hw.tolist() == (inputs["image_sizes"] // 4).tolist() == [[6, 8], [8, 3], [6, 8]]
    with torch.no_grad():
        expected = model(**inputs).logits
    with lightkv.apply(model, lightkv.LightKV(layers=[1, 2], windows=[2, 1], ratios=[0.0, 0.0])), torch.no_grad():
        same = model(**inputs).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(same[valid], expected[valid], rtol=1e-5, atol=1e-5)
    method = lightkv.LightKV(layers=[1, 2], windows=[2, 1], ratios=[0.5, 0.5], guidance="uniform")
    with lightkv.apply(model, method) as handle:
        cached = generate(model, inputs, max_new_tokens=3)
        kept = handle.stats.vision_tokens
        uncached = generate(model, inputs, max_new_tokens=3, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert kept == [method.kept_per_layer(4, ((6, 8),)), method.kept_per_layer(4, ((8, 3), (6, 8)))]


def test_real_size_spec():
    """Mistral-Small-3.1-24B for the analytic tables: dims, the adapter's grid for the 672-px reference image,
    the analytic parameter count = the random-weight model's (built on the meta device, no memory)."""
    from lightkv.perf import Workload, get_spec, predict_profile
    from lightkv.perf.memory import parameter_count

    spec = get_spec("mistral-small-3.1-24b")
    t, v = spec.dims()
    assert (t.hidden, t.layers, t.heads, t.kv_heads, t.head_dim) == (5120, 40, 32, 8, 128)
    assert spec.grid() == (24, 24) and v.patches == 576 and v.tokens == 48 * 48
    model = spec.build(device="meta", dtype=torch.bfloat16)
    assert type(get_adapter(model)) is Mistral3Adapter and get_adapter(model).default_grid(672 * 672) == (24, 24)
    assert parameter_count(t, v) == pytest.approx(sum(p.numel() for p in model.parameters()), rel=1e-4)  # ~24.0 B
    method = lightkv.LightKV(**spec.reference_schedule())
    profile = predict_profile(spec, method, Workload())
    assert profile.vision_tokens[0] == method.kept_per_layer(40, ((24, 24),))
