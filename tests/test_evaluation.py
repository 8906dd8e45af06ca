"""The offline shapes benchmark: data, processor round trip, harness and the compare command (tiny random model)."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

import lightkv
from lightkv.evaluation import shapes
from lightkv.evaluation.harness import evaluate, load_model, question_set, write_results
from lightkv.evaluation.tiny_model import build_config, build_processor, format_prompt


def test_splits_are_deterministic_and_disjoint():
    a = shapes.make_split("train", 5, 4)
    b = shapes.make_split("train", 5, 4)
    for (sa, qa), (sb, qb) in zip(a, b):
        assert np.array_equal(np.asarray(sa.image), np.asarray(sb.image))
        assert [(q.question, q.answer) for q in qa] == [(q.question, q.answer) for q in qb]
    test = shapes.make_split("test", 5, 1)
    assert not any(np.array_equal(np.asarray(s.image), np.asarray(t.image)) for (s, _), (t, _) in zip(a, test))
    with pytest.raises(ValueError, match="split"):
        shapes.make_split("dev", 1)


def test_answers_follow_from_the_scene():
    vocab = set(shapes.vocabulary())
    for scene, questions in shapes.make_split("val", 60, 6):
        by_shape = {o.shape: o for o in scene.objects}
        for q in questions:
            assert set(q.question.split()) <= vocab and q.answer in vocab
            words = q.question.split()
            if q.family == "counting":
                assert q.answer == shapes.COUNT_WORDS[len(scene.objects)]
            elif q.family == "location":
                obj = by_shape[words[3]]
                assert q.answer.startswith("top" if obj.y < 32 else "bottom")
                assert q.answer.endswith("left" if obj.x < 32 else "right")
            elif q.family == "spatial":
                a, b = by_shape[words[3]], by_shape[words[7]]
                expected = {"left": a.x < b.x, "right": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y}
                assert expected[q.answer]
            elif q.family == "existence":
                present = any(o.color == words[3] and o.shape == words[4] for o in scene.objects)
                assert q.answer == ("yes" if present else "no")
            elif words[1] == "color":
                assert by_shape[words[4]].color == q.answer
            elif words[1] == "shape":
                [obj] = [o for o in scene.objects if o.color == words[4]]  # the colour is unique
                assert obj.shape == q.answer


def test_test_items_are_family_balanced():
    items = question_set(num_per_family=12)
    counts = Counter(q.family for _, q in items)
    assert counts == {f: 12 for f in shapes.FAMILIES}
    yes = sum(q.answer == "yes" for _, q in items if q.family == "existence")
    assert yes == 6  # existence answers alternate


def test_existence_is_balanced_with_several_questions_per_scene():
    """Dropping repeated questions must not tilt existence towards "no" (a scene has one "yes" question per
    object but many hard negatives)."""
    rng = np.random.default_rng(3)
    answers = Counter()
    for _ in range(600):
        scene = shapes.make_scene(rng)
        for q in shapes.make_questions(scene, rng, int(rng.integers(1, 11))):
            if q.family == "existence":
                answers[q.answer] += 1
    assert abs(answers["yes"] - answers["no"]) / sum(answers.values()) < 0.05
    fixed = shapes.make_questions(shapes.make_scene(rng), rng, 1, families=("existence",), existence_answer="yes")
    assert [q.answer for q in fixed] == ["yes"]


def test_processor_round_trip(tmp_path):
    processor = build_processor()
    processor.save_pretrained(tmp_path)
    from transformers import AutoProcessor

    loaded = AutoProcessor.from_pretrained(tmp_path)
    scene, [q] = shapes.make_split("test", 1, 1)[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q.question}]}]
    text = loaded.apply_chat_template(messages, add_generation_prompt=True)
    assert text == format_prompt(q.question)
    a = processor(images=[scene.image], text=[text], return_tensors="pt")
    b = loaded(images=[scene.image], text=[text], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    image_id = loaded.tokenizer.convert_tokens_to_ids("<image>")
    assert int((b["input_ids"] == image_id).sum()) == 256  # a 16 x 16 grid
    assert loaded.tokenizer.convert_ids_to_tokens(b["input_ids"][0, -1:].tolist()) == ["ASSISTANT:"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """An untrained model of the bundled architecture (2 decoder layers), saved and loaded like the real one."""
    from transformers import LlavaForConditionalGeneration

    path = tmp_path_factory.mktemp("tiny-shapes")
    processor = build_processor()
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(build_config(processor.tokenizer, text_layers=4))
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_harness_reports_accuracy_loyalty_and_cache(tiny_checkpoint, tmp_path):
    model, processor = load_model(tiny_checkpoint)
    items = question_set(num_per_family=3)
    base = evaluate(model, processor, None, items, progress=False)
    assert len(base.answers) == len(items) and base.retained_fraction == 1.0
    # a schedule that merges nothing: same answers, full cache
    same = evaluate(model, processor, lightkv.LightKV(layers=[1], windows=[2], ratios=[0.0]), items,
                    reference=base.answers, progress=False)
    assert same.loyalty == 1.0 and same.answers == base.answers
    assert same.vision_kv_ratio == 1.0 and same.retained_fraction == 1.0
    method = lightkv.LightKV(layers=[1, 2], windows=[2, 1], ratios=[0.5, 0.5])
    r = evaluate(model, processor, method, items, reference=base.answers, progress=False, batch_size=4)
    expected = lightkv.retained_fraction(method, 4, [(16, 16)])
    assert r.retained_fraction == pytest.approx(expected)
    assert r.vision_kv_ratio == pytest.approx(expected)
    assert 0 <= r.loyalty <= 1 and r.total_kv_ratio < 1
    assert 0.0 <= r.accuracy <= 1.0 and set(r.per_family) == set(shapes.FAMILIES)
    write_results([base, r], tmp_path)
    rows = json.loads((tmp_path / "results.json").read_text())
    for row in rows:
        assert {"method", "budget", "retained_fraction", "accuracy", "loyalty"} <= set(row)
    assert (tmp_path / "accuracy_vs_budget.png").stat().st_size > 0
    assert "| chance |" in (tmp_path / "results.md").read_text()


def test_compare_command_writes_one_row_per_method_and_budget(tiny_checkpoint, tmp_path):
    from lightkv.cli import main

    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(tiny_checkpoint), "--methods", "lightkv,tome,fastv,visionzip",
                 "--budgets", "0.6,0.4", "--per-family", "1", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["none", "lightkv@0.60", "lightkv@0.40", "tome@0.60", "tome@0.40", "fastv@0.60", "fastv@0.40",
                                           "visionzip@0.60", "visionzip@0.40"]
    for row in rows[1:]:
        # the fraction reached by the run is the one the budget matcher predicted
        assert row["retained_fraction"] == pytest.approx(row["params"]["predicted_fraction"], abs=1e-9)
        assert row["flops_ratio"] < 1


def test_demo_command_on_a_checkpoint(tiny_checkpoint, tmp_path):
    from lightkv.cli import main

    assert main(["demo", "--model", str(tiny_checkpoint), "--per-family", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in rows] == ["none", "lightkv@0.55", "lightkv@0.30"]
    for row, target in zip(rows[1:], (0.55, 0.30)):
        # 4 decoder layers cannot go below 0.47 with three stages: the run reaches what the matcher promises
        assert row["retained_fraction"] == pytest.approx(lightkv.match_budget("lightkv", target, 4, (16, 16))
                                                         .retained_fraction)
    assert abs(rows[1]["retained_fraction"] - 0.55) < 0.01
    assert (tmp_path / "merge_maps.png").stat().st_size > 0


def test_caption_names_every_object_once():
    for scene, _ in shapes.make_split("train", 20, 0):
        parts = [p.split() for p in shapes.describe(scene).split(" ; ")]
        assert sorted((p[0], p[1], p[2]) for p in parts) == sorted((o.size, o.color, o.shape) for o in scene.objects)
        assert all(p[3] in shapes.QUADRANTS for p in parts)


# -- the Qwen2.5-VL-architecture bundled model's path through the same harness ---------------------------------

def test_qwen_processor_round_trip(tmp_path):
    from lightkv.evaluation.tiny_model import QwenShapesProcessor, format_qwen_prompt

    processor = QwenShapesProcessor()
    processor.save_pretrained(tmp_path)
    loaded = QwenShapesProcessor.from_pretrained(tmp_path)
    scene, [q] = shapes.make_split("test", 1, 1)[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q.question}]}]
    text = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.strip() == format_qwen_prompt(q.question)
    a = processor(images=[scene.image], text=[text], return_tensors="pt")
    b = loaded(images=[scene.image], text=[text], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    assert b["image_grid_thw"].tolist() == [[1, 32, 32]]  # 2 px patches; 2 x 2 merged: 16 x 16 tokens
    assert int(b["mm_token_type_ids"].sum()) == 256 == int((b["input_ids"] == loaded.image_token_id).sum())
    with pytest.raises(ValueError, match="placeholders"):
        loaded(images=[scene.image, scene.image], text=[text], return_tensors="pt")


@pytest.fixture(scope="module")
def tiny_qwen_checkpoint(tmp_path_factory):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from lightkv.evaluation.tiny_model import QwenShapesProcessor, build_qwen_config

    path = tmp_path_factory.mktemp("tiny-qwen-shapes")
    processor = QwenShapesProcessor()
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(build_qwen_config(processor.tokenizer, text_layers=4)).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_harness_and_demo_on_a_qwen_checkpoint(tiny_qwen_checkpoint, tmp_path):
    from lightkv.cli import main

    model, processor = load_model(tiny_qwen_checkpoint)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    items = question_set(num_per_family=2)
    base = evaluate(model, processor, None, items, progress=False)
    same = evaluate(model, processor, lightkv.LightKV(layers=[1], windows=[2], ratios=[0.0]), items,
                    reference=base.answers, progress=False)
    assert same.answers == base.answers and same.retained_fraction == 1.0
    method = lightkv.LightKV(layers=[1, 2], windows=[2, 1], ratios=[0.5, 0.5])
    r = evaluate(model, processor, method, items, reference=base.answers, progress=False, batch_size=4)
    expected = lightkv.retained_fraction(method, 4, [(16, 16)])
    assert r.retained_fraction == pytest.approx(expected) and r.vision_kv_ratio == pytest.approx(expected)
    assert main(["demo", "--model", str(tiny_qwen_checkpoint), "--per-family", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [row["method"] for row in rows] == ["none", "lightkv@0.55", "lightkv@0.30"]
    assert 0 < rows[1]["flops_ratio"] < 1
    assert (tmp_path / "merge_maps.png").stat().st_size > 0


def test_demo_and_compare_take_a_bundled_name_or_a_folder(tmp_path, capsys):
    import argparse

    from lightkv.bundled import BUNDLED_MODEL, BUNDLED_QWEN_MODEL
    from lightkv.cli import _bundled, main

    parser = argparse.ArgumentParser()
    (tmp_path / "config.json").write_text("{}")
    assert _bundled(parser, None) == BUNDLED_MODEL and _bundled(parser, "llava") == BUNDLED_MODEL
    assert _bundled(parser, "qwen") == BUNDLED_QWEN_MODEL and _bundled(parser, str(tmp_path)) == str(tmp_path)
    for command in ("demo", "compare"):
        with pytest.raises(SystemExit):
            main([command, "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
        assert "not a model folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_store_bf16_halves_the_file_and_loads_as_float32(tiny_qwen_checkpoint, tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    folder = tmp_path / "model"
    shutil.copytree(tiny_qwen_checkpoint, folder)
    size = (folder / "model.safetensors").stat().st_size
    script = Path(__file__).resolve().parents[1] / "scripts" / "store_bf16.py"
    subprocess.run([sys.executable, str(script), str(folder)], check=True, capture_output=True)
    assert (folder / "model.safetensors").stat().st_size < 0.55 * size
    original, _ = load_model(tiny_qwen_checkpoint)
    model, _ = load_model(folder)
    assert model.dtype == torch.float32
    before, after = original.state_dict(), model.state_dict()
    assert set(before) == set(after)
    for name, tensor in before.items():  # every weight is loaded as its bf16 rounding
        assert torch.equal(after[name], tensor.to(torch.bfloat16).float()), name
