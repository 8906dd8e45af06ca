"""The bundled models (LLaVA and Qwen2.5-VL architectures) load offline like hub checkpoints, answer through
generate as through the harness, keep their accuracy, and ship inside the package."""

import json
import subprocess
import sys
from glob import glob
from pathlib import Path

import pytest
import torch

import lightkv
from lightkv.evaluation.harness import evaluate, load_model, prompt_for, question_set
from lightkv.evaluation.shapes import CHANCE
from lightkv.evaluation.tiny_model import BUNDLED_MODEL, BUNDLED_QWEN_MODEL

BUNDLED = {"llava": (BUNDLED_MODEL, "LlavaForConditionalGeneration"),
           "qwen2.5-vl": (BUNDLED_QWEN_MODEL, "Qwen2_5_VLForConditionalGeneration")}


@pytest.fixture(scope="module", params=list(BUNDLED))
def bundled(request):
    path, class_name = BUNDLED[request.param]
    if request.param == "llava":
        # the LLaVA model and its processor load through the Auto classes, as a hub checkpoint does
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(path).eval()
        processor = AutoProcessor.from_pretrained(path)
    else:
        model, processor = load_model(path)  # Qwen2_5_VLForConditionalGeneration.from_pretrained + its processor
    return path, class_name, model, processor


def test_bundled_model_is_a_plain_checkpoint(bundled):
    path, class_name, model, _ = bundled
    assert type(model).__name__ == class_name
    text = model.config.get_text_config()
    assert text.num_hidden_layers >= 8
    assert text.num_key_value_heads < text.num_attention_heads  # GQA
    assert (path / "model.safetensors").exists()
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))
    assert sum(f.stat().st_size for f in path.iterdir()) < 25e6


def test_generate_answers_match_the_harness(bundled):
    _, _, model, processor = bundled
    items = question_set(num_per_family=4)
    result = evaluate(model, processor, None, items, progress=False)
    inputs = processor(images=[s.image for s, _ in items], text=[prompt_for(processor)(q.question) for _, q in items],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    first = processor.tokenizer.convert_ids_to_tokens(out[:, inputs["input_ids"].shape[1]].tolist())
    assert first == result.answers


def test_bundled_model_keeps_its_accuracy(bundled):
    """A guard against a broken checkpoint, processor or harness: on the first 100 test questions each bundled
    model reaches the benchmark's 85% bar and every family is clearly above chance. (Whether a model meets the
    bar is judged on 500 and 1,000 test questions: README and docs/results.)"""
    _, _, model, processor = bundled
    result = evaluate(model, processor, None, question_set(num_per_family=20), progress=False)
    assert result.accuracy >= 0.85
    for family, accuracy in result.per_family.items():
        assert accuracy >= CHANCE[family] + 0.3, family


# -- bundled models: package data, one neutral module, no perf <-> evaluation import ----------------------------


def test_bundled_models_live_inside_the_package():
    from lightkv.bundled import BUNDLED_MODEL, BUNDLED_QWEN_MODEL
    from lightkv.evaluation import tiny_model
    from lightkv.perf.specs import _bundled_model_path

    package = Path(lightkv.__file__).resolve().parent  # wherever lightkv is installed (editable or not)
    for path in (BUNDLED_MODEL, BUNDLED_QWEN_MODEL):
        assert path.is_relative_to(package) and (path / "config.json").is_file()
        assert (path / "model.safetensors").is_file()
    assert tiny_model.BUNDLED_MODEL == BUNDLED_MODEL and tiny_model.BUNDLED_QWEN_MODEL == BUNDLED_QWEN_MODEL
    assert load_model.__defaults__[0] == BUNDLED_MODEL
    assert _bundled_model_path() == str(BUNDLED_MODEL)
    assert json.loads((BUNDLED_MODEL / "config.json").read_text())["model_type"] == "llava"


def test_package_data_lists_every_bundled_file():
    """pyproject's package data covers every file of the bundled models (else a wheel ships without them)."""
    from lightkv.bundled import MODELS_DIR

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["lightkv"]
    package = MODELS_DIR.parent
    files = {p.relative_to(package).as_posix() for p in MODELS_DIR.rglob("*") if p.is_file()}
    shipped = {f for pattern in patterns for f in glob(pattern, root_dir=package)}
    assert len(files) >= 16 and files <= shipped


def test_perf_does_not_import_evaluation():
    code = ("import sys; from lightkv.perf.specs import get_spec; spec = get_spec('trained'); "
            "assert spec.pretrained, spec; "
            "bad = sorted(m for m in sys.modules if m.startswith('lightkv.evaluation')); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
