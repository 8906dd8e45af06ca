"""Device -> host syncs of the hot path, counted on CPU with lightkv.perf.syncs (the ops that sync on CUDA).

Goals held here (exact counts, patched minus unpatched): decode steps add no sync (batch 1, padded batches,
LLaVA and Qwen); a prefill stage adds 1 (LightKV, ToMe, FastV, PDrop, DART), before the decoder
1 (LLaVA, LLaVA-NeXT / OneVision, InternVL, Gemma 3, Aya Vision) or 2 (Qwen and GLM-4V under ``generate``,
Idefics3, Mistral3 / Pixtral), after the last stage 1, whatever the batch size, padding or number of images; the per-sample diagnostics
(kept_positions, merge_maps) cost syncs only with ``apply(..., record=True)``.
"""

import pytest
import torch

import lightkv
from lightkv.perf.syncs import SyncCounter, count_syncs, format_report
from lightkv.testing import (aya_vision_prompt, batch_prompts, gemma3_prompt, glm4v_prompt, idefics3_prompt,
                             internvl_prompt, llava_next_prompt, llava_prompt, mistral3_prompt, qwen_prompt,
                             tiny_aya_vision, tiny_gemma3, tiny_glm4v, tiny_idefics3, tiny_internvl, tiny_llava,
                             tiny_llava_next, tiny_llava_onevision, tiny_mistral3, tiny_pixtral_llava, tiny_qwen2_5_vl)

SCHEDULE = dict(layers=(1, 2, 4), windows=(4, 2, 1), ratios=(0.5, 0.5, 0.5))
QWEN_SCHEDULE = dict(layers=(1, 2), windows=(1, 1), ratios=(0.5, 0.5), min_tokens_per_window=4)
# one read per stage: a windowed merge (LightKV, ToMe) reads its table sizes, the kept tokens per row (the
# engine's new length), the images the stage skips and LightKV's prompt width (stage 0) at once; a pruning method
# (FastV, PDrop, DART) leaves the engine's read of the new length (DART bounds its pivots by num_pivots)
MERGE_STAGE, PRUNE_STAGE = 1, 1
# before the decoder, the adapters' layouts: LLaVA one read; Qwen one read with image_grid_thw, a second one
# under ``generate`` (it passes 3-D positions instead of the grids: the grids are read back from them)
BEFORE = {"llava": 1, "qwen": 2}
# the other layouts: LLaVA-NeXT / OneVision (row counts with image_sizes or the encoded features' newline
# statistics) and InternVL (image tokens and the first bad run) one read; Idefics3 and Mistral3 / Pixtral two (the
# number of runs of image tokens, then the table of the runs with the token next to each)
LAYOUTS = {
    "llava_next": (tiny_llava_next, 1, lambda m: llava_next_prompt(m, [1, 3, 4], [7, 8, 9]),
                   lambda m: llava_next_prompt(m, [1, 3], [7], image_sizes=((20, 30), (30, 20), (24, 24)), seed=1)),
    "llava_onevision": (tiny_llava_onevision, 1, lambda m: llava_next_prompt(m, [1, 3, 4], [7, 8, 9]),
                        lambda m: llava_next_prompt(m, [1, 3], [7], image_sizes=((20, 30), (40, 12)), video_frames=2,
                                                    seed=1)),
    "internvl": (tiny_internvl, 1, lambda m: internvl_prompt(m, [1, 3, 4], [7, 8, 9]),
                 lambda m: internvl_prompt(m, [1, 3], [7], tiles=[2, 1, 3], seed=1)),
    "idefics3": (tiny_idefics3, 2, lambda m: idefics3_prompt(m, [1, 3, 4], [7, 8, 9]),
                 lambda m: idefics3_prompt(m, [1, 3], [7], images=[(1, 2), (0, 0), (2, 2)], seed=1)),
    "mistral3": (tiny_mistral3, 2, lambda m: mistral3_prompt(m, [1, 3, 4], [7, 8, 9]),
                 lambda m: mistral3_prompt(m, [1, 3], [7], images=[(3, 4), (2, 5), (4, 4)], seed=1)),
    "pixtral": (tiny_pixtral_llava, 2, lambda m: mistral3_prompt(m, [1, 3, 4], [7, 8, 9]),
                lambda m: mistral3_prompt(m, [1, 3], [7], images=[(3, 4), (2, 5), (4, 4)], seed=1)),
    # GLM-4V two (the grids read back from the positions under ``generate``), Gemma 3 and Aya Vision one
    "glm4v": (tiny_glm4v, 2, lambda m: glm4v_prompt(m, [1, 3, 4], [7, 8, 9]),
              lambda m: glm4v_prompt(m, [1, 3], [7], images=[(6, 8), (4, 4)], seed=1)),
    "gemma3": (tiny_gemma3, 1, lambda m: gemma3_prompt(m, [1, 3, 4], [7, 8, 9]),
               lambda m: gemma3_prompt(m, [1, 3], [7], num_images=2, seed=1)),
    "aya_vision": (tiny_aya_vision, 1, lambda m: aya_vision_prompt(m, [1, 3, 4], [7, 8, 9]),
                   lambda m: aya_vision_prompt(m, [1, 3], [7], tiles=[2, 1], seed=1)),
}
LAYOUT_SCHEDULE = dict(layers=(1, 2, 4), windows=(1, 1, 1), ratios=(0.5, 0.5, 0.5))
AFTER = 1  # handle.stats: every count read back at once


def baselines(schedule):
    layers = schedule["layers"]
    return {"tome": (lightkv.ToMe(**schedule), [MERGE_STAGE] * len(layers)),
            "fastv": (lightkv.FastV(layer=layers[0]), [PRUNE_STAGE]),
            "pdrop": (lightkv.PDrop(layers=layers), [PRUNE_STAGE] * len(layers)),
            "dart": (lightkv.DART(layer=layers[0], num_pivots=4), [PRUNE_STAGE])}


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(num_layers=6)


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen2_5_vl(num_layers=6)


def llava_inputs(model, kind):
    one = llava_prompt(model, [1, 3, 4], [7, 8, 9])
    if kind == "batch1":
        return one
    two = llava_prompt(model, [1, 3, 4, 5, 6, 10, 11], [7, 8], num_images=2, seed=1)  # 2 images in a row
    if kind == "padded2":
        return batch_prompts([one, two])
    return batch_prompts([one, llava_prompt(model, [1, 3], [7, 8], num_images=3, seed=2),
                          llava_prompt(model, [1, 3, 4, 5], [9], num_images=0)])  # "mixed3"


def qwen_inputs(model, kind):
    one = qwen_prompt(model, [1, 3, 4], [7, 8, 9])
    if kind == "batch1":
        return one
    two = qwen_prompt(model, [1, 3], [7], images=[(4, 4), (6, 8)], seed=1)  # 2 images of different grids
    if kind == "padded2":
        return batch_prompts([one, two])
    return batch_prompts([one, two, qwen_prompt(model, [1, 3, 4, 5], [9], images=[], seed=2)])  # "mixed3"


def check(report, before, stages):
    assert report.decode == [0] * len(report.decode), format_report(report)
    assert report.prefill == {"before": before, **{f"stage {s}": n for s, n in enumerate(stages)},
                              "after": AFTER}, format_report(report)


def test_counter_counts_the_syncing_ops_only():
    x = torch.arange(6)
    mask = x > 2
    with SyncCounter() as counter:
        y = x * 2 + 1  # no sync
        torch.repeat_interleave(x, x, output_size=15)  # the size is given: no sync
        int(x[0]), bool(mask.any()), x.tolist()
        x[mask], torch.nonzero(mask), torch.unique(x), torch.bincount(x)
        z = y.clone()
        z[mask] = 0
        torch.repeat_interleave(x, x)
    assert [op for _, op in counter.events] == [
        "_local_scalar_dense", "_local_scalar_dense", "tolist", "index[bool mask]", "nonzero", "_unique2",
        "bincount", "index_put_[bool mask]", "repeat_interleave"]


@pytest.mark.parametrize("kind", ["batch1", "padded2", "mixed3"])
def test_llava_lightkv_syncs_do_not_depend_on_the_batch(llava, kind):
    report = count_syncs(llava, lightkv.LightKV(**SCHEDULE), llava_inputs(llava, kind), decode_steps=3)
    check(report, BEFORE["llava"], [MERGE_STAGE] * 3)
    assert set(report.prefill_ops) == {"tolist"}  # one batched read each, no scalar, mask or nonzero read


@pytest.mark.parametrize("kind", ["batch1", "padded2", "mixed3"])
def test_qwen_lightkv_syncs_do_not_depend_on_the_batch(qwen, kind):
    report = count_syncs(qwen, lightkv.LightKV(**QWEN_SCHEDULE), qwen_inputs(qwen, kind), decode_steps=3)
    check(report, BEFORE["qwen"], [MERGE_STAGE] * 2)


@pytest.fixture(scope="module")
def layout_models():
    return {}


@pytest.mark.parametrize("kind", ["batch1", "padded2"])
@pytest.mark.parametrize("family", list(LAYOUTS))
def test_layout_syncs_do_not_grow_with_images(layout_models, family, kind):
    """Before the decoder a fixed number of batched reads, the same for one image as for a padded batch whose
    second row holds three images (tiles, crops; OneVision: two images and a video); no scalar, mask or nonzero
    read."""
    build, before, one, more = LAYOUTS[family]
    if family not in layout_models:
        layout_models[family] = build(num_layers=6)
    model = layout_models[family]
    inputs = one(model) if kind == "batch1" else batch_prompts([one(model), more(model)])
    report = count_syncs(model, lightkv.LightKV(**LAYOUT_SCHEDULE), inputs, decode_steps=2)
    check(report, before, [MERGE_STAGE] * 3)
    assert set(report.prefill_ops) == {"tolist"}, format_report(report)


def test_qwen_layout_reads_once_when_the_call_gives_the_grids(qwen):
    """A direct call with image_grid_thw (not ``generate``): the layout needs a single read."""
    inputs = qwen_inputs(qwen, "padded2")
    report = count_syncs(qwen, lightkv.LightKV(**QWEN_SCHEDULE), inputs, run=lambda model: model(**inputs))
    assert report.prefill["before"] == 1 and report.decode == [], format_report(report)


@pytest.mark.parametrize("name", ["tome", "fastv", "pdrop", "dart"])
@pytest.mark.parametrize("kind", ["batch1", "padded2"])
def test_baselines_syncs(llava, qwen, name, kind):
    for model_name, model, inputs, schedule in (("llava", llava, llava_inputs(llava, kind), SCHEDULE),
                                                ("qwen", qwen, qwen_inputs(qwen, kind), QWEN_SCHEDULE)):
        method, stages = baselines(schedule)[name]
        check(count_syncs(model, method, inputs, decode_steps=2), BEFORE[model_name], stages)


def test_skipped_images_cost_no_extra_sync(qwen, caplog):
    """ToMe with 4 windows per side skips both small images of a row at stage 0: the warning comes from the
    stage's one read, not from a read per skipped image."""
    method = lightkv.ToMe(layers=(1, 2), windows=(4, 1), ratios=(0.5, 0.5))
    with caplog.at_level("WARNING", logger="lightkv"):
        report = count_syncs(qwen, method, qwen_inputs(qwen, "padded2"), decode_steps=1)
    check(report, BEFORE["qwen"], [MERGE_STAGE] * 2)
    assert "skipped for a 4 x 4 image grid" in caplog.text and "skipped for a 6 x 8 image grid" in caplog.text


def test_generate_decode_steps_add_no_sync(llava):
    inputs = llava_inputs(llava, "padded2")
    steps = 4

    def run(model):
        model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)

    report = count_syncs(llava, lightkv.LightKV(**SCHEDULE), inputs, run=run)
    assert report.decode == [0] * (steps - 1), format_report(report)


def test_diagnostics_are_opt_in(llava):
    inputs = llava_inputs(llava, "padded2")
    method = lightkv.LightKV(**SCHEDULE)
    plain = count_syncs(llava, method, inputs, decode_steps=0)
    recorded = count_syncs(llava, method, inputs, decode_steps=0, record=True)
    # per stage and sample: the kept positions' boolean-mask read and their tolist
    assert [r - p for r, p in zip(recorded.per_stage, plain.per_stage)] == [4, 4, 4]
    with lightkv.apply(llava, method) as handle, torch.no_grad():
        llava(**inputs)
    assert handle.stats.kept_positions == [] and handle.stats.merge_maps == []
    assert handle.stats.vision_tokens[0][-1] < handle.stats.vision_tokens[0][0]  # the cheap counts remain
    with lightkv.apply(llava, method, record=True) as handle, torch.no_grad():
        llava(**inputs)
    assert len(handle.stats.kept_positions) == 2 and len(handle.stats.merge_maps) == 3


def test_record_must_be_a_bool(llava):
    with pytest.raises(TypeError, match="record must be True or False"):
        lightkv.apply(llava, lightkv.LightKV(**SCHEDULE), record="yes")


@pytest.mark.parametrize("kind", ["batch1", "padded2", "mixed3"])
def test_merge_kept_counts_read_with_the_sizes_equal_the_result(llava, kind, monkeypatch):
    """The kept tokens per row a windowed merge reads before merging (so that the engine needs no read) are
    exactly what the merge keeps of each row's real tokens."""
    method = lightkv.LightKV(**SCHEDULE)
    seen = []
    reduce = type(method).reduce

    def spy(self, ctx, stage):
        result = reduce(self, ctx, stage)
        seen.append((result.kept_counts, (result.keep & ctx.token_valid).sum(1).tolist()))
        return result

    monkeypatch.setattr(type(method), "reduce", spy)
    with lightkv.apply(llava, method), torch.no_grad():
        llava(**llava_inputs(llava, kind))
    assert len(seen) == 3 and all(read == kept for read, kept in seen), seen
