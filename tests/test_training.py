"""The bundled models' training script: packed QA turns are exactly the evaluation prompts."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightkv.evaluation.shapes import describe, make_questions, make_scene

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_tiny_llava.py"


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_tiny_llava", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_tiny_llava"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch_name,sizes", [("llava", {}), ("qwen2.5-vl", {}),
                                             ("qwen2.5-vl", {"patch_size": 4, "merge_size": 1})],
                         ids=["llava", "qwen2.5-vl", "qwen2.5-vl-patch4-merge1"])
def test_packed_turns_equal_single_prompts(train, arch_name, sizes):
    """Each turn of a packed training sequence (block mask, restarted positions; M-RoPE for Qwen) gives the
    logits the same question gets as a lone evaluation prompt, so no turn sees another turn's answer."""
    torch.manual_seed(0)
    arch = train.Arch(arch_name, **sizes)
    model = arch.model_class(arch.config).eval()
    model.set_attn_implementation("sdpa")
    batch, patch_labels, ground = train.make_batch(arch, np.random.default_rng(1), 2, 3, caption_rate=1.0)
    assert patch_labels.shape == (2, 256, 6)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    rng = np.random.default_rng(1)  # replay make_batch's draws
    checked = 0
    for b in range(2):
        scene = make_scene(rng)
        qas = [(q.question, q.answer) for q in make_questions(scene, rng, int(rng.integers(1, 4)))]
        rng.random()
        qas.insert(int(rng.integers(len(qas) + 1)), ("describe the image", describe(scene)))
        ids, labels, segment, _, _ = train.encode_sequence(arch, 256, qas)
        assert ids == batch["input_ids"][b, : len(ids)].tolist()
        for k, (question, answer) in enumerate(qas, start=1):
            inputs = arch.processor(images=[scene.image], text=[arch.prompt(question) + " " + answer],
                                    return_tensors="pt")
            with torch.no_grad():
                single = model(**inputs).logits[0]
            rows = [i for i, s in enumerate(segment) if s in (0, k)][: single.shape[0]]
            torch.testing.assert_close(packed[b, rows], single, atol=1e-4, rtol=1e-4)
            checked += 1
    assert checked >= 4


def test_turn_mask(train):
    segment = torch.tensor([[0, 0, 1, 1, 2, 2, -1]])
    mask = train.turn_mask(segment)[0, 0]
    assert mask[3].tolist() == [True, True, True, True, False, False, False]
    assert mask[5].tolist() == [True, True, False, False, True, True, False]
    assert mask[6].tolist() == [False] * 6 + [True]


def test_tied_query_key_init_makes_attention_prefer_similar_tokens(train):
    """After tie_query_key_init every query head holds its key head's weights, so q.k is a positive form."""
    torch.manual_seed(0)
    arch = train.Arch("llava")
    model = arch.model_class(arch.config)
    train.tie_query_key_init(model, 2.0)
    text = model.config.get_text_config()
    attn = model.model.language_model.layers[3].self_attn
    q = attn.q_proj.weight.view(text.num_attention_heads, text.head_dim, -1)
    k = attn.k_proj.weight.view(text.num_key_value_heads, text.head_dim, -1)
    group = text.num_attention_heads // text.num_key_value_heads
    for h in range(text.num_attention_heads):
        assert torch.equal(q[h], k[h // group])
    x = torch.randn(50, text.hidden_size)
    for h in range(text.num_attention_heads):
        scores = (x @ q[h].T) @ (x @ k[h // group].T).T
        # without rotary positions a token's own key is its best match
        assert (scores.argmax(-1) == torch.arange(50)).float().mean() > 0.9


def test_alignment_loss_prefers_the_patch_words(train):
    arch = train.Arch("llava")
    model = arch.model_class(arch.config)
    embeddings = model.get_input_embeddings().weight.detach()
    word_ids = arch.attribute_word_ids()
    rng = np.random.default_rng(0)
    labels = torch.stack([train.patch_targets(make_scene(rng), 4) for _ in range(2)])
    aligned = torch.zeros(2, 256, embeddings.shape[1])
    for k, ids in enumerate(word_ids):  # each patch = the sum of its own words' embeddings
        classes = (labels[..., k] - (1 if k < 3 else 0)).clamp(min=0)
        aligned += embeddings[ids][classes]
    good = train.alignment_loss(aligned, labels, embeddings, word_ids)
    bad = train.alignment_loss(torch.randn_like(aligned), labels, embeddings, word_ids)
    assert good < 0.5 * bad


def test_grounding_targets_mark_the_named_object(train):
    rng = np.random.default_rng(4)
    checked = 0
    for _ in range(40):
        scene = make_scene(rng)
        for q in make_questions(scene, rng, 6):
            words = q.question.split()
            marks = train.grounding_targets(scene, q.question)
            if q.family == "counting":
                assert marks == []
                continue
            for i, t in marks:
                if q.family == "existence":
                    assert i == 4 and t[0] == (1 if q.answer == "yes" else 0)
                    if q.answer == "no":
                        assert t[1:] == [-100] * 6
                        continue
                obj = [o for o in scene.objects if o.shape == train.SHAPES[t[2]]][0]
                assert t[0] == 1 and list(train.COLORS)[t[1]] == obj.color and words[i] in (obj.shape, obj.color)
                if q.family == "location":
                    assert t[4] == train.QUADRANTS.index(q.answer)
                checked += 1
    assert checked > 100
    # make_batch puts them on the right tokens of the packed sequence
    arch = train.Arch("llava")
    batch, _, ground = train.make_batch(arch, np.random.default_rng(2), 2, 6, caption_rate=0.0)
    tokens = arch.processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][ground[..., 0] >= 0].tolist())
    assert tokens and all(t in train.SHAPES or t in train.COLORS for t in tokens)


def test_qwen_patch_and_merge_sizes(train):
    """--qwen-patch-size / --qwen-merge-size: the processor and the config agree, the grid stays 16 x 16 tokens,
    and sizes that would change it (or that LLaVA does not have) are refused."""
    arch = train.Arch("qwen2.5-vl", patch_size=4, merge_size=1)
    vision = arch.config.vision_config
    assert (vision.patch_size, vision.spatial_merge_size) == (4, 1)
    inputs, labels = train.image_batch(arch, np.random.default_rng(0), 2)
    assert inputs["image_grid_thw"].tolist() == [[1, 16, 16]] * 2 and labels.shape == (2, 256, 6)
    text = arch.prompt("how many objects are there ?")
    out = arch.processor(images=[make_scene(np.random.default_rng(0)).image], text=[text])
    assert int(out["mm_token_type_ids"].sum()) == 256
    with pytest.raises(ValueError, match="must be 4 px"):
        train.Arch("qwen2.5-vl", patch_size=4)
    with pytest.raises(ValueError, match="qwen2.5-vl only"):
        train.Arch("llava", merge_size=1)


def test_tower_probe_reads_only_what_the_features_hold(train):
    """scripts/probe_tower_shapes.py's linear probe: labels a linear map of the features carries are read
    back; labels independent of the features score at chance."""
    path = SCRIPT.parent / "probe_tower_shapes.py"
    spec = importlib.util.spec_from_file_location("probe_tower_shapes", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=gen)
    assert probe.fit_probe(x, (x[:, :3] @ torch.tensor([1.0, -2.0, 0.5]) > 0).long()) > 0.95
    assert abs(probe.fit_probe(x, torch.randint(0, 4, (2000,), generator=gen)) - 0.25) < 0.06
