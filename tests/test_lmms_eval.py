"""The lmms-eval plugin, end to end through the real lmms-eval command line, against our own harness.

Needs the eval extra (lmms-eval, torchvision): `make test-eval` runs this file in .venv-eval; under the core
install every test here is skipped.
"""

import json
import os

import pytest
import torch

lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (the eval extra: make eval-venv)")

import lightkv  # noqa: E402
from lightkv.evaluation.harness import evaluate, load_model, question_set  # noqa: E402
from lightkv.evaluation.local_task import read_shapes_task, write_shapes_task  # noqa: E402
from lightkv.evaluation.lmms_run import run_eval  # noqa: E402
from lightkv.evaluation.tiny_model import BUNDLED_MODEL  # noqa: E402

PER_FAMILY = 20  # 100 questions


@pytest.fixture(scope="module")
def bundled():
    return load_model(BUNDLED_MODEL)


def _samples(folder):
    files = list(folder.rglob("*_samples_*.jsonl"))
    assert len(files) == 1, files
    rows = [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]
    return {row["doc_id"]: row for row in rows}


def _schedule(model):
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    return lightkv.match_budget("lightkv", 0.55, model.config.text_config.num_hidden_layers, (side, side)).method


@pytest.fixture(scope="module")
def lmms_runs(tmp_path_factory):
    """`lightkv eval` on the bundled model: the real `python -m lmms_eval` command, once per method."""
    out = tmp_path_factory.mktemp("lmms-eval")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the subprocesses share 2 cores with nothing to gain from more
    rows = run_eval(str(BUNDLED_MODEL), ["none", "lightkv@0.55"], ["lightkv_shapes"], out, batch_size=25,
                    shapes_per_family=PER_FAMILY, offline=True, echo=False)
    return out, {row["method"]: row for row in rows}


def test_local_task_holds_the_harness_questions(tmp_path):
    folder = write_shapes_task(tmp_path / "task", per_family=4)
    rows = read_shapes_task(folder)
    items = question_set(4)
    assert [(r["question"], r["answer"], r["family"]) for r in rows] == \
        [(q.question, q.answer, q.family) for _, q in items]
    assert (folder / "lightkv_shapes.yaml").exists() and all(os.path.exists(r["image"]) for r in rows)


def test_lmms_eval_agrees_with_harness(bundled, lmms_runs):
    """Per-question answers of lmms-eval + plugin equal the harness's, uncompressed and with LightKV at ~55%."""
    model, processor = bundled
    out, rows = lmms_runs
    items = question_set(PER_FAMILY)
    report = []
    for label, method in (("none", None), ("lightkv@0.55", _schedule(model))):
        ours = evaluate(model, processor, method, items, name=label, batch_size=25, progress=False)
        samples = _samples(out / label.replace("@", "_"))
        assert sorted(samples) == list(range(len(items)))
        predictions = [samples[i]["filtered_resps"] for i in range(len(items))]
        predictions = [p[0] if isinstance(p, list) else p for p in predictions]
        assert predictions == ours.answers, label
        row = rows[label]
        assert row["scores"]["exact_match"] == pytest.approx(ours.accuracy, abs=1e-12)
        for family, value in ours.per_family.items():
            assert row["scores"][family] == pytest.approx(value, abs=1e-12)
        eff = row["efficiency"]
        assert eff["sequences"] == len(items)
        assert eff["retained_fraction"] == pytest.approx(ours.retained_fraction, abs=1e-9)
        report.append(f"{label}: lmms-eval exact_match {row['scores']['exact_match']:.3f}, harness accuracy "
                      f"{ours.accuracy:.3f}, {len(items)} questions, retained {eff['retained_fraction']:.3f}, "
                      f"KV ratio {eff['kv_ratio']:.3f}")
    assert rows["lightkv@0.55"]["efficiency"]["kv_ratio"] < 0.65
    assert rows["none"]["efficiency"]["kv_ratio"] == 1.0
    print("\n" + "\n".join(report))
    results = json.loads((out / "results.json").read_text())
    assert {(r["method"], r["task"]) for r in results} == {("none", "lightkv_shapes"),
                                                          ("lightkv@0.55", "lightkv_shapes")}
    assert "| lightkv@0.55 | lightkv_shapes |" in (out / "results.md").read_text()


def test_data_parallel_two_processes_shard_and_agree(bundled, tmp_path):
    """accelerate launch with two processes (on the CPU here, one GPU each on a GPU machine): the documents are
    split between them, every answer is the harness's, and the statistics of both processes add up."""
    model, processor = bundled
    items = question_set(PER_FAMILY)
    ours = evaluate(model, processor, _schedule(model), items, batch_size=25, progress=False)
    rows = run_eval(str(BUNDLED_MODEL), ["lightkv@0.55"], ["lightkv_shapes"], tmp_path, batch_size=25,
                    num_processes=2, shapes_per_family=PER_FAMILY, offline=True, echo=False)
    samples = _samples(tmp_path / "lightkv_0.55")
    assert [samples[i]["filtered_resps"] for i in range(len(items))] == ours.answers
    assert len(list((tmp_path / "lightkv_0.55").glob("lightkv_stats.rank*.json"))) == 2
    assert rows[0]["scores"]["exact_match"] == pytest.approx(ours.accuracy, abs=1e-12)
    assert rows[0]["efficiency"]["sequences"] == len(items)
    assert rows[0]["efficiency"]["retained_fraction"] == pytest.approx(ours.retained_fraction, abs=1e-9)
    print(f"\n2 processes: lmms-eval exact_match {rows[0]['scores']['exact_match']:.3f}, harness accuracy "
          f"{ours.accuracy:.3f}")


# -- the plugin class, driven directly with lmms-eval Instances -------------------------------------------------


def _plugin(**kwargs):
    from lightkv.evaluation.lmms_model import LightKVModel

    return LightKVModel(pretrained=str(BUNDLED_MODEL), **kwargs)


def _requests(plugin, items, gen_kwargs, task="shapes", request_type="generate_until", continuations=None):
    from lmms_eval.api.instance import Instance

    plugin.task_dict = {task: {"test": {i: {"image": scene.image, "question": q.question}
                                        for i, (scene, q) in enumerate(items)}}}

    def doc_to_visual(doc):
        return [doc["image"]]

    requests = []
    for i, (_, q) in enumerate(items):
        second = gen_kwargs if continuations is None else continuations[i]
        requests.append(Instance(request_type=request_type, idx=0, metadata={"task": task, "doc_id": i, "repeats": 1},
                                 arguments=(q.question, dict(second) if isinstance(second, dict) else second,
                                            doc_to_visual, i, task, "test")))
    return requests


GREEDY = {"max_new_tokens": 4, "temperature": 0, "until": ["</s>"]}


def test_plugin_batches_equal_single_prompts():
    items = question_set(2)[:6]
    for method in ({"method": "none"}, {"method": "lightkv", "budget": 0.55}):
        batched = _plugin(batch_size=4, **method)
        single = _plugin(batch_size=1, **method)
        a = [r.text for r in batched.generate_until(_requests(batched, items, GREEDY))]
        b = [r.text for r in single.generate_until(_requests(single, items, GREEDY))]
        assert a == b, method
        stats = batched.efficiency()["shapes"]
        assert stats["sequences"] == len(items)
        if method["method"] == "none":
            assert stats["retained_fraction"] == 1.0 and stats["kv_ratio"] == 1.0
        else:
            assert 0.5 < stats["retained_fraction"] < 0.6 and stats["kv_ratio"] < 0.65


def test_plugin_beam_search_counts_every_beam():
    items = question_set(2)[:4]
    plugin = _plugin(batch_size=4)
    greedy = plugin.generate_until(_requests(plugin, items, GREEDY))
    plugin.generate_until(_requests(plugin, items, {**GREEDY, "num_beams": 3}, task="beams"))
    eff = plugin.efficiency()
    assert eff["beams"]["sequences"] == eff["shapes"]["sequences"] == len(items) and len(greedy) == len(items)
    assert eff["beams"]["kv_bytes_per_sequence"] == 3 * eff["shapes"]["kv_bytes_per_sequence"]


def test_plugin_method_fields_and_bad_arguments():
    plugin = _plugin(method="lightkv", layers="[1,2]", windows="2;1", ratios="0.5;0.5", guidance="uniform")
    assert plugin.method == lightkv.LightKV(layers=[1, 2], windows=[2, 1], ratios=[0.5, 0.5], guidance="uniform")
    assert plugin.handle is not None and plugin.handle.method is plugin.method
    with pytest.raises(ValueError, match="has no field"):
        _plugin(method="fastv", windows="2")
    with pytest.raises(ValueError, match="unknown method"):
        _plugin(method="nope")
    with pytest.raises(ValueError, match="batch_size"):
        _plugin(batch_size="auto")


def test_plugin_stop_strings_and_sampling():
    items = question_set(2)[:4]
    plugin = _plugin(batch_size=4, method="lightkv", budget=0.55)
    greedy = [r.text for r in plugin.generate_until(_requests(plugin, items, GREEDY))]
    # a stop string inside the answer cuts it there, like lmms-eval's own models
    cut = [r.text for r in plugin.generate_until(_requests(plugin, items, {**GREEDY, "until": ["o"]}))]
    assert cut == [g.split("o")[0] for g in greedy]
    # sampling: reproducible under a seed, and a high temperature gives answers greedy decoding does not
    sample = {"max_new_tokens": 4, "temperature": 5.0, "do_sample": True, "top_p": 1.0}
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append([r.text for r in plugin.generate_until(_requests(plugin, items * 4, sample))])
    assert runs[0] == runs[1]
    assert runs[0] != greedy * 4


def test_plugin_stop_criterion_ends_rows_on_text():
    from lightkv.evaluation.lmms_model import _StopStrings, truncate_at_stop

    plugin = _plugin()
    tok = plugin.tokenizer
    ids = torch.tensor([tok.convert_tokens_to_ids(["<s>", "how", "many", "yes", "no"]),
                        tok.convert_tokens_to_ids(["<s>", "how", "many", "one", "two"])])
    done = _StopStrings(tok, ["no"], prompt_length=3)(ids, None)
    assert done.tolist() == [True, False]
    assert truncate_at_stop("yes no maybe", ["no", "may"]) == "yes "
    assert truncate_at_stop("yes", []) == "yes"


def test_plugin_loglikelihood_matches_greedy_answer():
    items = [(s, q) for s, q in question_set(4) if q.family == "existence"][:3]
    plugin = _plugin(method="lightkv", budget=0.55)
    answers = [r.text for r in plugin.generate_until(_requests(plugin, items, GREEDY))]
    for word in ("yes", "no"):
        scores = plugin.loglikelihood(_requests(plugin, items, None, request_type="loglikelihood",
                                                continuations=[" " + word] * len(items)))
        for (logprob, greedy), answer in zip(scores, answers):
            assert logprob < 0
            assert greedy == (answer == word)


def _save_tiny_qwen2_5_vl(folder):
    """A random tiny Qwen2.5-VL and a real Qwen2_5_VLProcessor (word-level tokenizer, Qwen chat layout), saved like
    a hub checkpoint: the plugin loads it with AutoModelForImageTextToText / AutoProcessor."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from lightkv import testing

    special = {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>", 3: "<unk>",
               testing.QWEN_VISION_START: "<|vision_start|>", testing.QWEN_VISION_END: "<|vision_end|>",
               testing.QWEN_VIDEO_TOKEN: "<|video_pad|>", testing.QWEN_IMAGE_TOKEN: "<|image_pad|>"}
    vocab = {token: i for i, token in special.items()}
    vocab.update({word: 10 + i for i, word in enumerate("user assistant what color is the shape ? yes no".split())})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                        unk_token="<unk>", padding_side="left",
                                        additional_special_tokens=[t for i, t in special.items() if i not in (0, 3)])
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %} {{ c['text'] }}"
                "{% endif %}{% endfor %}<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant "
                "{% endif %}")
    sizes = dict(patch_size=2, merge_size=2, temporal_patch_size=2)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64}, **sizes),
        video_processor=Qwen2VLVideoProcessor(**sizes), tokenizer=tokenizer, chat_template=template)
    testing.tiny_qwen2_5_vl(num_layers=4).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_plugin_runs_qwen2_5_vl(tmp_path):
    """Another family through the same plugin: images of different sizes in one batch, budget from max_pixels."""
    import numpy as np
    from lmms_eval.api.instance import Instance
    from PIL import Image

    from lightkv.evaluation.lmms_model import LightKVModel

    folder = _save_tiny_qwen2_5_vl(tmp_path / "qwen")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64 - 8 * (i % 2), 64, 3), dtype=np.uint8)) for i in range(3)]
    runs = {}
    for label, kwargs in (("none", {}), ("lightkv@0.55", {"method": "lightkv", "budget": 0.55, "max_pixels": 4096}),
                          ("grid", {"method": "fastv", "budget": 0.35, "grid": "16x16"})):
        plugin = LightKVModel(pretrained=str(folder), batch_size=3, **kwargs)
        plugin.task_dict = {"t": {"test": dict(enumerate({"image": image} for image in images))}}
        requests = [Instance(
            request_type="generate_until", idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1},
            arguments=("what color is the shape ?", {"max_new_tokens": 2, "temperature": 0},
                       lambda doc: [doc["image"]], i, "t", "test")) for i in range(len(images))]
        assert len(plugin.generate_until(requests)) == len(images)
        runs[label] = plugin.efficiency()["t"]
    assert runs["none"]["retained_fraction"] == 1.0 and runs["none"]["kv_ratio"] == 1.0
    assert runs["lightkv@0.55"]["retained_fraction"] == pytest.approx(0.55, abs=0.03)
    assert runs["grid"]["retained_fraction"] == pytest.approx(0.35, abs=0.01)
    with pytest.raises(ValueError, match="grid=RxC"):
        LightKVModel(pretrained=str(folder), method="lightkv", budget=0.55)
    small = LightKVModel(pretrained=str(folder), max_pixels=1024)  # 16 x 16 patches: 8 x 8 = 64 tokens per image
    assert int((small._inputs(["<|image_pad|>"], [[images[0]]])["input_ids"] == 127).sum()) == 64
    with pytest.raises(ValueError, match="Qwen2-VL-family"):
        _plugin(max_pixels=1024)
