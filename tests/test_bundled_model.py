"""The bundled model loads offline like a hub checkpoint and answers through generate as through the harness."""

import pytest
import torch

from lightkv.evaluation.harness import evaluate, load_model, question_set
from lightkv.evaluation.shapes import CHANCE
from lightkv.evaluation.tiny_model import BUNDLED_MODEL, format_prompt


@pytest.fixture(scope="module")
def bundled():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(BUNDLED_MODEL)
    model = LlavaForConditionalGeneration.from_pretrained(BUNDLED_MODEL).eval()
    return model, processor


def test_bundled_model_is_a_plain_llava_checkpoint(bundled):
    model, processor = bundled
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.text_config.num_hidden_layers >= 8
    assert model.config.text_config.num_key_value_heads < model.config.text_config.num_attention_heads  # GQA
    assert (BUNDLED_MODEL / "model.safetensors").exists()
    assert not list(BUNDLED_MODEL.glob("*.bin")) and not list(BUNDLED_MODEL.glob("*.pt"))


def test_generate_answers_match_the_harness(bundled):
    model, processor = bundled
    items = question_set(num_per_family=4)
    result = evaluate(model, processor, None, items, progress=False)
    inputs = processor(images=[s.image for s, _ in items], text=[format_prompt(q.question) for _, q in items],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    first = processor.tokenizer.convert_ids_to_tokens(out[:, inputs["input_ids"].shape[1]].tolist())
    assert first == result.answers


def test_bundled_model_meets_its_quality_bar():
    """The quality bar of the bundled model (85% on the test split, every family clearly above chance), on the
    first 100 test questions; also a guard against a broken checkpoint, processor or harness."""
    model, processor = load_model()
    items = question_set(num_per_family=20)
    result = evaluate(model, processor, None, items, progress=False)
    assert result.accuracy >= 0.85
    for family, accuracy in result.per_family.items():
        assert accuracy >= CHANCE[family] + 0.3, family
